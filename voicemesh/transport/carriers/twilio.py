"""Twilio Media Streams: a phone call's audio on a WebSocket, `/ws/twilio`, μ-law 8 kHz both ways.

Point a number's TwiML at it (docs/telephony.md):

    <Connect><Stream url="wss://HOST/ws/twilio">
      <Parameter name="agent" value="support"/>      (or name="session_id")
      <Parameter name="api_key" value="..."/>        (when VOICEMESH_AUTH is on)
    </Stream></Connect>

Twilio drops query strings from a <Stream> URL and sets no headers of ours, so the session and the
API key come in the `start` message's customParameters. An `Authorization`/`X-API-Key` header or
an `api_key` query parameter (a proxy in front, a test client) is checked first, before anything is
read, and then wins over the parameter.

Twilio sends `connected`, `start` (streamSid, callSid, customParameters, mediaFormat), `media`
(base64 μ-law 8 kHz, 20 ms a message), `mark` (a mark we sent has been played), `dtmf` and `stop`.
We send `media` (the bot's voice in 20 ms messages, paced in real time), `mark` every second of
audio (its echo tells how far behind Twilio's playback runs) and `clear` on barge-in, which drops
what Twilio has buffered. μ-law and base64 are pipecat's TwilioFrameSerializer's (auto hang-up off:
it would call Twilio's REST API); the message framing is ours, validated with pydantic.

Twilio has no channel for our JSON events: transcripts and turns are logged at debug, errors at
warning. A message we cannot use (not JSON, an unknown event, media before `start`, bad base64, a
foreign streamSid) is dropped with a warning naming the problem; the call goes on. `stop` or the
socket closing ends the call; the call ending (the session was deleted) closes the socket, and
Twilio moves on to the TwiML after <Connect>.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import time
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, WebSocket
from pipecat.frames.frames import InterruptionFrame, OutputAudioRawFrame
from pipecat.serializers.twilio import TwilioFrameSerializer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from voicemesh.bus.events import CallerEvent, ErrorEvent
from voicemesh.state import NotFound
from voicemesh.transport.api.security import (
    WS_RATE_LIMITED,
    WS_UNAUTHORIZED,
    ApiKeyAuth,
    Client,
    RateLimited,
    Unauthorized,
    key_id,
)
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import CallSession
from voicemesh.transport.call.audio import RATE
from voicemesh.transport.call.call import Call
from voicemesh.transport.call.peer import Peer

log = logging.getLogger(__name__)

TWILIO_RATE = 8000
ENCODING = "audio/x-mulaw"
#: Twilio sends 20 ms (160 bytes) a message; 2 s in one is not Twilio and is refused
MAX_MEDIA_BYTES = 2 * TWILIO_RATE
MAX_MESSAGE_CHARS = 64 * 1024
#: how long a stream may stay open without `start` before it is closed
START_TIMEOUT_S = 10.0
MARK_EVERY = 50  # audio messages (1 s) between two marks
MAX_PENDING_MARKS = 100
#: problems logged one by one per call; after that one line says the rest are only counted
MAX_LOGGED_PROBLEMS = 20
WS_NOT_FOUND = 4404
EVENTS = ("connected", "start", "media", "mark", "dtmf", "stop")
MISSING_KEY = (
    'missing API key: add <Parameter name="api_key" value="..."/> to the <Stream> '
    "(Twilio drops query strings from the stream URL)"
)


# --- Twilio's messages (only the fields we use; Twilio adds fields over time) -------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MediaFormat(_Msg):
    encoding: str = ENCODING
    sampleRate: int = TWILIO_RATE
    channels: int = 1


class StartBody(_Msg):
    streamSid: str = Field(min_length=1, max_length=64)
    callSid: str | None = Field(None, max_length=64)
    accountSid: str | None = Field(None, max_length=64)
    tracks: list[str] = Field(default_factory=list, max_length=4)
    customParameters: dict[str, str] = Field(default_factory=dict, max_length=50)
    mediaFormat: MediaFormat = Field(default_factory=MediaFormat)


class MediaBody(_Msg):
    payload: str = Field(max_length=MAX_MEDIA_BYTES * 4 // 3 + 4)
    track: str | None = None


class MarkBody(_Msg):
    name: str = Field(max_length=256)


class Connected(_Msg):
    event: Literal["connected"]


class Start(_Msg):
    event: Literal["start"]
    start: StartBody


class Media(_Msg):
    event: Literal["media"]
    streamSid: str | None = None
    media: MediaBody


class Mark(_Msg):
    event: Literal["mark"]
    streamSid: str | None = None
    mark: MarkBody


class Dtmf(_Msg):
    event: Literal["dtmf"]
    dtmf: dict[str, Any] = Field(default_factory=dict)


class Stop(_Msg):
    event: Literal["stop"]


TwilioMessage = Annotated[
    Connected | Start | Media | Mark | Dtmf | Stop, Field(discriminator="event")
]
_MESSAGE: TypeAdapter[Connected | Start | Media | Mark | Dtmf | Stop] = TypeAdapter(TwilioMessage)


def parse_message(text: str) -> Connected | Start | Media | Mark | Dtmf | Stop | str:
    """The message, or why it is not one we take (a sentence naming the problem, never the
    message's content: a `start` carries the API key)."""
    if len(text) > MAX_MESSAGE_CHARS:
        return f"message of {len(text)} characters is over the {MAX_MESSAGE_CHARS} limit"
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return f"message of {len(text)} characters is not JSON"
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return 'message is not a JSON object with an "event" string'
    event = data["event"]
    if event not in EVENTS:
        return f"unknown event {event[:40]!r}; Twilio Media Streams events are {', '.join(EVENTS)}"
    try:
        return _MESSAGE.validate_python(data)
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'message'}: {e['msg']}"
            for e in exc.errors(include_input=False)[:3]
        )
        return f"invalid {event!r} message ({where})"


