"""End-of-turn detection on inbound 16 kHz PCM16: webrtcvad (or an energy gate) per 20 ms frame,
with pre-roll so the first syllable reaches STT, and a silence timer that closes the turn."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from voicemesh.config.connectors import WebSocketTransportOptions

RATE = 16000
FRAME_MS = 20
FRAME_BYTES = RATE * FRAME_MS // 1000 * 2  # 640


@dataclass(frozen=True, slots=True)
class TurnEvent:
    kind: str  # "start" (frames = pre-roll and the voiced run), "audio", "end"
    frames: tuple[bytes, ...] = ()


def dbfs(frame: bytes) -> float:
    samples = np.frombuffer(frame, dtype=np.int16).astype(np.float32)
    rms = math.sqrt(float(np.mean(samples * samples))) if samples.size else 0.0
    return 20 * math.log10(max(rms, 1e-9) / 32768.0)


class TurnDetector:
    def __init__(self, options: WebSocketTransportOptions):
        self.options = options
        self._vad = webrtcvad.Vad(options.vad_aggressiveness) if options.vad == "webrtc" else None
        self._start_frames = max(1, options.start_speech_ms // FRAME_MS)
        # Pre-roll is what came before the voiced run that opened the turn, so hold both.
        self._preroll: deque[bytes] = deque(
            maxlen=options.preroll_ms // FRAME_MS + self._start_frames
        )
        self._end_frames = max(1, options.end_of_turn_silence_ms // FRAME_MS)
        self.speaking = False
        self.last_voiced = False  # whether the last frame pushed was speech
        self._run = 0
        self._silence = 0

    def voiced(self, frame: bytes) -> bool:
        if self._vad is not None:
            return self._vad.is_speech(frame, RATE)
        return dbfs(frame) > self.options.energy_threshold_db

    def push(self, frame: bytes) -> list[TurnEvent]:
        """Feed one 20 ms frame; returns what it changed."""
        voiced = self.last_voiced = self.voiced(frame)
        if not self.speaking:
            self._preroll.append(frame)
            self._run = self._run + 1 if voiced else 0
            if self._run < self._start_frames:
                return []
            self.speaking, self._silence, self._run = True, 0, 0
            frames = tuple(self._preroll)
            self._preroll.clear()
            return [TurnEvent("start", frames)]
        self._silence = 0 if voiced else self._silence + 1
        if self._silence >= self._end_frames:
            self.speaking = False
            return [TurnEvent("audio", (frame,)), TurnEvent("end")]
        return [TurnEvent("audio", (frame,))]


class Rechunker:
    """Cuts arbitrary byte chunks from a peer into exact 20 ms frames."""

    def __init__(self, frame_bytes: int = FRAME_BYTES):
        self.frame_bytes = frame_bytes
        self._buf = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        self._buf += data
        n = len(self._buf) // self.frame_bytes * self.frame_bytes
        if not n:
            return []
        chunk, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return [chunk[i : i + self.frame_bytes] for i in range(0, n, self.frame_bytes)]
