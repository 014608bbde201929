"""Audio helpers the connectors share."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable


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