def decode_payload(payload: str) -> bytes | str:
    """μ-law bytes of a media payload, or why it is not audio."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return "media payload is not valid base64"
    if len(data) > MAX_MEDIA_BYTES:
        return f"media payload of {len(data)} bytes is over {MAX_MEDIA_BYTES} (2 s of μ-law)"
    return data


class TwilioPeer(Peer):
    """One Media Stream. A single writer task owns the socket's send side; the pacer, the event
    senders and barge-in only queue, so a slow socket never stalls the call's clock."""

    name = "twilio"
    out_rate = TWILIO_RATE
    continuous = False  # Twilio plays what it has and waits: no silence needs sending
    lead_frames = 3  # Twilio buffers: a little ahead absorbs network jitter, `clear` drops it

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._hang_up: asyncio.Future[None] | None = None
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.parameters: dict[str, str] = {}
        self._serializer: TwilioFrameSerializer | None = None
        self._raw = ""  # the text of the message being handled
        self._out: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._sent_audio = 0
        self._marks: dict[str, float] = {}  # mark name → monotonic time it was sent
        self._mark_seq = 0
        #: seconds Twilio's playback trailed our send at the last echoed mark (None before one)
        self.playout_lag_s: float | None = None
        self.marks_played = 0
        self.problems = 0
        self.dtmf: list[str] = []

    # --- caller → call -----------------------------------------------------------------------

    async def wait_start(self, timeout_s: float | None = None) -> StartBody | None:
        """Read up to `start`: None if the stream closes, stops or stays silent first."""
        timeout_s = START_TIMEOUT_S if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    msg = await self._next()
                    if msg is None or isinstance(msg, Stop):
                        return None
                    if isinstance(msg, Start):
                        problem = await self._begin(msg.start)
                        if problem is None:
                            return msg.start
                        self._problem(problem)
                        return None
                    if isinstance(msg, Media | Mark | Dtmf):
                        self._problem(f"{msg.event} before start: dropped")
        except TimeoutError:
            log.warning("Twilio stream sent no start within %g s: closing it", timeout_s)
            return None

    async def _begin(self, start: StartBody) -> str | None:
        fmt = start.mediaFormat
        if (fmt.encoding, fmt.sampleRate, fmt.channels) != (ENCODING, TWILIO_RATE, 1):
            return (
                f"stream {start.streamSid} sends {fmt.encoding} {fmt.sampleRate} Hz "
                f"{fmt.channels} ch; only {ENCODING} {TWILIO_RATE} Hz mono is understood"
            )
        self.stream_sid, self.call_sid = start.streamSid, start.callSid
        # the API key stays in the start message, which the route reads once
        self.parameters = {k: v for k, v in start.customParameters.items() if k != "api_key"}
        self._serializer = TwilioFrameSerializer(
            start.streamSid,
            start.callSid,
            params=TwilioFrameSerializer.InputParams(
                twilio_sample_rate=TWILIO_RATE, sample_rate=RATE, auto_hang_up=False
            ),
        )
        # The serializer takes its input rate from the pipeline's setup, which only reads the
        # rate given here: there is no pipecat pipeline around it, so no StartFrame to pass.
        await self._serializer.setup(SimpleNamespace(audio_in_sample_rate=RATE))  # type: ignore[arg-type]
        return None

    async def receive(self) -> bytes | None:
        while True:
            msg = await self._next()
            if msg is None or isinstance(msg, Stop):
                if isinstance(msg, Stop):
                    log.info("Twilio stream %s stopped", self.stream_sid)
                return None
            if isinstance(msg, Media):
                pcm = await self._media(msg)
                if pcm:
                    return pcm
            elif isinstance(msg, Mark):
                self._mark_played(msg.mark.name)
            elif isinstance(msg, Dtmf):
                digit = str(msg.dtmf.get("digit", ""))[:4]
                self.dtmf.append(digit)
                log.debug("Twilio DTMF %r (not used)", digit)
            elif isinstance(msg, Start):
                self._problem("a second start on the same stream: ignored")

    async def _media(self, msg: Media) -> bytes | None:
        if msg.streamSid is not None and msg.streamSid != self.stream_sid:
            self._problem(f"media for another stream ({msg.streamSid[:64]!r}): dropped")
            return None
        if msg.media.track not in (None, "inbound", "inbound_track"):
            return None  # the bot's own voice, if the stream was asked for both tracks
        ulaw = decode_payload(msg.media.payload)
        if isinstance(ulaw, str):
            self._problem(ulaw)
            return None
        if not ulaw:
            return None
        assert self._serializer is not None
        # pipecat's serializer does μ-law → PCM16 and 8 → 16 kHz (a stream resampler, so 20 ms
        # messages join without clicks), from the message as received: validated above.
        frame = await self._serializer.deserialize(self._raw)
        return getattr(frame, "audio", None)

    async def _next(self) -> Connected | Start | Media | Mark | Dtmf | Stop | None:
        """The next message we understand, None once the socket is gone."""
        while True:
            try:
                raw = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if raw["type"] == "websocket.disconnect":
                return None
            if raw.get("text") is None:
                size = len(raw.get("bytes") or b"")
                self._problem(f"binary frame of {size} bytes: Media Streams messages are JSON text")
                continue
            self._raw = raw["text"]
            msg = parse_message(self._raw)
            if isinstance(msg, str):
                self._problem(msg)
                continue
            if isinstance(msg, Connected):
                log.debug("Twilio stream connected")
                continue
            return msg

    def _problem(self, what: str) -> None:
        self.problems += 1
        if self.problems <= MAX_LOGGED_PROBLEMS:
            log.warning("Twilio stream %s: %s", self.stream_sid or "(not started)", what)
        if self.problems == MAX_LOGGED_PROBLEMS:
            log.warning("Twilio stream %s: further bad messages are only counted", self.stream_sid)

    def _mark_played(self, name: str) -> None:
        sent = self._marks.pop(name, None)
        if sent is None:
            return  # a mark of someone else's: harmless
        self.marks_played += 1
        self.playout_lag_s = time.monotonic() - sent
        log.debug("Twilio played mark %s %.0f ms after it was sent", name, self.playout_lag_s * 1e3)

    # --- call → caller -----------------------------------------------------------------------

    async def send_audio(self, pcm: bytes) -> None:
        self._put("audio", pcm)
        self._sent_audio += 1
        if self._sent_audio % MARK_EVERY == 0:
            self._mark_seq += 1
            name = f"vm-{self._mark_seq}"
            self._marks[name] = time.monotonic()
            if len(self._marks) > MAX_PENDING_MARKS:  # a peer that never echoes marks
                del self._marks[next(iter(self._marks))]
            self._put("mark", name)

    async def deliver(self, event: CallerEvent) -> None:
        if isinstance(event, ErrorEvent):
            log.warning("call error on Twilio stream %s: %s", self.stream_sid, event.error)
        else:
            log.debug("event (no channel to Twilio): %s", event.type)

    def interrupted(self) -> None:
        """Drop the audio not yet written, then tell Twilio to drop what it buffers."""
        kept = [item for item in self._out if item[0] != "audio"]
        self._out.clear()
        self._out.extend(kept)
        self._put("clear", None)

    def _put(self, kind: str, item: Any) -> None:
        if self._closed or self.stream_sid is None:
            return
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        self._out.append((kind, item))
        self._wake.set()

    async def _write(self) -> None:
        assert self._serializer is not None
        while True:
            while not self._out:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            kind, item = self._out.popleft()
            if kind == "audio":
                text = await self._serializer.serialize(
                    OutputAudioRawFrame(audio=item, sample_rate=TWILIO_RATE, num_channels=1)
                )
            elif kind == "clear":
                text = await self._serializer.serialize(InterruptionFrame())
            else:
                text = orjson.dumps(
                    {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": item}}
                ).decode()
            if not text:
                continue
            try:
                await self.ws.send_text(str(text))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True
                return

    def hang_up(self) -> None:
        """Close the stream: Twilio goes on with the TwiML after <Connect>."""
        if self._hang_up is None:
            self._hang_up = asyncio.ensure_future(_close(self.ws, 1000))

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self.problems > MAX_LOGGED_PROBLEMS:
            log.warning(
                "Twilio stream %s: %d bad messages dropped in all", self.stream_sid, self.problems
            )
        await _close(self.ws, 1000)


async def _close(ws: WebSocket, code: int) -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        try:
            await ws.close(code=code)
        except (RuntimeError, OSError):
            pass


def twilio_routes(
    service: TransportService, call_session: CallSession, auth: ApiKeyAuth
) -> APIRouter:
    router = APIRouter()

    async def client_for(ws: WebSocket, parameter_key: str | None) -> Client:
        """A header or query key was checked before accepting; else the customParameter."""
        if not auth.required or auth.presented(ws) is not None:
            return await auth(ws)
        if not parameter_key:
            raise Unauthorized(MISSING_KEY)
        if not auth.matches(parameter_key):
            raise Unauthorized("invalid API key")
        return Client(key_id(parameter_key))

    @router.websocket("/ws/twilio")
    async def twilio_stream(ws: WebSocket) -> None:
        # Twilio only sees a closed socket: every refusal is logged, naming the stream.
        if auth.required and auth.presented(ws) is not None:
            await auth(ws)  # a wrong header/query key: the app answers 4401 before accepting
        await ws.accept()
        peer = TwilioPeer(ws)
        start = await peer.wait_start()
        if start is None:
            await _close(ws, 1000)
            return
        params = start.customParameters
        try:
            client = await client_for(ws, params.get("api_key"))
            sid = await call_session(params.get("session_id") or None, params.get("agent"), client)
        except Unauthorized as exc:
            log.warning("Twilio stream %s refused: %s", start.streamSid, exc.detail)
            await _close(ws, WS_UNAUTHORIZED)
            return
        except RateLimited as exc:
            log.warning("Twilio stream %s refused: %s", start.streamSid, exc.detail)
            await _close(ws, WS_RATE_LIMITED)
            return
        except NotFound as exc:
            log.warning(
                "Twilio stream %s refused: %s (set the <Parameter> agent or session_id)",
                start.streamSid,
                exc,
            )
            await _close(ws, WS_NOT_FOUND)
            return
        log.info("Twilio call %s, stream %s, on session %s", start.callSid, start.streamSid, sid)
        await Call(service, sid, peer).run()

    return router
