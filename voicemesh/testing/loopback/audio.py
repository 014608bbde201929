"""What the text-to-speech loopback servers share: the audio a loopback voice "says" (`tone_pcm`),
a chunked PCM body that can be cut mid-stream (`PCMStream`), and their common base
(`SpeechServer`: the voice's settings, the last request, the spoken reply)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from starlette.types import Receive, Scope, Send

from voicemesh.testing.loopback.base import Failure, LoopbackServer, cut_on_purpose

AMPLITUDE = 8000


def tone_pcm(text: str, sample_rate: int, frequency_hz: float, ms_per_word: int) -> bytes:
    """PCM16 mono sine whose duration follows the word count: what a loopback voice "says"."""
    words = max(1, len(text.split()))
    n = sample_rate * ms_per_word * words // 1000
    t = np.arange(n) / sample_rate
    return (np.sin(2 * np.pi * frequency_hz * t) * AMPLITUDE).astype("<i2").tobytes()


def chunk_bytes_for(sample_rate: int, chunk_ms: int, chunk_bytes: int | None) -> int:
    return chunk_bytes if chunk_bytes else sample_rate * chunk_ms // 1000 * 2


class SpeechServer(LoopbackServer):
    """A loopback TTS provider: each subclass speaks its provider's protocol and errors; what it
    says is always a tone of `frequency_hz` lasting `ms_per_word` a word."""

    default_frequency_hz = 440.0

    def __init__(
        self,
        *,
        frequency_hz: float | None = None,
        ms_per_word: int = 120,
        chunk_ms: int = 100,
        chunk_bytes: int | None = None,
        api_key: str | None = None,
    ):
        """`chunk_bytes` overrides `chunk_ms` (an odd size tests sample re-alignment); `api_key`
        None accepts any non-empty key."""
        self.frequency_hz = frequency_hz if frequency_hz is not None else self.default_frequency_hz
        self.ms_per_word = ms_per_word
        self.chunk_ms, self.chunk_bytes, self.api_key = chunk_ms, chunk_bytes, api_key
        self.last: dict[str, Any] | None = None  # the last synthesis request, for assertions
        super().__init__()

    def speak(self, text: str, sample_rate: int, failure: Failure, **kw: Any) -> PCMStream:
        """The reply: `text` as the tone, streamed in chunks, cut short by a "die" failure."""
        return PCMStream(
            tone_pcm(text, sample_rate, self.frequency_hz, self.ms_per_word),
            chunk_bytes=chunk_bytes_for(sample_rate, self.chunk_ms, self.chunk_bytes),
            die_after=failure.after if failure.mode == "die" else None,
            **kw,
        )


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
                cut_on_purpose()
                return  # response left incomplete: uvicorn drops the connection
            chunk = self.pcm[start : start + self.chunk_bytes]
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(self.delay)  # separate reads on the client, as a real stream
        await send({"type": "http.response.body", "body": b"", "more_body": False})
