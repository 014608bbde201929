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

Before the socket is accepted, the handshake's X-Twilio-Signature is checked with the account's
auth token (TWILIO_AUTH_TOKEN): base64(HMAC-SHA1(token, the URL Twilio requested)), the URL being
VOICEMESH_TWILIO_PUBLIC_URL + path when a proxy in front changes it. A missing or wrong signature
is refused at the handshake (HTTP 403): nothing of the peer's is read. With auth required and no
token configured, every stream is refused so; only with auth off and no token is the check
skipped (local tests). After the handshake a message over VOICEMESH_TWILIO_MAX_MESSAGE_BYTES, or
no `start` within VOICEMESH_TWILIO_START_TIMEOUT_S, closes the stream at once. The key in the
`start` message then names the tenant, and the session in customParameters must be that tenant's
(else the stream closes with 4404, as for a session that does not exist).

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
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from fastapi import APIRouter, WebSocket
from pipecat.frames.frames import InterruptionFrame, OutputAudioRawFrame
from pipecat.serializers.twilio import TwilioFrameSerializer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from voicemesh.bus.events import CallerEvent, ErrorEvent
from voicemesh.state import NotFound
from voicemesh.transport.api.capacity import WS_AT_CAPACITY, AtCapacity
from voicemesh.transport.api.security import (
    WS_RATE_LIMITED,
    WS_UNAUTHORIZED,
    ApiKeyAuth,
    Client,
    RateLimited,
    Unauthorized,
)
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import CallSession
from voicemesh.transport.call.audio import RATE
from voicemesh.transport.call.call import Call
from voicemesh.transport.call.peer import Peer

log = logging.getLogger(__name__)

TWILIO_RATE = 8000
ENCODING = "audio/x-mulaw"
#: Twilio sends 20 ms (160 bytes) a message; 1 s in one is not Twilio and is refused (and fits
#: under the message cap, so it is dropped with a warning rather than closing the stream)
MAX_MEDIA_BYTES = TWILIO_RATE
#: the default cap on one message (VOICEMESH_TWILIO_MAX_MESSAGE_BYTES): Twilio's media messages
#: are ~300 bytes and a `start` with its parameters a few KiB
MAX_MESSAGE_CHARS = 16 * 1024
#: how long a stream may stay open without `start` before it is closed (the default of
#: VOICEMESH_TWILIO_START_TIMEOUT_S): Twilio sends it right after `connected`
START_TIMEOUT_S = 5.0
WS_POLICY = 1008  # a handshake refused before accept goes out as HTTP 403
WS_TOO_BIG = 1009
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


# --- X-Twilio-Signature ---------------------------------------------------------------------


