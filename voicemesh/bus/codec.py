"""The binary frame that crosses the bus: a 32-byte struct header, then the raw payload.

Audio stays raw PCM16 (no base64, no JSON, no NATS headers: parsing those costs more than the
audio itself). Text payloads are UTF-8; event payloads are orjson objects. docs/wire-protocol.md
is the reference for other implementations.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

import orjson

from voicemesh.bus.events import Event
from voicemesh.errors import VoicemeshError

VERSION = 1
# version u8, kind u8, flags u16, epoch u32, index u32, seq u32, sample_rate u32, channels u8,
# 3 reserved bytes, origin timestamp u64 (ns since the Unix epoch, wall clock).
HEADER = struct.Struct("<BBHIIIIB3xQ")
HEADER_SIZE = HEADER.size  # 32
MAX_PAYLOAD = 1 << 20


class Kind(IntEnum):
    AUDIO = 1
    TEXT = 2
    EVENT = 3


class Flag(IntFlag):
    NONE = 0
    START = 1  # first frame of a unit (an utterance, a sentence)
    END = 2  # last frame of a unit
    LAST = 4  # the unit is the last of its turn (the reply is complete after it)
    # Caller audio only. On an empty frame inside an utterance: the caller paused here, so STT
    # may transcribe what came before it at once (speculative STT). On the utterance's END: the
    # caller has not spoken since the last such mark, so that transcript is the utterance's.
    PAUSE = 8
    # Caller audio: on a PAUSE mark, the transport asks for a speculative reply (STT sends its
    # transcript of the pause on to the next stage at once). Text: a transcript made at a pause,
    # before the turn's end is known: the reply to it is made but stored only once the
    # transport confirms the turn ended there (`turn_ended` on vm.ctl), and the transport
    # plays none of it before then.
    SPECULATE = 16


# Enum construction costs ~0.45 µs a call on 3.11: decode looks members up instead.
_KINDS = {k.value: k for k in Kind}
_FLAGS = {v: Flag(v) for v in range(32)}


class FrameError(VoicemeshError, ValueError):
    """Bytes that are not a frame of this protocol version."""


@dataclass(slots=True)
class Frame:
    kind: Kind
    payload: bytes = b""
    epoch: int = 0
    index: int = 0
    seq: int = 0
    flags: Flag = Flag.NONE
    sample_rate: int = 0
    channels: int = 0
    origin_ns: int = field(default_factory=time.time_ns)

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def audio(cls, pcm: bytes, *, sample_rate: int, channels: int = 1, **kw: Any) -> Frame:
        return cls(Kind.AUDIO, pcm, sample_rate=sample_rate, channels=channels, **kw)

    @classmethod
    def text(cls, text: str, **kw: Any) -> Frame:
        return cls(Kind.TEXT, text.encode(), **kw)

    @classmethod
    def event(cls, body: Event | dict[str, Any], **kw: Any) -> Frame:
        """An EVENT frame: a typed event (voicemesh/bus/events.py), or a raw JSON object."""
        data = body.wire_json() if isinstance(body, Event) else orjson.dumps(body)
        return cls(Kind.EVENT, data, **kw)

    # --- payload views -----------------------------------------------------------------------

    @property
    def as_text(self) -> str:
        return self.payload.decode()

    @property
    def as_event(self) -> dict[str, Any]:
        """The payload as a plain JSON object; receivers parse it into its typed event with
        `parse_ctl_event` or `parse_side_event` (voicemesh/bus/events.py)."""
        body = orjson.loads(self.payload)
        if not isinstance(body, dict):
            raise FrameError("event payload is not a JSON object")
        return body

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


def encode(frame: Frame) -> bytes:
    return (
        HEADER.pack(
            VERSION,
            frame.kind,
            frame.flags,
            frame.epoch,
            frame.index,
            frame.seq,
            frame.sample_rate,
            frame.channels,
            frame.origin_ns,
        )
        + frame.payload
    )


def decode(data: bytes) -> Frame:
    if len(data) < HEADER_SIZE:
        raise FrameError(
            f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header"
        )
    if len(data) - HEADER_SIZE > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(data) - HEADER_SIZE} bytes exceeds {MAX_PAYLOAD}")
    version, kind, flags, epoch, index, seq, rate, channels, origin = HEADER.unpack_from(data)
    if version != VERSION:
        raise FrameError(f"frame version {version}, expected {VERSION}")
    kind = _KINDS.get(kind)
    if kind is None:
        raise FrameError(f"unknown frame kind {data[1]}")
    payload = data[HEADER_SIZE:]
    if kind is Kind.AUDIO:
        if not (1 <= channels <= 8) or not (1000 <= rate <= 192_000):
            raise FrameError(f"audio frame with {channels} channels at {rate} Hz")
        if len(payload) % (2 * channels):
            raise FrameError(f"audio payload of {len(payload)} bytes is not whole PCM16 samples")
    elif kind is Kind.TEXT:
        try:
            payload.decode()
        except UnicodeDecodeError as exc:
            raise FrameError(f"text payload is not UTF-8 (bad byte at {exc.start})") from None
    else:  # an event: a JSON object, checked here so a handler never meets a bad one
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"event payload is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise FrameError("event payload is not a JSON object")
    flag = _FLAGS.get(flags)
    if flag is None:
        flag = Flag(flags)
    return Frame(kind, payload, epoch, index, seq, flag, rate, channels, origin)
