"""OpenAI's transcriptions API on loopback: `POST /v1/audio/transcriptions` (multipart/form-data:
file, model, language, prompt, response_format) and `GET /v1/models`, with OpenAI's error bodies.

The transcript is a fixed text or a callable of the uploaded audio (the PCM samples when the file
is a WAV, else the file's bytes). `last` records the latest transcription request: model,
language, prompt, response_format, filename, content type, file and PCM byte lengths, sample rate
and the Authorization header. Setting `api_key` makes any other bearer token a 401. `delay_s`
holds every answer that long, as an engine's transcription time would (it does not block the
event loop).

The multipart body is parsed with the standard library's email parser, so the server needs no
python-multipart.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from voicemesh.testing.loopback.base import LoopbackServer, wait_for_disconnect

Transcript = str | Callable[[bytes], str]

ERRORS: dict[int, tuple[str, str, str | None]] = {
    401: (
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    ),
    429: (
        "Rate limit reached for requests. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
}


def openai_error(status: int, message: str | None = None) -> JSONResponse:
    default, kind, code = ERRORS.get(status, ERRORS[500])
    body = {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
    headers = {"x-request-id": f"req_loopback_{time.monotonic_ns()}"}
    if status == 429:
        headers.update({"retry-after": "1", "x-ratelimit-remaining-requests": "0"})
    return JSONResponse(body, status_code=status, headers=headers)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None, str]]:
    """Fields of a multipart/form-data body: name → (value bytes, filename, content type)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    fields: dict[str, tuple[bytes, str | None, str]] = {}
    if not msg.is_multipart():
        return fields
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        assert isinstance(payload, bytes)  # decode=True: bytes, or None for a nested multipart
        fields[str(name)] = (payload, part.get_filename(), part.get_content_type())
    return fields


def wav_pcm(data: bytes) -> tuple[bytes, int] | None:
    """The samples and rate of a WAV file, or None if it is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            return w.readframes(w.getnframes()), w.getframerate()
    except (wave.Error, EOFError):
        return None


class OpenAITranscribeServer(LoopbackServer):
    name = "openai-transcribe"

    def __init__(
        self,
        transcript: Transcript = "hello from the loopback",
        *,
        api_key: str | None = None,
        models: tuple[str, ...] = ("gpt-4o-mini-transcribe", "gpt-4o-transcribe", "whisper-1"),
    ) -> None:
        self.transcript: Transcript = transcript
        self.api_key = api_key
        self.models = models
        self.last: dict[str, Any] = {}
        self.transcriptions = 0  # answered transcription requests
        self.delay_s = 0.0
        super().__init__()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def _auth_error(self, request: Request) -> Response | None:
        if self.api_key is not None and request.headers.get("authorization") != (
            f"Bearer {self.api_key}"
        ):
            return openai_error(401)
        return None

    async def _failure(self, request: Request, answer: Response) -> Response | None:
        """The injected failure's response (None: answer normally)."""
        f = self.take_failure()
        if f.mode == "ok":
            return self._auth_error(request)
        if f.mode == "hang":
            await wait_for_disconnect(request)
            return Response(status_code=499)  # nobody is listening any more
        if f.mode in ("401", "429", "500"):
            return openai_error(int(f.mode))
        if f.mode == "error":
            return openai_error(500)
        # "die": the head and `after` bytes of the body, then the connection is dropped
        return _DyingResponse(answer, f.after)

    async def _transcriptions(self, request: Request) -> Response:
        body = await request.body()
        fields = parse_multipart(request.headers.get("content-type", ""), body)

        def text(name: str) -> str | None:
            return fields[name][0].decode() if name in fields else None

        audio, filename, content_type = fields.get("file", (b"", None, ""))
        decoded = wav_pcm(audio)
        pcm, rate = decoded if decoded is not None else (audio, None)
        self.last = {
            "model": text("model"),
            "language": text("language"),
            "prompt": text("prompt"),
            "response_format": text("response_format"),
            "filename": filename,
            "content_type": content_type,
            "file_bytes": len(audio),
            "pcm_bytes": len(pcm),
            "sample_rate": rate,
            "authorization": request.headers.get("authorization"),
        }
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        transcript = self.transcript(pcm) if callable(self.transcript) else self.transcript
        fmt = self.last["response_format"] or "json"
        if fmt == "text":
            answer: Response = PlainTextResponse(transcript + "\n")
        elif fmt == "verbose_json":
            seconds = len(pcm) / (2 * rate) if rate else 0.0
            answer = JSONResponse(
                {
                    "task": "transcribe",
                    "language": self.last["language"] or "english",
                    "duration": seconds,
                    "text": transcript,
                    "segments": [{"id": 0, "start": 0.0, "end": seconds, "text": transcript}],
                }
            )
        else:
            answer = JSONResponse(
                {"text": transcript, "usage": {"type": "duration", "seconds": len(pcm) // 32000}}
            )
        if not fields.get("model") or "file" not in fields:
            answer = JSONResponse(
                {
                    "error": {
                        "message": "you must provide a model parameter and a file",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status_code=400,
            )
        failed = await self._failure(request, answer)
        if failed is not None:
            return failed
        self.transcriptions += 1
        return answer

    async def _models(self, request: Request) -> Response:
        answer = JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
                    for m in self.models
                ],
            }
        )
        failed = await self._failure(request, answer)
        return failed if failed is not None else answer


class _DyingResponse(Response):
    """Sends the wrapped response's head and its first `after` body bytes, then drops the
    connection (the client sees an incomplete body)."""

    def __init__(self, answer: Response, after: int) -> None:
        self.answer, self.after = answer, after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.answer.status_code,
                "headers": self.answer.raw_headers,
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": self.answer.body[: self.after],
                "more_body": True,
            }
        )
        await asyncio.sleep(0.01)  # let the partial body reach the client
        # Returning with the body incomplete makes uvicorn close the connection (it logs one
        # "returned without completing response" line, and no traceback).
