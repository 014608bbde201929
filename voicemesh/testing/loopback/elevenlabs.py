"""A loopback ElevenLabs text-to-speech API: the streaming endpoint the official SDK calls, raw PCM
of a deterministic tone, ElevenLabs-shaped errors, and the voices endpoints used as probes.

    POST /v1/text-to-speech/{voice_id}/stream?output_format=pcm_16000   header xi-api-key
         body {"text": ..., "model_id": ...}  ->  200, chunked raw PCM16 mono
    GET  /v1/voices, GET /v1/voices/{voice_id}

Also home of the pieces every TTS loopback server shares: `tone_pcm` (the audio) and `PCMStream`
(a chunked body that can be cut mid-stream).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from voicemesh.testing.loopback.base import Failure, LoopbackServer, hang

AMPLITUDE = 8000


def tone_pcm(text: str, sample_rate: int, frequency_hz: float, ms_per_word: int) -> bytes:
    """PCM16 mono sine whose duration follows the word count: what a loopback voice "says"."""
    words = max(1, len(text.split()))
    n = sample_rate * ms_per_word * words // 1000
    t = np.arange(n) / sample_rate
    return (np.sin(2 * np.pi * frequency_hz * t) * AMPLITUDE).astype("<i2").tobytes()


# Set by PCMStream when it cuts a body on purpose, in the request task uvicorn logs from.
_cut_on_purpose = contextvars.ContextVar("loopback_cut_on_purpose", default=False)


class _QuietCut(logging.Filter):
    """Drops uvicorn's "returned without completing response" for an injected cut only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_cut_on_purpose.get() and "without completing response" in record.getMessage())


_quiet_cut = _QuietCut()


class PCMStream:
    """An ASGI response streaming `pcm` in chunks (chunked transfer encoding, no length). With
    `die_after` it stops after that many chunks without finishing the body, so uvicorn closes the
    connection mid-stream and the client sees an incomplete chunked read."""

    def __init__(
        self,
        pcm: bytes,
        *,
        chunk_bytes: int,
        chunk_delay_s: float = 0.002,
        die_after: int | None = None,
        media_type: str = "audio/pcm",
        headers: dict[str, str] | None = None,
    ):
        self.pcm, self.chunk_bytes, self.delay = pcm, max(1, chunk_bytes), chunk_delay_s
        self.die_after = die_after
        self.headers = [(b"content-type", media_type.encode())] + [
            (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        for i, start in enumerate(range(0, len(self.pcm), self.chunk_bytes)):
            if self.die_after is not None and i >= self.die_after:
                _cut_on_purpose.set(True)
                logging.getLogger("uvicorn.error").addFilter(_quiet_cut)  # idempotent
                return  # response left incomplete: uvicorn drops the connection
            chunk = self.pcm[start : start + self.chunk_bytes]
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(self.delay)  # separate reads on the client, as a real stream
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def chunk_bytes_for(sample_rate: int, chunk_ms: int, chunk_bytes: int | None) -> int:
    return chunk_bytes if chunk_bytes else sample_rate * chunk_ms // 1000 * 2


class ElevenLabsServer(LoopbackServer):
    name = "elevenlabs"

    def __init__(
        self,
        *,
        frequency_hz: float = 300.0,
        ms_per_word: int = 120,
        chunk_ms: int = 100,
        chunk_bytes: int | None = None,
        api_key: str | None = None,
    ):
        """`chunk_bytes` overrides `chunk_ms` (an odd size tests sample re-alignment); `api_key`
        None accepts any non-empty key."""
        self.frequency_hz, self.ms_per_word = frequency_hz, ms_per_word
        self.chunk_ms, self.chunk_bytes, self.api_key = chunk_ms, chunk_bytes, api_key
        self.last: dict[str, Any] | None = None  # the last synthesis request, for assertions
        super().__init__()

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/text-to-speech/{voice_id}/stream", self._stream, methods=["POST"]),
                Route("/v1/voices", self._voices, methods=["GET"]),
                Route("/v1/voices/{voice_id}", self._voice, methods=["GET"]),
            ]
        )

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
        return JSONResponse(
            {"detail": {"status": code, "message": message}}, status, headers=headers or None
        )

    def _refusal(self, request: Request, failure: Failure) -> Response | None:
        """The answer for an unauthorized request or an injected HTTP failure, if any."""
        key = request.headers.get("xi-api-key")
        if failure.mode == "401" or not key or (self.api_key and key != self.api_key):
            return self.error(401, "invalid_api_key", "Invalid API key")
        if failure.mode == "429":
            return self.error(
                429,
                "too_many_concurrent_requests",
                "Too many concurrent requests for your subscription.",
                **{"Retry-After": "1"},
            )
        if failure.mode in ("error", "500"):
            return self.error(500, "internal_server_error", "An internal error occurred.")
        return None

    # --- endpoints ---------------------------------------------------------------------------

    async def _stream(self, request: Request) -> Response | PCMStream:
        failure = self.take_failure()
        try:
            body = await request.json()
        except ValueError:
            body = None
        output_format = request.query_params.get("output_format", "mp3_44100_128")
        self.last = {
            "voice_id": request.path_params["voice_id"],
            "output_format": output_format,
            "body": body,
            "text": body.get("text") if isinstance(body, dict) else None,
            "model_id": body.get("model_id") if isinstance(body, dict) else None,
            "headers": dict(request.headers),
        }
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        text = self.last["text"]
        if not isinstance(text, str) or not text.strip():
            return JSONResponse(
                {"detail": [{"loc": ["body", "text"], "msg": "field required", "type": "missing"}]},
                422,
            )
        codec, _, rate = output_format.partition("_")
        if codec != "pcm" or not rate.isdigit():
            return self.error(
                400, "invalid_output_format", f"the loopback serves only pcm_*, not {output_format}"
            )
        sample_rate = int(rate)
        pcm = tone_pcm(text, sample_rate, self.frequency_hz, self.ms_per_word)
        return PCMStream(
            pcm,
            chunk_bytes=chunk_bytes_for(sample_rate, self.chunk_ms, self.chunk_bytes),
            die_after=failure.after if failure.mode == "die" else None,
            headers={"request-id": f"req-{self.requests}"},
        )

    def _voice_json(self, voice_id: str) -> dict[str, Any]:
        return {"voice_id": voice_id, "name": "Loopback", "category": "premade"}

    async def _voices(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        return JSONResponse({"voices": [self._voice_json("loopback-voice")]})

    async def _voice(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        return JSONResponse(self._voice_json(request.path_params["voice_id"]))
