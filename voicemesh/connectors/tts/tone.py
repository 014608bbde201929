"""A sine tone per sentence, its length set by the word count: a pass-through TTS that costs no
CPU, for benchmarks of the bus and for routing tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from voicemesh.config.connectors import ToneOptions
from voicemesh.connectors.base import TTSConnector


class ToneTTS(TTSConnector):
    name = "tone"
    options: ToneOptions

    @property
    def sample_rate(self) -> int:
        return self.options.sample_rate

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        opts = self.options
        words = max(1, len(text.split()))
        total = opts.sample_rate * opts.ms_per_word * words // 1000
        chunk = opts.sample_rate // 10
        for i in range(0, total, chunk):
            yield tone_chunk(opts, i, min(i + chunk, total))
            await asyncio.sleep(0)


def tone_chunk(opts: ToneOptions, start: int, stop: int) -> bytes:
    """Samples [start, stop) of the tone, computed from their absolute index: the phase runs on
    across chunks, and the samples are those of the whole tone computed at once, so memory is
    one chunk's whatever the length of the sentence."""
    t = np.arange(start, stop) / opts.sample_rate
    return (np.sin(2 * np.pi * opts.frequency_hz * t) * 8000).astype(np.int16).tobytes()
