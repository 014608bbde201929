"""How fast a caller may send audio, checked once for every carrier where their audio meets
(call.py's receive loop).

A microphone produces one second of audio per second. A client that sends faster (a file pushed
at full speed, a replay, a flood) makes the transport run VAD and publish turns faster than real
time, and every stage after it works for it at that rate. Pacing it instead would only move the
backlog into a queue: a WebSocket's socket buffer is bounded, but aiortc's track queue is not,
so the call refuses it: the caller gets an `error` event and the call ends (a WebSocket closes
with 4429, as for the session rate).

The rule is a token bucket over seconds of audio: credit refills at `max_rate` seconds of audio
per second of wall time, up to `burst_s`, and each message spends its length. A real-time source
refills faster than it spends, so its credit stays full; network jitter, or a stalled TCP
connection catching up, spends at most the burst. The credit is capped so that a caller who was
quiet for a minute cannot then send a minute and a half at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from voicemesh.errors import VoicemeshError
from voicemesh.transport.call.audio import RATE

#: bytes of one second of caller audio (16 kHz PCM16 mono)
BYTES_PER_S = RATE * 2
#: how much audio the call counts before it checks the rate: ~100 ms, far under any burst
RATE_CHECK_BYTES = BYTES_PER_S // 10
#: the close code of a call refused for sending audio too fast (the session rate's code too)
TOO_FAST_CODE = 4429


class CallerTooFast(VoicemeshError, ValueError):
    """A caller sent audio faster than the allowed multiple of real time."""


class AudioRate:
    """One per call: `take(n)` for each message of `n` bytes of 16 kHz PCM16."""

    def __init__(
        self, max_rate: float, burst_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_rate, self.burst_s = max_rate, burst_s
        self._clock = clock
        self._credit = burst_s
        self._at: float | None = None

    def take(self, nbytes: int) -> None:
        """Spend `nbytes` of audio; CallerTooFast once the credit is gone."""
        now = self._clock()
        if self._at is not None:
            self._credit = min(self.burst_s, self._credit + (now - self._at) * self.max_rate)
        self._at = now
        self._credit -= nbytes / BYTES_PER_S
        if self._credit < 0:
            raise CallerTooFast(
                f"caller audio arrives faster than {self.max_rate:g}x real time "
                f"({self.burst_s:g} s of burst allowed): send audio as it is spoken; "
                "the call is ended"
            )
