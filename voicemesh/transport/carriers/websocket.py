"""WebSocket calls, `/ws/call`: the simplest carrier, PCM16 mono 16 kHz both ways and JSON events
as text frames, for the CLI caller, the web page and any client that can open a socket.

Frames from the client: binary = PCM16 mono 16 kHz, raw (any even chunk size up to
MAX_AUDIO_MESSAGE); text = JSON control ({"type": "end"} hangs up). Frames to the client: binary =
PCM16 mono 16 kHz, paced in real time (a few frames ahead, for the client's jitter buffer); text =
JSON events; {"type": "interrupted"} means drop the bot audio not yet played. A message in another
format (an odd byte count, a WAV file, an oversized chunk, text that is not a known control message)
is dropped whole with an `error` event naming the expected format; the call goes on.

Limits on the socket itself: a message over VOICEMESH_WS_MAX_BYTES (64 KiB) is refused by the
WebSocket layer below the app, from the frame's length before its payload is read: the socket is
closed with 1009 and the close reason names the limit (no event can precede it, since no app code
sees such a message). Audio faster than VOICEMESH_CALLER_AUDIO_MAX_RATE times real time ends the
call with an `error` event and close code 4429 (call/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Depends
from starlette.websockets import WebSocket, WebSocketDisconnect

from voicemesh.bus.events import CHANNELS, CallerEvent, ErrorEvent, EventError, parse_caller_control
from voicemesh.state import NotFound
from voicemesh.transport.api.security import ApiKeyAuth, Client
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import CallSession
from voicemesh.transport.call.audio import RATE
from voicemesh.transport.call.call import Call
from voicemesh.transport.call.peer import Peer

log = logging.getLogger(__name__)

AUDIO_FORMAT = "PCM16 mono 16 kHz, raw, no WAV header"
#: the close code of a message over VOICEMESH_WS_MAX_BYTES, sent by the WebSocket layer
MESSAGE_TOO_BIG = 1009
# 2 s of audio: browsers send 20-100 ms a message; more in one message is a client bug (a whole
# file) that would otherwise run through VAD and onto the bus as one long utterance at once.
MAX_AUDIO_MESSAGE = 2 * RATE * 2
#: malformed messages a call answers with an error event before it hangs up (1008): each answer
#: is queued for a client that may never read, and a bad message spends no audio rate
MAX_BAD_MESSAGES = 50
POLICY_VIOLATION = 1008
#: items the writer may hold for a client that does not read: ~10 s of bot audio and its events;
#: past that the item is dropped (and the call hung up) rather than held in memory
MAX_QUEUED = 600
CONTROL_TYPES = tuple(m.model_fields["type"].default for m in CHANNELS["caller control"])


@dataclass(frozen=True, slots=True)
class _Close:
    """The writer's marker: close the socket after what was queued before it."""

    code: int
    reason: str


def audio_problem(data: bytes) -> str | None:
    """Why a binary message from the peer is not audio this call takes (None: it is)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return f"binary messages must be audio as {AUDIO_FORMAT}: this one is a WAV file"
    if len(data) % 2:
        return (
            f"binary message of {len(data)} bytes is not whole samples: "
            f"send audio as {AUDIO_FORMAT} (2 bytes a sample)"
        )
    if len(data) > MAX_AUDIO_MESSAGE:
        return (
            f"binary message of {len(data)} bytes is over the {MAX_AUDIO_MESSAGE}-byte limit: "
            f"send audio as {AUDIO_FORMAT}, in chunks of 20-100 ms"
        )
    return None


class WebSocketPeer(Peer):
    """One writer task owns the socket's send side: the pacer and event senders only queue."""

    name = "websocket"
    out_rate = RATE
    lead_frames = 3

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._out: asyncio.Queue[bytes | str | _Close | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._bad = 0
        self._overflowed = False

    async def receive(self) -> bytes | None:
        while True:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if msg["type"] == "websocket.disconnect":
                if msg.get("code") == MESSAGE_TOO_BIG:  # closed below us, by uvicorn's limit
                    log.warning("caller sent a message over VOICEMESH_WS_MAX_BYTES: closed (1009)")
                return None
            if self._overflowed:
                return None  # the client reads nothing of what is sent: hung up
            if msg.get("bytes") is not None:
                problem = audio_problem(msg["bytes"])
                if problem is None:
                    return msg["bytes"]
            elif msg.get("text") is not None:
                problem = control_problem(msg["text"])
                if problem is None:
                    return None  # {"type": "end"}: the caller hangs up
            else:
                continue
            self._bad += 1
            if self._bad > MAX_BAD_MESSAGES:
                log.warning("caller sent %d malformed messages: hung up", self._bad)
                await self.send_event(
                    ErrorEvent(error=f"more than {MAX_BAD_MESSAGES} malformed messages: hung up")
                )
                self.refuse(POLICY_VIOLATION, "too many malformed messages")
                return None
            await self.send_event(ErrorEvent(error=problem))

    async def send_audio(self, pcm: bytes) -> None:
        self._put(pcm)

    async def deliver(self, event: CallerEvent) -> None:
        self._put(event.wire_json().decode())

    def _put(self, item: bytes | str | _Close) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        if self._out.qsize() >= MAX_QUEUED and not isinstance(item, _Close):
            if not self._overflowed:
                log.warning("the caller reads nothing of what is sent: dropping, hanging up")
                self._overflowed = True
            return
        self._out.put_nowait(item)

    def hang_up(self) -> None:
        self._put(_Close(4404, "session deleted"))

    def refuse(self, code: int, reason: str) -> None:
        self._put(_Close(code, reason))

    async def _write(self) -> None:
        while (item := await self._out.get()) is not None:
            try:
                if isinstance(item, _Close):
                    await self.ws.close(code=item.code, reason=item.reason)
                    return
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                elif isinstance(item, str):
                    await self.ws.send_text(item)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return

    async def close(self) -> None:
        if self._writer is not None:
            self._out.put_nowait(None)
            await asyncio.gather(self._writer, return_exceptions=True)


def control_problem(text: str) -> str | None:
    """Why a text message is not a control message this call takes (None: it is `end`)."""
    try:
        ctl = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "text frames must be JSON"
    try:
        parse_caller_control(ctl)
        return None
    except EventError:
        pass
    known = ", ".join(f'{{"type": "{t}"}}' for t in CONTROL_TYPES)
    return f"unknown control message {text[:100]!r}; text frames are JSON control messages: {known}"


def websocket_routes(
    service: TransportService, call_session: CallSession, auth: ApiKeyAuth
) -> APIRouter:
    """`/ws/call?session_id=...|agent=...`: joins a session (or makes one from the agent) and runs
        the call until either side hangs up. A session that cannot be found (or is another tenant's)
    closes with 4404; a tenant over its call or session limit, with 4429 (on_rate_limited)."""
    router = APIRouter(dependencies=[Depends(auth)])

    @router.websocket("/ws/call")
    async def ws_call(
        ws: WebSocket,
        session_id: str | None = None,
        agent: str | None = None,
        client: Client = Depends(auth),  # the router's dependency, cached: runs once
    ) -> None:
        await ws.accept()
        try:
            admitted = await call_session(session_id, agent, client)
        except NotFound as exc:  # also another tenant's session: the same words, the same code
            await ws.send_text(ErrorEvent(error=str(exc)).wire_json().decode())
            await ws.close(code=4404)
            return
        async with admitted.slot:
            await Call(service, admitted.session_id, WebSocketPeer(ws)).run()

    return router
