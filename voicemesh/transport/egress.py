"""Bot audio on its way back to the caller: sentences put back in order by index (they may be
synthesized in parallel on several TTS instances), frames of older turns dropped, audio resampled
from the TTS's native rate to the caller's."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import soxr

from voicemesh.router import Flag, Frame


@dataclass
class Reorderer:
    """Also absorbs a sentence synthesized again from its start (its TTS instance died midway and
    the unit was redelivered): the audio already played of it is skipped, by duration."""

    epoch: int = 0
    next_index: int = 0
    done: bool = False
    _pending: dict[int, list[Frame]] = field(default_factory=dict)
    _played_s: float = 0.0  # of the sentence being played
    _skip_s: float = 0.0

    def reset(self, epoch: int) -> None:
        self.epoch, self.next_index, self.done = epoch, 0, False
        self._pending.clear()
        self._played_s = self._skip_s = 0.0

    def _admit(self, frame: Frame) -> Frame:
        """Account for a frame of the sentence being played; trim what was heard already."""
        if frame.has(Flag.START) and self._played_s > 0:
            self._skip_s, self._played_s = self._played_s, 0.0  # the sentence starts over
        if frame.payload and frame.sample_rate:
            payload = frame.payload
            if self._skip_s > 0:
                n = min(len(payload) // 2, round(self._skip_s * frame.sample_rate))
                self._skip_s -= n / frame.sample_rate
                payload = payload[2 * n :]
                frame = replace(frame, payload=payload)
            self._played_s += len(payload) / 2 / frame.sample_rate
        return frame

    def _advance(self) -> None:
        self.next_index += 1
        self._played_s = self._skip_s = 0.0

    def push(self, frame: Frame) -> list[Frame]:
        """Frames now playable, in order. Frames of an older turn are dropped."""
        if frame.epoch > self.epoch:
            self.reset(frame.epoch)
        if frame.epoch < self.epoch or self.done:
            return []
        if frame.index != self.next_index:
            if frame.index > self.next_index:
                self._pending.setdefault(frame.index, []).append(frame)
            return []
        out = [self._admit(frame)]
        last: Frame | None = frame
        while last is not None and last.has(Flag.END) and not last.has(Flag.LAST):
            self._advance()
            last = None
            for queued in self._pending.pop(self.next_index, []):
                out.append(self._admit(queued))
                if queued.has(Flag.END):
                    last = queued
                    break
        if last is not None and last.has(Flag.LAST):
            self.done = True
            self._pending.clear()
        return out


class Resampler:
    """Streaming resampler to a fixed output rate; one soxr stream per input rate."""

    def __init__(self, out_rate: int):
        self.out_rate = out_rate
        self._streams: dict[int, soxr.ResampleStream] = {}

    def __call__(self, pcm: bytes, rate: int) -> bytes:
        if not pcm:
            return b""
        if rate == self.out_rate:
            return pcm
        stream = self._streams.get(rate)
        if stream is None:
            stream = self._streams[rate] = soxr.ResampleStream(
                rate, self.out_rate, 1, dtype="int16"
            )
        return stream.resample_chunk(np.frombuffer(pcm, dtype=np.int16)).tobytes()
