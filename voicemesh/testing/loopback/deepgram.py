"""Deepgram's live transcription websocket on loopback: `/v1/listen` speaking the v1 live protocol.

The client sends binary PCM (linear16 at the `sample_rate` of the query) and JSON control messages
(`CloseStream`, `Finalize`, `KeepAlive`); the server answers with `Results` messages, interim
(`is_final: false`) and final, and on `CloseStream` with the last final, a `Metadata` message and
a normal close.

The transcript is a configurable text (or a callable of the audio received so far) revealed word
by word as audio arrives, one word per `ms_per_word` of audio, so interim results grow; every
`words_per_final` words the pending words are sent again as a final segment. `CloseStream`
finalizes every word left, however little audio came, so a finished stream always carries the
whole transcript.

Failure injection (see LoopbackServer): "401" / "429" / "500" reject the handshake with that HTTP
status and Deepgram's error body (websocket denial response, which uvicorn supports); "error"
accepts, sends an `Error` message and closes with 1011; "hang" accepts and never answers; "die"
sends `after` Results messages then drops the TCP connection with no close frame (and never
answers CloseStream). Setting `api_key` makes any other `Authorization: Token ...` a 401.

`last` records the latest stream: Authorization header, query parameters, audio bytes received,
Results sent, the control messages received and how the stream ended.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from voicemesh.testing.loopback.base import LoopbackServer

Transcript = str | Callable[[bytes], str]

DENIALS: dict[int, tuple[str, str]] = {
    401: ("INVALID_AUTH", "Invalid credentials."),
    429: ("TOO_MANY_REQUESTS", "Too many requests. Please try again later."),
    500: ("INTERNAL_SERVER_ERROR", "Internal server error. Please try again later."),
}
MODEL_UUID = "1abfe86b-e047-4eed-858a-35e5625b41ee"


class _Drop(Exception):
    """End the handler without a close frame: uvicorn then closes the TCP connection."""


class DeepgramServer(LoopbackServer):
    name = "deepgram"

    def __init__(
        self,
        transcript: Transcript = "hello from the deepgram loopback",
        *,
        api_key: str | None = None,
        ms_per_word: int = 100,
        words_per_final: int = 4,
    ) -> None:
        self.transcript: Transcript = transcript
        self.api_key = api_key
        self.ms_per_word = ms_per_word
        self.words_per_final = words_per_final
        self.last: dict[str, Any] = {}
        self.completed = 0  # streams answered through to Metadata
        super().__init__()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def build(self) -> Starlette:
        return Starlette(routes=[WebSocketRoute("/v1/listen", self._listen)])

    def words(self, audio: bytes) -> list[str]:
        text = self.transcript(audio) if callable(self.transcript) else self.transcript
        return text.split()

    async def _listen(self, ws: WebSocket) -> None:
        failure = self.take_failure()
        auth = ws.headers.get("authorization")
        rec: dict[str, Any] = {
            "authorization": auth,
            "query": dict(ws.query_params),
            "audio_bytes": 0,
            "results": 0,
            "control": [],
            "ended": None,
        }
        self.last = rec
        if failure.mode in ("401", "429", "500"):
            await self._deny(ws, int(failure.mode))
            rec["ended"] = f"denied {failure.mode}"
            return
        if self.api_key is not None and auth != f"Token {self.api_key}":
            await self._deny(ws, 401)
            rec["ended"] = "denied 401"
            return
        await ws.accept()
        try:
            if failure.mode == "error":
                await ws.send_text(
                    json.dumps(
                        {
                            "type": "Error",
                            "variant": "InternalServerError",
                            "description": "loopback: injected server error",
                            "code": "NET-0001",
                        }
                    )
                )
                await ws.close(1011, "NET-0001")
                rec["ended"] = "error 1011"
            elif failure.mode == "hang":
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass  # read everything, answer nothing
                rec["ended"] = "client left (hang)"
            else:
                limit = failure.after if failure.mode == "die" else None
                await _Session(self, ws, rec, limit).run()
        except _Drop:
            rec["ended"] = f"dropped after {rec['results']} results"
        except WebSocketDisconnect:
            rec["ended"] = rec["ended"] or "client left"

    @staticmethod
    async def _deny(ws: WebSocket, status: int) -> None:
        code, message = DENIALS.get(status, DENIALS[500])
        headers = {"dg-request-id": str(uuid.uuid4())}
        if status == 429:
            headers["retry-after"] = "1"
        body = {"err_code": code, "err_msg": message, "request_id": headers["dg-request-id"]}
        await ws.send_denial_response(JSONResponse(body, status_code=status, headers=headers))


class _Session:
    """One live stream: audio in, Results out."""

    def __init__(
        self, server: DeepgramServer, ws: WebSocket, rec: dict[str, Any], limit: int | None
    ) -> None:
        self.server, self.ws, self.rec, self.limit = server, ws, rec, limit
        query = rec["query"]
        self.rate = int(query.get("sample_rate") or 16000)
        self.channels = int(query.get("channels") or 1)
        self.interim = query.get("interim_results", "false") == "true"
        self.model = query.get("model") or "nova-3"
        self.request_id = str(uuid.uuid4())
        self.audio = bytearray()
        self.revealed = 0  # words heard so far
        self.finalized = 0  # words sent in final results
        self.segment_start = 0.0

    @property
    def seconds(self) -> float:
        return len(self.audio) / (2 * self.rate * self.channels)

    async def run(self) -> None:
        if self.limit == 0:
            raise _Drop
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                self.rec["ended"] = "client left"
                return
            if msg.get("bytes") is not None:
                self.audio += msg["bytes"]
                self.rec["audio_bytes"] = len(self.audio)
                await self._heard()
            elif msg.get("text") is not None:
                try:
                    kind = json.loads(msg["text"]).get("type")
                except (ValueError, AttributeError):
                    kind = None
                self.rec["control"].append(kind)
                if kind == "CloseStream":
                    if self.limit is not None:
                        raise _Drop  # "die": never answer the close
                    await self._close()
                    return
                if kind == "Finalize":  # flush what was heard so far, keep the stream open
                    await self._final(self.revealed, finalize=True)

    async def _heard(self) -> None:
        words = self.server.words(bytes(self.audio))
        heard = min(len(words), int(self.seconds * 1000 // self.server.ms_per_word))
        if heard <= self.revealed:
            return
        self.revealed = heard
        if heard - self.finalized >= self.server.words_per_final:
            await self._final(heard)
        elif self.interim:
            await self._result(words[self.finalized : heard], is_final=False)

    async def _final(
        self, upto: int, *, finalize: bool = False, speech_final: bool = False
    ) -> None:
        words = self.server.words(bytes(self.audio))[self.finalized : upto]
        self.revealed = max(self.revealed, upto)
        if not words and not finalize:
            return
        await self._result(words, is_final=True, speech_final=speech_final, from_finalize=finalize)
        self.finalized = upto
        self.segment_start = self.seconds

    async def _close(self) -> None:
        await self._final(len(self.server.words(bytes(self.audio))), speech_final=True)
        await self.ws.send_text(
            json.dumps(
                {
                    "type": "Metadata",
                    "transaction_key": "deprecated",
                    "request_id": self.request_id,
                    "sha256": hashlib.sha256(self.audio).hexdigest(),
                    "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "duration": round(self.seconds, 3),
                    "channels": self.channels,
                    "models": [MODEL_UUID],
                    "model_info": {
                        MODEL_UUID: {
                            "name": f"general-{self.model}",
                            "version": "loopback",
                            "arch": self.model,
                        }
                    },
                }
            )
        )
        await self.ws.close(1000)
        self.rec["ended"] = "closed"
        self.server.completed += 1

    async def _result(
        self,
        words: list[str],
        *,
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> None:
        start, end = self.segment_start, max(self.seconds, self.segment_start)
        step = (end - start) / max(1, len(words))
        timed = [
            {
                "word": w.lower().strip(".,!?"),
                "start": round(start + i * step, 3),
                "end": round(start + (i + 1) * step, 3),
                "confidence": 0.98,
                "punctuated_word": w,
            }
            for i, w in enumerate(words)
        ]
        message = {
            "type": "Results",
            "channel_index": [0, self.channels],
            "duration": round(end - start, 3),
            "start": round(start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {"transcript": " ".join(words), "confidence": 0.98, "words": timed}
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": {
                    "name": f"general-{self.model}",
                    "version": "loopback",
                    "arch": self.model,
                },
                "model_uuid": MODEL_UUID,
            },
        }
        await self.ws.send_text(json.dumps(message))
        self.rec["results"] += 1
        if self.limit is not None and self.rec["results"] >= self.limit:
            raise _Drop
