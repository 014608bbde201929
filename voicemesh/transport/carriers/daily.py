"""Daily rooms: a bot joins a room through pipecat's DailyTransport and the call runs there.

    POST   /api/daily/calls  {session_id | agent, room_url?, token?, join_timeout_s?}
           → 201 {session_id, room_url (as given: a "${NAME}" stays a name)}, once the bot is in
    DELETE /api/daily/calls/{session_id}  → the bot leaves

The room URL and meeting token come from the session's `daily` transport options unless the request
gives them; either may be a "${ENV}" reference, resolved from this process's environment. The token
(resolved or not) is never stored, answered, or logged: the request model holds it as a SecretStr
and join errors are scrubbed of it.

A tiny pipecat pipeline carries the audio: DailyTransport.input() → DailyBridge → .output(). The
bridge hands the caller's audio (whatever rate and channels Daily delivers) to the call as 16 kHz
mono PCM16, and pushes the call's paced 20 ms frames downstream as OutputAudioRawFrames; JSON events
go out as app messages, which Daily's client SDKs receive as `app-message`; a client that sends
RTVI's `client-ready` (pipecat's client-js with @pipecat-ai/daily-transport) gets RTVI messages
instead, and its RTVI app messages are answered (voicemesh/transport/call/rtvi.py). Barge-in
pushes an InterruptionFrame, which makes pipecat's output transport drop the audio it has buffered.

A join is bounded (`join_timeout_s` in the request, else the setting `daily_join_timeout_s` where
the settings have it, else 10 s): an unreachable room is a 502 naming the room URL and what to
check, and a session the request created is deleted again. The bot leaves when the last other
participant leaves, on DELETE, or when the call ends.

A bot's call belongs to the tenant that started it: for another tenant, POST with its session_id
and DELETE answer the 404 of a session that does not exist, and each call holds one of its
tenant's concurrent-call slots while it runs (429 when none is free).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from voicemesh.bus.events import CallerEvent
from voicemesh.config.connectors import DailyTransportOptions
from voicemesh.config.hosts import current_policy, url_problem
from voicemesh.config.models import ConfigIssue, ConfigValidationError
from voicemesh.config.secrets import (
    SecretResolutionError,
    credential_fields,
    is_secret_ref,
    resolve_credential,
)
from voicemesh.errors import VoicemeshError
from voicemesh.state import NotFound
from voicemesh.transport.api.security import ApiKeyAuth, Client
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import CallSession, owned
from voicemesh.transport.api.tenants import CallSlot
from voicemesh.transport.call.audio import RATE
from voicemesh.transport.call.call import Call
from voicemesh.transport.call.peer import Peer
from voicemesh.transport.call.rtvi import Rtvi

if TYPE_CHECKING:
    from pipecat.transports.daily.transport import DailyTransport

log = logging.getLogger(__name__)

#: how long leaving a room may hold up a DELETE or a shutdown; the rest finishes in the background
LEAVE_TIMEOUT_S = 5.0
OUT_RATE = 24000  # pipecat's default output rate; Daily's custom track takes any rate
MAX_INPUT_BYTES = 2 * 48000 * 2 * 2  # 2 s of 48 kHz stereo PCM16 in one frame: not a microphone

JOIN_HELP = (
    "check that the URL is right and the room exists and has not expired, that the meeting token "
    "(private rooms) is valid for this room, and that this host reaches *.daily.co over HTTPS "
    "and UDP"
)


class JoinFailed(VoicemeshError):
    """The bot could not get into the room; the message names the room, never the token."""


# --- the audio bridge -----------------------------------------------------------------------------


def mono(frame: InputAudioRawFrame) -> np.ndarray:
    """The frame's PCM16 samples as one channel (interleaved channels averaged)."""
    samples = np.frombuffer(frame.audio[: len(frame.audio) // 2 * 2], "<i2")
    channels = max(1, frame.num_channels)
    if channels > 1:
        samples = samples[: len(samples) // channels * channels]
        samples = samples.reshape(-1, channels).astype(np.int32).mean(axis=1).astype(np.int16)
    return samples


class DailyBridge(FrameProcessor):
    """Sits between pipecat's transport input and output: caller audio leaves the pipeline here
    for the call, bot audio and events enter it here."""

    def __init__(self, peer: DailyPeer):
        super().__init__(name="voicemesh-bridge")
        self.peer = peer

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and direction is FrameDirection.DOWNSTREAM:
            await self.peer.caller_audio(frame)
            return  # the call owns the caller's audio from here
        if isinstance(frame, InputTransportMessageFrame) and Rtvi.is_rtvi(frame.message):
            self.peer.app_message(frame.message)
            return  # an RTVI client's message (a Daily app message): the call answers it
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.peer.started.set()
        elif isinstance(frame, EndFrame | CancelFrame):
            self.peer.hang_up()


class DailyPeer(Peer):
    name = "daily"
    out_rate = OUT_RATE
    continuous = False  # Daily's custom audio track inserts silence by itself
    lead_frames = 2  # pipecat's output transport writes 40 ms chunks: keep one ready

    def __init__(self, *, rtvi_text_chars: int = 2000, rtvi_rate: float = 20.0) -> None:
        self.bridge = DailyBridge(self)
        self.rtvi = Rtvi(
            self._send_json, self.hang_up, max_text_chars=rtvi_text_chars, message_rate=rtvi_rate
        )
        self.started = asyncio.Event()  # the pipeline runs: frames may be pushed
        self._in: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._resamplers: dict[int, Any] = {}
        self._gone = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def caller_audio(self, frame: InputAudioRawFrame) -> None:
        if self._gone or not frame.audio:
            return
        if len(frame.audio) > MAX_INPUT_BYTES:
            log.warning(
                "Daily audio frame of %d bytes dropped (not a live stream)", len(frame.audio)
            )
            return
        pcm = mono(frame).tobytes()
        if frame.sample_rate != RATE:
            resampler = self._resamplers.get(frame.sample_rate)
            if resampler is None:  # a stream resampler per rate: 20 ms frames join cleanly
                resampler = self._resamplers[frame.sample_rate] = create_stream_resampler(
                    clear_after_secs=None
                )
            pcm = await resampler.resample(pcm, frame.sample_rate, RATE)
        if pcm:
            self._in.put_nowait(pcm)

    def hang_up(self) -> None:
        """The caller's side is over (left the room, DELETE, the pipeline stopped)."""
        if not self._gone:
            self._gone = True
            self._in.put_nowait(None)

    async def receive(self) -> bytes | None:
        if self._gone and self._in.empty():
            return None
        return await self._in.get()

    async def send_audio(self, pcm: bytes) -> None:
        if self.started.is_set() and not self._gone:
            await self.bridge.push_frame(
                OutputAudioRawFrame(audio=pcm, sample_rate=self.out_rate, num_channels=1)
            )

    async def deliver(self, event: CallerEvent) -> None:
        if self.started.is_set() and not self._gone and not await self.rtvi.deliver(event):
            await self._send_json(event.wire())  # not an RTVI client: our own JSON events

    async def _send_json(self, message: dict[str, Any]) -> None:
        if self.started.is_set() and not self._gone:
            await self.bridge.push_frame(OutputTransportMessageUrgentFrame(message=message))

    def app_message(self, message: Any) -> None:
        """An RTVI message from the room, handled beside the pipeline (a typed turn waits on
        Valkey and NATS, which must not hold up the room's audio)."""
        task = asyncio.create_task(self.rtvi.on_message(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def interrupted(self) -> None:
        if self.started.is_set() and not self._gone:
            task = asyncio.create_task(self.bridge.push_frame(InterruptionFrame()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def when_closed(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        self.hang_up()
        for closer in self._closers:
            await closer()


# --- the bot: pipeline, join, leave ---------------------------------------------------------------


class DailyBot:
    """One room's pipeline. `source` and `sink` are DailyTransport's input() and output() in
    production; anything that produces InputAudioRawFrames and takes OutputAudioRawFrames (a
    test's processors) runs the same bridge without the network."""

    def __init__(
        self,
        peer: DailyPeer,
        source: FrameProcessor,
        sink: FrameProcessor,
        *,
        room_url: str = "",
        transport: DailyTransport | None = None,
    ):
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker

        self.peer, self.room_url, self.transport = peer, room_url, transport
        self.worker = PipelineWorker(
            Pipeline([source, peer.bridge, sink]),
            params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=peer.out_rate),
            idle_timeout_secs=None,  # the call decides when it is over, not pipecat
            enable_rtvi=False,
            enable_turn_tracking=False,
            check_dangling_tasks=False,
            cancel_timeout_secs=LEAVE_TIMEOUT_S,
        )
        self._joined = asyncio.get_running_loop().create_future()
        if transport is None:
            self._joined.set_result(None)
        else:
            transport.event_handler("on_joined")(self._on_joined)
            transport.event_handler("on_error")(self._on_error)
            transport.event_handler("on_left")(self._on_left)
            transport.event_handler("on_participant_left")(self._on_participant_left)
        self._task: asyncio.Task[None] | None = None
        self.token = ""  # only to scrub it from error text

    async def _on_joined(self, _transport: Any, _data: Any) -> None:
        if not self._joined.done():
            self._joined.set_result(None)
        log.info("Daily bot joined %s", self.room_url)

    async def _on_error(self, _transport: Any, error: Any) -> None:
        text = str(error).replace(self.token, "***") if self.token else str(error)
        if not self._joined.done():
            self._joined.set_exception(JoinFailed(text))
        else:
            log.warning("Daily room %s: %s", self.room_url, text)

    async def _on_left(self, _transport: Any) -> None:
        self.peer.hang_up()

    async def _on_participant_left(self, transport: Any, participant: Any, _reason: Any) -> None:
        left = participant.get("id") if isinstance(participant, dict) else None
        others = [p for p in transport.participants() if p not in ("local", left)]
        if not others:
            log.info("the last participant left %s: the bot leaves too", self.room_url)
            self.peer.hang_up()

    async def join(self, timeout_s: float) -> None:
        """Start the pipeline and wait until the bot is in the room and frames flow; JoinFailed
        when that does not happen within `timeout_s` (then stop() the bot)."""
        from pipecat.workers.runner import WorkerRunner

        runner = WorkerRunner(handle_sigint=False, check_dangling_tasks=False)
        await runner.add_workers(self.worker)
        self._task = asyncio.create_task(runner.run(), name=f"daily-bot {self.room_url}")
        started = asyncio.ensure_future(self.peer.started.wait())
        try:
            async with asyncio.timeout(timeout_s):
                await self._joined
                done, _ = await asyncio.wait({started, self._task}, return_when="FIRST_COMPLETED")
                if started not in done:
                    raise JoinFailed("the bot's pipeline stopped before it started")
        except TimeoutError:
            raise JoinFailed(f"no answer within {timeout_s:g} s") from None
        finally:
            started.cancel()
            if not self._joined.done():
                self._joined.cancel()  # a late join error has no one to tell

    async def stop(self) -> None:
        """Leave the room and stop the pipeline. After a join that timed out this can take as
        long as daily-python's join takes to fail (pipecat's cleanup waits for it): callers
        bound their wait."""
        self.peer.hang_up()
        if self._task is None:
            return
        with contextlib.suppress(Exception):
            await self.worker.cancel(reason="voicemesh call over")
        await asyncio.wait({self._task})  # its outcome was logged by pipecat

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()


def daily_transport(
    room_url: str, token: str, options: DailyTransportOptions, peer: DailyPeer
) -> DailyTransport:
    """pipecat's DailyTransport set up for one audio-only bot (raises ImportError without the
    daily-python package)."""
    from pipecat.transports.daily.transport import DailyParams, DailyTransport

    params = DailyParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        audio_in_sample_rate=RATE,
        audio_in_channels=1,
        audio_out_sample_rate=peer.out_rate,
        audio_out_channels=1,
        audio_in_user_tracks=False,  # one mixed track of everyone else in the room
        camera_out_enabled=False,
        video_in_enabled=False,
        video_out_enabled=False,
    )
    return DailyTransport(room_url, token or None, options.bot_name, params)


# --- the API --------------------------------------------------------------------------------------


class DailyCallIn(BaseModel):
    """Start a bot in a room for an existing session, or for a new one from an agent (the default
    agent when neither is given)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    session_id: str | None = Field(None, max_length=100)
    agent: str | None = Field(None, max_length=64)
    room_url: str | None = Field(
        None, max_length=2000, description="overrides the session's; may be a ${ENV} reference"
    )
    token: SecretStr | None = Field(
        None, description="meeting token, overrides the session's; may be a ${ENV} reference"
    )
    join_timeout_s: float | None = Field(None, gt=0, le=120)


class DailyCallOut(BaseModel):
    session_id: str
    room_url: str


def _issue(field: str, msg: str) -> ConfigValidationError:
    return ConfigValidationError([ConfigIssue(loc=[field], msg=msg)])


def _resolve(field: str, value: str) -> str:
    """A room URL or token from the request or the config, "${NAME}" resolved when NAME is on the
    daily transport's allow-list (the same rule, and the same words, as for a stored config)."""
    spec = credential_fields(DailyTransportOptions)[field]
    try:
        return resolve_credential("transport", "daily", spec, value)
    except SecretResolutionError as exc:
        raise _issue(field, f"{exc} (of the transport process)") from None


def room_url_problem(url: str) -> str | None:
    """A room URL the bot may join: https, on the daily connector's egress allow-list
    (*.daily.co by default). Checked on the resolved value too: the bot sends the meeting token
    there. The message does not repeat the URL (it may come from the environment)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be a room URL such as https://your-domain.daily.co/room-name"
    return url_problem(url, "transport", "daily", ("https",), current_policy(), show=False)


#: how long a room made for POST /start, and its tokens, last
ROOM_TTL_S = 3600

#: (session, its call slot, client) → {dailyRoom, dailyToken, sessionId}: a new room, bot in it
NewRoom = Callable[[str, CallSlot, Client], Awaitable[dict[str, str]]]


@dataclass
class DailyRooms:
    """How `POST /start {createDailyRoom: true}` (api/start.py) gets a room with the bot in it;
    `daily_routes` fills `start` in, since the bots it starts are its own."""

    start: NewRoom | None = None


def daily_routes(
    service: TransportService,
    call_session: CallSession,
    auth: ApiKeyAuth,
    rooms: DailyRooms | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/api/daily")
    bots: dict[str, DailyBot] = {}
    calls: dict[str, asyncio.Task[None]] = {}
    tenants: dict[str, str] = {}  # session → the tenant whose call it is
    joining: set[str | None] = set()
    leaving: set[asyncio.Task[None]] = set()  # bots leaving a room: shutdown waits for them
    # bots whose join failed: nothing to leave, but pipecat's cleanup waits for daily-python's join
    # to fail by itself (up to ~20 s without DNS); only held here so the task is not collected
    abandoned: set[asyncio.Task[None]] = set()
    default_timeout = service.settings.daily_join_timeout_s

    def hold(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @router.post("/calls", status_code=201, response_model=DailyCallOut)
    async def start_call(body: DailyCallIn, client: Client = Depends(auth)) -> DailyCallOut:
        if body.session_id and body.agent:
            raise _issue("agent", "give a session_id or an agent, not both")
        if body.session_id:
            # whose session it is comes first: whether it has a bot is not another tenant's
            # business (owned() answers exactly as for a session that does not exist)
            await owned(service, body.session_id, client)
        if body.session_id in calls or body.session_id in joining:
            raise HTTPException(409, f"session {body.session_id} already has a bot in a room")
        admitted = await call_session(body.session_id, body.agent, client)
        sid = admitted.session_id
        joining.add(sid)
        try:
            return await join(sid, body, admitted.slot, client)
        except BaseException:
            await admitted.slot.release()
            if admitted.created:  # a session made for this bot goes with it
                with contextlib.suppress(Exception):
                    await service.store.delete_config(sid)
            raise
        finally:
            joining.discard(sid)

    async def join(sid: str, body: DailyCallIn, slot: CallSlot, client: Client) -> DailyCallOut:
        cached = await service.router.load(sid)
        options = cached.config.transport_options("daily")
        assert isinstance(options, DailyTransportOptions)
        given = body.room_url or options.room_url
        room_url = _resolve("room_url", given)
        # what is answered and logged is the URL as given: a "${NAME}" stays a name, so no
        # tenant reads a room URL that the operator keeps in the environment
        shown = given if is_secret_ref(given) else room_url
        if not room_url:
            raise _issue(
                "room_url",
                "no Daily room URL: give room_url in the request, or set "
                "connectors.transport.config.daily.room_url in the session's config",
            )
        if problem := room_url_problem(room_url):
            raise _issue("room_url", problem)
        token = body.token.get_secret_value() if body.token else options.token
        token = _resolve("token", token) if token else ""
        timeout = body.join_timeout_s or default_timeout

        peer = DailyPeer(
            rtvi_text_chars=service.settings.rtvi_max_text_chars,
            rtvi_rate=service.settings.rtvi_message_rate,
        )
        try:
            transport = daily_transport(room_url, token, options, peer)
        except ImportError as exc:
            raise HTTPException(
                501, f"Daily calls need daily-python (pip install 'pipecat-ai[daily]'): {exc}"
            ) from None
        bot = DailyBot(
            peer, transport.input(), transport.output(), room_url=shown, transport=transport
        )
        bot.token = token
        log.info("Daily bot joining %s for session %s", shown, sid)
        try:
            await bot.join(timeout)
        except BaseException as exc:
            hold(abandoned, asyncio.create_task(bot.stop()))  # not awaited: see DailyBot.stop
            if not isinstance(exc, JoinFailed):
                raise
            why = str(exc).replace(room_url, shown)  # daily-python's text may name the URL
            log.warning("Daily bot could not join %s: %s", shown, why)
            raise HTTPException(
                502, f"could not join the Daily room {shown}: {why}; {JOIN_HELP}"
            ) from None
        peer.when_closed(lambda: leave(bot))
        bots[sid] = bot
        tenants[sid] = client.tenant.name

        async def run() -> None:
            try:
                async with slot:
                    call = Call(service, sid, peer)
                    peer.rtvi.bind(call)
                    await call.run()
            finally:
                tenants.pop(sid, None)
                bots.pop(sid, None)
                calls.pop(sid, None)

        calls[sid] = asyncio.create_task(run(), name=f"daily-call {sid}")
        return DailyCallOut(session_id=sid, room_url=shown)

    async def new_room(sid: str, slot: CallSlot, client: Client) -> dict[str, str]:
        """Make a room and two tokens with Daily's REST API (pipecat's DailyRESTHelper), put the
        bot in with the owner token, and answer what pipecat's clients expect: the room and the
        caller's (non-owner) token."""
        key = service.settings.daily_api_key
        assert key is not None  # /start checks it before it makes the session
        import aiohttp
        from pipecat.transports.daily.utils import (
            DailyRESTHelper,
            DailyRoomParams,
            DailyRoomProperties,
        )

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
                rest = DailyRESTHelper(
                    daily_api_key=key.get_secret_value(),
                    daily_api_url=service.settings.daily_api_url,
                    aiohttp_session=http,
                )
                properties = DailyRoomProperties(exp=time.time() + ROOM_TTL_S)
                room = await rest.create_room(DailyRoomParams(properties=properties))
                caller = await rest.get_token(room.url, ROOM_TTL_S, owner=False)
                bot_token = await rest.get_token(room.url, ROOM_TTL_S, owner=True)
        except Exception as exc:  # Daily's words (its response body) stay in the log
            log.warning("Daily REST API could not make a room: %s", exc)
            raise HTTPException(
                502, "Daily's REST API did not make the room (the transport's log says why)"
            ) from None
        joining.add(sid)
        try:
            await join(
                sid, DailyCallIn(room_url=room.url, token=SecretStr(bot_token)), slot, client
            )
        finally:
            joining.discard(sid)
        return {"dailyRoom": room.url, "dailyToken": caller, "sessionId": sid}

    if rooms is not None:
        rooms.start = new_room

    async def leave(bot: DailyBot) -> None:
        """Bounded: a room that does not answer the leave is left in the background."""
        task = asyncio.create_task(bot.stop())
        hold(leaving, task)
        await asyncio.wait({task}, timeout=LEAVE_TIMEOUT_S)

    @router.delete("/calls/{session_id}")
    async def stop_call(session_id: str, client: Client = Depends(auth)) -> dict[str, str]:
        bot, task = bots.get(session_id), calls.get(session_id)
        if bot is None or task is None or not client.may_see(tenants.get(session_id, "")):
            raise NotFound(f"no Daily bot is in a room for session {session_id}")
        bot.peer.hang_up()  # the call ends, and its close leaves the room
        await asyncio.wait({task}, timeout=LEAVE_TIMEOUT_S + 1)
        return {"left": bot.room_url, "session_id": session_id}

    async def close_all() -> None:
        for bot in list(bots.values()):
            bot.peer.hang_up()
        pending = [*calls.values(), *leaving]
        if pending:
            await asyncio.wait(pending, timeout=LEAVE_TIMEOUT_S + 1)

    service.closers.append(close_all)
    return router