def twilio_signature(token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(auth token, the full URL + each POST
    parameter's name and value, sorted by name)). A WebSocket handshake is a GET: no parameters."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    mac = hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


_DEFAULT_PORTS = {"wss": 443, "https": 443, "ws": 80, "http": 80}


def signed_urls(ws: WebSocket, public_url: str | None) -> list[str]:
    """The URLs Twilio may have signed for this handshake: the public base URL (or the scheme and
    Host the request came with) + path + query, with and without the scheme's default port, as
    Twilio's own validator tries both."""
    path = ws.scope.get("path", "/")
    query = ws.scope.get("query_string", b"").decode("latin-1")
    if public_url:
        url = public_url.rstrip("/") + path
    else:
        scheme = "wss" if ws.scope.get("scheme") in ("wss", "https") else "ws"
        url = f"{scheme}://{ws.headers.get('host', '')}{path}"
    if query:
        url += "?" + query
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port
    default = _DEFAULT_PORTS.get(parts.scheme)
    shown = f"[{host}]" if ":" in host else host
    variants = [url]
    if port is None and default is not None:
        variants.append(urlunsplit(parts._replace(netloc=f"{shown}:{default}")))
    elif port == default:
        variants.append(urlunsplit(parts._replace(netloc=shown)))
    return variants


def signature_ok(ws: WebSocket, token: str, public_url: str | None) -> bool:
    """Whether the handshake's X-Twilio-Signature is Twilio's for this URL (constant time, and
    every variant compared)."""
    given = ws.headers.get("x-twilio-signature", "").encode()
    ok = False
    for url in signed_urls(ws, public_url):
        ok |= hmac.compare_digest(given, twilio_signature(token, url).encode())
    return ok and bool(given)


def parse_message(
    text: str, max_chars: int = MAX_MESSAGE_CHARS
) -> Connected | Start | Media | Mark | Dtmf | Stop | str:
    """The message, or why it is not one we take (a sentence naming the problem, never the
    message's content: a `start` carries the API key)."""
    if len(text) > max_chars:
        return f"message of {len(text)} characters is over the {max_chars} limit"
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
        return f"media payload of {len(data)} bytes is over {MAX_MEDIA_BYTES} (1 s of μ-law)"
    return data


class TwilioPeer(Peer):
    """One Media Stream. A single writer task owns the socket's send side; the pacer, the event
    senders and barge-in only queue, so a slow socket never stalls the call's clock."""

    name = "twilio"
    out_rate = TWILIO_RATE
    continuous = False  # Twilio plays what it has and waits: no silence needs sending
    lead_frames = 3  # Twilio buffers: a little ahead absorbs network jitter, `clear` drops it

    def __init__(self, ws: WebSocket, *, max_message: int = MAX_MESSAGE_CHARS):
        self.ws = ws
        self.max_message = max_message
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
            text = raw.get("text")
            size = len(raw.get("bytes") or b"") if text is None else len(text.encode())
            if size > self.max_message:
                # not Twilio: close at once rather than read on (and hold the socket) after it
                self._problem(f"message of {size} bytes, over the {self.max_message} limit: closed")
                await _close(self.ws, WS_TOO_BIG)
                return None
            if text is None:
                self._problem(f"binary frame of {size} bytes: Media Streams messages are JSON text")
                continue
            self._raw = text
            msg = parse_message(self._raw, self.max_message)
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
    settings = service.settings
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    if token is None and auth.required:
        log.warning(
            "TWILIO_AUTH_TOKEN is not set: /ws/twilio refuses every stream (it cannot tell "
            "Twilio from anyone else); set it to the Twilio account's auth token"
        )

    def handshake_problem(ws: WebSocket) -> str | None:
        """Why the handshake is not Twilio's (None: it is, or there is no token to tell)."""
        if token is None:
            return "TWILIO_AUTH_TOKEN is not set, and auth is required" if auth.required else None
        if not ws.headers.get("x-twilio-signature"):
            return "no X-Twilio-Signature header"
        if not signature_ok(ws, token, settings.twilio_public_url):
            return (
                "X-Twilio-Signature does not match (if a proxy is in front, set "
                "VOICEMESH_TWILIO_PUBLIC_URL to the wss:// base URL Twilio connects to)"
            )
        return None

    def parameter_client(parameter_key: str | None) -> Client:
        if not parameter_key:
            raise Unauthorized(MISSING_KEY)
        client = auth.identify(parameter_key)
        if client is None:
            raise Unauthorized("invalid API key")
        return client

    @router.websocket("/ws/twilio")
    async def twilio_stream(ws: WebSocket) -> None:
        # Twilio only sees a closed socket: every refusal is logged, naming the stream.
        problem = handshake_problem(ws)
        if problem is not None:  # refused before accept: an HTTP 403, nothing read
            where = ws.client.host if ws.client else "unknown"
            log.warning("Twilio stream from %s refused at the handshake: %s", where, problem)
            await ws.close(code=WS_POLICY)
            return
        client: Client | None = None
        if not auth.required or auth.presented(ws) is not None:
            # a wrong header/query key (or, auth off, a foreign Origin): the app's 4401/4403
            client = await auth(ws)
        await ws.accept()
        peer = TwilioPeer(ws, max_message=settings.twilio_max_message_bytes)
        start = await peer.wait_start(settings.twilio_start_timeout_s)
        if start is None:
            await _close(ws, 1000)
            return
        params = start.customParameters
        try:
            client = client or parameter_client(params.get("api_key"))
            admitted = await call_session(
                params.get("session_id") or None, params.get("agent"), client
            )
        except Unauthorized as exc:
            log.warning("Twilio stream %s refused: %s", start.streamSid, exc.detail)
            await _close(ws, WS_UNAUTHORIZED)
            return
        except RateLimited as exc:
            log.warning("Twilio stream %s refused: %s", start.streamSid, exc.detail)
            await _close(ws, WS_RATE_LIMITED)
            return
        except AtCapacity as exc:
            log.warning("Twilio stream %s refused: %s", start.streamSid, exc.detail)
            await _close(ws, WS_AT_CAPACITY)
            return
        except NotFound as exc:  # also another tenant's session: the same words, the same code
            log.warning(
                "Twilio stream %s refused: %s (set the <Parameter> agent or session_id)",
                start.streamSid,
                exc,
            )
            await _close(ws, WS_NOT_FOUND)
            return
        sid = admitted.session_id
        log.info("Twilio call %s, stream %s, on session %s", start.callSid, start.streamSid, sid)
        async with admitted.slot:
            await Call(service, sid, peer).run()

    return router
