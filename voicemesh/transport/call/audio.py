"""The audio format of the bus, in one place: every carrier converts its codec to it on the way in,
the turn detector and STT read it, and the callers speak it. A carrier or caller that took these
numbers from anywhere else could drift from what STT expects without any test noticing.

Inbound audio crosses the bus as 16 kHz mono PCM16 in 20 ms frames (docs/wire-protocol.md); bot
audio keeps the TTS's rate and is resampled per peer by egress.py.
"""

from __future__ import annotations

#: samples per second of caller audio on the bus
RATE = 16000
#: the length of one frame: the unit of VAD, turn detection, pacing and bus messages
FRAME_MS = 20
#: one frame of PCM16 mono at RATE (2 bytes a sample)
FRAME_BYTES = RATE * FRAME_MS // 1000 * 2  # 640


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
