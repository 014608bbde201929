"""The NATS side of voicemesh: the wire codec, the Bus, the subject names, and the typed JSON
events (events.py) that cross it and reach the caller.

A room of its own so that everything that only speaks frames (the transport, the bench, a
stage) can depend on it without pulling in the store or the router; it depends on config alone.
"""

from voicemesh.bus.bus import Bus, BusError
from voicemesh.bus.codec import Flag, Frame, FrameError, Kind, decode, encode
from voicemesh.bus.subjects import Subjects, trace_id

__all__ = [
    "Bus",
    "BusError",
    "Flag",
    "Frame",
    "FrameError",
    "Kind",
    "Subjects",
    "decode",
    "encode",
    "trace_id",
]
