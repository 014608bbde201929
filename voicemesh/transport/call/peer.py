"""What a call needs from whatever carries it (a WebSocket, a WebRTC peer connection, a Twilio
media stream, a Daily room): caller audio in, bot audio and JSON events out (the typed caller
events of voicemesh/bus/events.py; a peer only chooses how to carry their JSON).

The call does everything else the same way on every transport: turn detection, the bus, ordering,
pacing, barge-in. A peer only converts: its codec and rate to 16 kHz PCM16 mono on the way in, and
20 ms PCM16 mono frames at `out_rate` to its codec on the way out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from voicemesh.bus.events import CallerEvent, Event, parse_caller_event
from voicemesh.transport.call.audio import RATE


class Peer(ABC):
    #: the transport connector name whose options (VAD, turns, jitter buffer...) the call reads
    name: ClassVar[str]
    #: the rate of the PCM16 mono frames `send_audio` takes
    out_rate: int = RATE
    #: a stream that must not stop (RTP): the call sends silence when the bot has nothing to say
    continuous: bool = False
    #: frames the call may send ahead of real time: a peer with its own playout buffer (a WebSocket
    #: client) absorbs network jitter with it; 0 for a peer that paces by itself
    lead_frames: int = 0
    #: called with every event once it is delivered (the call sets it: watchers get a copy on
    #: `vm.watch.<sid>`); it must not raise, a watcher never breaks a call
    tap: Callable[[CallerEvent], Awaitable[None]] | None = None

    @abstractmethod
    async def receive(self) -> bytes | None:
        """Caller audio as 16 kHz PCM16 mono (any length), or None once the caller has gone."""

    @abstractmethod
    async def send_audio(self, pcm: bytes) -> None:
        """One 20 ms frame of bot audio at `out_rate`, sent when it is due."""

    async def send_event(self, event: CallerEvent | Mapping[str, Any]) -> None:
        """A JSON event for the caller's client (transcripts, turns, latency, errors): one of
        voicemesh/bus/events.py's caller events. A plain mapping is checked against them first
        (EventError if it is not one)."""
        typed = event if isinstance(event, Event) else parse_caller_event(event)
        await self.deliver(typed)
        if self.tap is not None:
            await self.tap(typed)

    @abstractmethod
    async def deliver(self, event: CallerEvent) -> None:
        """Send one caller event the way this carrier carries JSON."""

    @abstractmethod
    def hang_up(self) -> None:
        """End the call from our side (its session was deleted): `receive()` returns None soon,
        after the events already sent have gone out."""

    def refuse(self, code: int, reason: str) -> None:
        """End the call from our side because the caller broke a limit, after the events already
        sent; a carrier with close codes (a WebSocket) closes with `code` and `reason`."""
        self.hang_up()

    def interrupted(self) -> None:
        """Bot audio was cut off: a peer that buffers audio of its own drops it now."""

    async def close(self) -> None:
        """The call is over: hang up and free what the peer holds."""
