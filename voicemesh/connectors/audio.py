"""Audio helpers the connectors share."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable

import numpy as np


async def whole_samples(chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """Re-chunk a PCM16 byte stream so every chunk holds whole samples: an odd trailing byte waits
    for the next chunk (and is dropped if the stream ends on it)."""
    carry = b""
    async for chunk in chunks:
        if carry:
            chunk, carry = carry + chunk, b""
        if len(chunk) & 1:
            chunk, carry = chunk[:-1], chunk[-1:]
        if chunk:
            yield chunk


def quiet_lead(pcm: bytes, rate: int, *, threshold_db: float = -50.0, keep_ms: int = 10) -> int:
    """Bytes of near-silence that open `pcm` (PCM16 mono), less `keep_ms` of lead-in: what a
    reply's first audio can drop and be heard no later. Piper opens every phrase with 40-50 ms
    under -40 dBFS; a caller hears the bot from its first sound, not its first sample. The
    whole chunk's length when all of it is quiet."""
    samples = np.frombuffer(pcm[: len(pcm) & ~1], dtype=np.int16)
    step = max(1, rate // 200)  # 5 ms windows
    usable = samples[: len(samples) // step * step].astype(np.float32)
    if usable.size == 0:
        return len(pcm) & ~1
    rms = np.sqrt(np.mean(usable.reshape(-1, step) ** 2, axis=1))
    loud = np.flatnonzero(rms > 32768.0 * 10 ** (threshold_db / 20))
    if loud.size == 0:
        return len(samples) * 2
    first = max(0, int(loud[0]) * step - rate * keep_ms // 1000)
    return first * 2
