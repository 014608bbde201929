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
        t = np.arange(total) / opts.sample_rate
        pcm = (np.sin(2 * np.pi * opts.frequency_hz * t) * 8000).astype(np.int16).tobytes()
        for i in range(0, len(pcm), chunk * 2):
            yield pcm[i : i + chunk * 2]
            await asyncio.sleep(0)
