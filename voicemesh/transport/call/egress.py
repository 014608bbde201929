"""Bot audio on its way back to the caller: sentences put back in order by index (they may be
synthesized in parallel on several TTS instances), frames of older turns dropped, audio resampled
from the TTS's native rate to the caller's.

This happens in the call, at the last step, because only here do all of a reply's sentences meet
and only here is the caller's rate known; the stages stay free to work in parallel at their own
rates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import soxr

from voicemesh.bus import Flag, Frame

#: frames of the sentence being played held back waiting for a missing one, at most (~1 s)
MAX_HELD = 50
#: how long a missing frame is waited for once later ones are held
HOLD_S = 0.3


@dataclass
class Reorderer:
    """Sentences in order by index, and each sentence's frames in order by seq: frames of one
    unit may cross different instances of a stage (a pass-through stage relays each frame as its
    own unit through a queue group), and arrive out of order. A frame missing for HOLD_S, or more
    than MAX_HELD frames behind, is given up on.

    Also absorbs a sentence synthesized again from its start (its TTS instance died midway and
    the unit was redelivered, START at seq 0 again): the audio already played of it is skipped,
    by duration."""

    epoch: int = 0
    next_index: int = 0
    done: bool = False
    _pending: dict[int, list[Frame]] = field(default_factory=dict)  # later sentences, as arrived
    _next_seq: int = 0  # of the sentence being played
    _held: dict[int, Frame] = field(default_factory=dict)  # its frames past a missing one, by seq
    _held_since: float | None = None
    _played_s: float = 0.0  # of the sentence being played
    _skip_s: float = 0.0

    def reset(self, epoch: int) -> None:
        self.epoch, self.next_index, self.done = epoch, 0, False
        self._pending.clear()
        self._start_sentence()

    def _start_sentence(self) -> None:
        self._next_seq = 0
        self._held.clear()
        self._held_since = None
        self._played_s = self._skip_s = 0.0

    def _admit(self, frame: Frame) -> Frame:
        """Account for a frame of the sentence being played; trim what was heard already."""
        if frame.payload and frame.sample_rate:
            payload = frame.payload
            if self._skip_s > 0:
                n = min(len(payload) // 2, round(self._skip_s * frame.sample_rate))
                self._skip_s -= n / frame.sample_rate
                payload = payload[2 * n :]
                frame = replace(frame, payload=payload)
            self._played_s += len(payload) / 2 / frame.sample_rate
        return frame

    def _take(self, frame: Frame, out: list[Frame]) -> bool:
        """One frame of the sentence being played, in whatever order it came; appends what is
        playable now to `out`. True once the sentence's END has been played."""
        if frame.has(Flag.START) and frame.seq == 0 and self._next_seq > 0:
            # the sentence starts over: what was played of it is skipped by duration
            self._skip_s, self._played_s = self._played_s, 0.0
            self._next_seq = 0
            self._held.clear()
            self._held_since = None
        if frame.seq < self._next_seq:
            return False  # a duplicate of a frame played already
        if frame.seq > self._next_seq:
            self._held[frame.seq] = frame
            if self._held_since is None:
                self._held_since = time.monotonic()
            if len(self._held) <= MAX_HELD:
                return False
            self._next_seq = min(self._held)  # too far behind: the missing frames are lost
            frame = self._held.pop(self._next_seq)
        return self._play_from(frame, out)

    def _play_from(self, frame: Frame | None, out: list[Frame]) -> bool:
        while frame is not None:
            out.append(self._admit(frame))
            self._next_seq = frame.seq + 1
            if frame.has(Flag.END):
                return True
            frame = self._held.pop(self._next_seq, None)
        self._held_since = time.monotonic() if self._held else None
        return False

    def _ended(self, last: Frame, out: list[Frame]) -> None:
        """The sentence being played has ended with `last`: move on through what is pending."""
        while not last.has(Flag.LAST):
            self.next_index += 1
            self._start_sentence()
            ended = False
            for queued in self._pending.pop(self.next_index, []):
                if self._take(queued, out):
                    ended = True
                    last = out[-1]
                    break
            if not ended:
                return
        self.done = True
        self._pending.clear()
        self._held.clear()

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
        out: list[Frame] = []
        if self._take(frame, out):
            self._ended(out[-1], out)
        return out

    def expire(self, now: float | None = None) -> list[Frame]:
        """Give up on a frame missing for HOLD_S (called now and then: with no later frame
        arriving, nothing else would play what is held behind it)."""
        if self.done or self._held_since is None or not self._held:
            return []
        if (now if now is not None else time.monotonic()) - self._held_since < HOLD_S:
            return []
        self._next_seq = min(self._held)
        out: list[Frame] = []
        if self._play_from(self._held.pop(self._next_seq), out):
            self._ended(out[-1], out)
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

    def flush(self) -> bytes:
        """The end of a reply: what the filters still hold of it (~26 ms at soxr's HQ), and
        clean streams for the next reply. Unflushed, that tail came out at the head of the next
        reply, before its first sound. (The reply's end marker names no rate of its audio, so
        every stream is flushed; a reply comes at one rate.)"""
        tails = []
        for stream in self._streams.values():
            tails.append(stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True).tobytes())
            stream.clear()
        return b"".join(tails)

    def reset(self) -> None:
        """Drop what every stream holds (a reply cut off by a barge-in is not played on)."""
        for stream in self._streams.values():
            stream.clear()
