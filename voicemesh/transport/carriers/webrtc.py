"""WebRTC calls on aiortc, signalled the way pipecat's SmallWebRTC runner does it, so pipecat's own
clients (and the web page at /) can call in: `POST /api/offer` {sdp, type, pc_id, restart_pc,
request_data: {agent | session_id}} → {sdp, type, pc_id, session_id}; `PATCH /api/offer` {pc_id,
candidates} for trickle ICE. The peer connection itself is pipecat's SmallWebRTCConnection.

Inbound Opus (decoded to 48 kHz mono on the loop, rtc.InlineDecoding) becomes 16 kHz mono 20 ms
frames for the bus; bot audio goes out as 48 kHz mono frames Opus-encoded here (rtc.OpusPackets),
one every 20 ms, silence between replies (RTP must not stop). JSON
events travel on the data channel the client opens. aiortc's receiver holds 80 ms of audio before
playing it (a jitter buffer with prefetch 4); a session sets its own with `jitter_buffer_ms`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

import soxr
from aiortc import sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import Packet
from fastapi import APIRouter, Depends, HTTPException
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from voicemesh.bus.events import CallerEvent, EventError, parse_caller_control
from voicemesh.config.connectors import WebRTCTransportOptions
from voicemesh.config.hosts import EgressError, check_egress
from voicemesh.config.secrets import SecretResolutionError, credential_fields, resolve_credential
from voicemesh.state import NotFound
from voicemesh.transport.api.security import ApiKeyAuth, Client
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import CallSession
from voicemesh.transport.api.tenants import CallSlot
from voicemesh.transport.call.audio import RATE
from voicemesh.transport.call.call import Call
from voicemesh.transport.call.peer import Peer
from voicemesh.transport.call.rtvi import Rtvi
from voicemesh.transport.carriers.rtc import (
    OPUS_RATE,
    OpusPackets,
    decode_inline,
    offer_loopback_candidates,
    set_jitter_buffer,
    to_16k_mono,
)

log = logging.getLogger(__name__)

FRAME_SAMPLES = OPUS_RATE // 50  # 20 ms
AIORTC_PREFETCH = 4  # what aiortc's RTCRtpReceiver holds by default: 80 ms


class BotAudioTrack(MediaStreamTrack):
    """The bot's voice: frames the call's pacer hands over every 20 ms, 48 kHz mono s16, given
    to aiortc already Opus-encoded (rtc.OpusPackets says why)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._frames: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)
        self._pts = 0
        self._opus = OpusPackets()

    def put(self, pcm: bytes) -> None:
        if self._frames.full():  # the sender stalled: keep the newest audio, not a backlog
            self._frames.get_nowait()
        self._frames.put_nowait(pcm)

    def flush(self) -> None:
        while not self._frames.empty():
            self._frames.get_nowait()

    async def recv(self) -> Packet:  # aiortc takes a Frame or an encoded Packet
        if self.readyState != "live":
            raise MediaStreamError
        while True:
            pcm = await self._frames.get()
            pts = self._pts
            self._pts += len(pcm) // 2
            packet = self._opus.encode(pcm, pts)
            if packet is not None:
                return packet


class WebRTCPeer(Peer):
    name = "webrtc"
    out_rate = OPUS_RATE
    continuous = True

    def __init__(
        self,
        connection: SmallWebRTCConnection,
        options: WebRTCTransportOptions,
        *,
        rtvi_text_chars: int = 2000,
        rtvi_rate: float = 20.0,
    ):
        self.connection = connection
        self.options = options
        self.rtvi = Rtvi(
            self._send_json, self.hang_up, max_text_chars=rtvi_text_chars, message_rate=rtvi_rate
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.track = BotAudioTrack()
        self._input: Any = None
        self._resampler: soxr.ResampleStream | None = None
        self._rate = 0
        self._gone = asyncio.Event()
        self._connected = asyncio.Event()

        for state in ("closed", "failed", "disconnected"):
            connection.event_handler(state)(self._on_gone)
        connection.event_handler("app-message")(self._on_message)
        connection.event_handler("connected")(self._on_connected)

    def attach(self) -> None:
        """Wire the tracks (after the offer was applied, before media flows)."""
        transceivers = self.connection.pc.getTransceivers()
        if not transceivers or transceivers[0].kind != "audio":
            raise ValueError("the offer has no audio transceiver first: add one (sendrecv)")
        set_jitter_buffer(transceivers[0].receiver, self.options.jitter_buffer_ms)
        decode_inline(transceivers[0].receiver)
        self.connection.replace_audio_track(self.track)
        self._input = self.connection.audio_input_track()
        self.connection.pc.on("datachannel", self._watch_channel)

    def _watch_channel(self, channel: Any) -> None:
        """pipecat's connection drops (and logs) a data-channel message that is not a JSON
        object with a type; an RTVI client is told, with an RTVI error, that it was refused."""

        def on_message(message: Any) -> None:
            problem = malformed(message)
            if problem is not None:
                task = asyncio.create_task(self.rtvi.malformed(problem))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        channel.on("message", on_message)

    async def _on_connected(self, _conn: Any) -> None:
        self._connected.set()
        log.info("WebRTC peer connected (%s)", self.connection.pc_id)

    async def hang_up_unless_connected(self, timeout_s: float) -> None:
        """End the call if ICE and DTLS have not completed within `timeout_s` of the answer. An
        offer costs nothing to send, and until then the call holds its session, a peer
        connection with its UDP ports, and a call slot; pipecat alone gives up after 60 s of
        "connecting", and never if the state never gets there."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            log.warning(
                "WebRTC peer %s not connected within %g s (VOICEMESH_WEBRTC_CONNECT_TIMEOUT_S): "
                "closed",
                self.connection.pc_id,
                timeout_s,
            )
            self._gone.set()  # receive() returns None: the call ends and close() frees the rest

    async def _on_gone(self, _conn: Any) -> None:
        self._gone.set()

    async def _on_message(self, _conn: Any, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if Rtvi.is_rtvi(message):
            await self.rtvi.on_message(message)
            return
        try:
            parse_caller_control(message)
        except EventError:
            return  # not ours: the data channel may carry the client's own messages
        self._gone.set()  # {"type": "end"}: the caller hung up

    async def receive(self) -> bytes | None:
        if self._input is None or self._gone.is_set():
            return None
        recv = asyncio.ensure_future(self._input.recv())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({recv, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not recv.done():
            recv.cancel()
            return None
        try:
            frame = recv.result()
        except MediaStreamError:
            return None
        if frame is None:
            return b""
        if self._resampler is None or frame.sample_rate != self._rate:
            self._rate = frame.sample_rate
            self._resampler = soxr.ResampleStream(self._rate, RATE, 1, dtype="int16")
        return to_16k_mono(frame, self._resampler)

    async def send_audio(self, pcm: bytes) -> None:
        self.track.put(pcm)

    async def deliver(self, event: CallerEvent) -> None:
        if not await self.rtvi.deliver(event):  # not an RTVI client: our own JSON events
            self.connection.send_app_message(event.wire())

    async def _send_json(self, message: dict[str, Any]) -> None:
        self.connection.send_app_message(message)

    def interrupted(self) -> None:
        self.track.flush()

    def hang_up(self) -> None:
        self._gone.set()

    async def close(self) -> None:
        self.track.stop()
        await self.connection.disconnect()


def malformed(message: Any) -> str | None:
    """Why a data-channel message is no JSON object with a `type` (None: it is one, or it is
    the client transport's "ping" keep-alive)."""
    if isinstance(message, str) and message.startswith("ping"):
        return None
    try:
        parsed = json.loads(message)
    except (ValueError, TypeError):
        return "not JSON"
    if not isinstance(parsed, dict):
        return "not a JSON object"
    if "type" not in parsed:
        return "no type"
    return None


def offer_problem(text: str) -> None:
    """A 400 naming what is wrong with an SDP offer that cannot start a call."""
    try:
        parsed = sdp.SessionDescription.parse(text)
    except Exception:
        raise HTTPException(400, "the SDP offer could not be parsed") from None
    if not parsed.media or parsed.media[0].kind != "audio":
        raise HTTPException(400, "the SDP offer has no audio first: add an audio transceiver")


def ice_key(options: WebRTCTransportOptions) -> tuple[str, ...]:
    return (*options.ice_servers, options.ice_username, options.ice_credential)


def ice_servers(options: WebRTCTransportOptions) -> list[IceServer]:
    """aiortc's ICE servers; the TURN credential is resolved from this process's environment
    here, and lives nowhere else."""
    if not options.ice_servers:
        return []
    check_egress("transport", "webrtc", options)  # as at push time: a stored config may be older
    spec = credential_fields(WebRTCTransportOptions)["ice_credential"]
    credential = resolve_credential("transport", "webrtc", spec, options.ice_credential) or None
    username = options.ice_username or None
    return [
        IceServer(urls=u, username=username, credential=credential) for u in options.ice_servers
    ]


class CallRequest(BaseModel):
    """What a caller asks for in `request_data`: a named agent, or a session to join."""

    model_config = ConfigDict(extra="ignore")
    agent: str | None = Field(None, max_length=100)
    session_id: str | None = Field(None, max_length=100)


class OfferIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    sdp: str = Field(..., min_length=1, max_length=100_000)
    type: Literal["offer"]
    pc_id: str | None = Field(None, max_length=200)
    restart_pc: bool | None = None
    request_data: CallRequest | None = Field(
        None, validation_alias=AliasChoices("request_data", "requestData")
    )


class CandidateIn(BaseModel):
    candidate: str = Field(..., max_length=1000)
    sdp_mid: str = Field(..., max_length=100, validation_alias=AliasChoices("sdp_mid", "sdpMid"))
    sdp_mline_index: int = Field(
        ..., ge=0, validation_alias=AliasChoices("sdp_mline_index", "sdpMLineIndex")
    )


class PatchIn(BaseModel):
    pc_id: str = Field(..., max_length=200)
    candidates: list[CandidateIn] = Field(..., max_length=50)


def webrtc_routes(
    service: TransportService, call_session: CallSession, auth: ApiKeyAuth
) -> APIRouter:
    if service.settings.webrtc_loopback:
        offer_loopback_candidates()
    router = APIRouter()
    handlers: dict[tuple[str, ...], SmallWebRTCRequestHandler] = {}
    calls: dict[str, asyncio.Task[None]] = {}

    # calls (answered or being answered) per ICE server list: a list's handler goes with its
    # last call, so configs naming ever new lists cannot grow `handlers` without end
    users: dict[tuple[str, ...], int] = {}

    def handler_for(options: WebRTCTransportOptions) -> SmallWebRTCRequestHandler:
        """One handler per ICE server list (most deployments have one): it keeps the peer
        connections by pc_id for renegotiation and trickle ICE."""
        key = ice_key(options)
        if key not in handlers:
            handlers[key] = SmallWebRTCRequestHandler(ice_servers=ice_servers(options))
        return handlers[key]

    def release(key: tuple[str, ...]) -> None:
        users[key] -= 1
        if users[key] <= 0:
            del users[key]
            handler = handlers.pop(key, None)
            if handler is not None:  # its connections have all ended; close() frees the rest
                log.info("no WebRTC call uses ICE servers %s now: their handler is closed", key)
                task = asyncio.create_task(handler.close())
                closing.add(task)  # held until done: a task only the loop holds may be lost
                task.add_done_callback(closing.discard)

    closing: set[asyncio.Task[None]] = set()

    # pc_id → (session, ice key, tenant): another tenant's peer connection does not exist for you
    sessions_of: dict[str, tuple[str, tuple[str, ...], str]] = {}

    def owns(pc_id: str, client: Client) -> bool:
        found = sessions_of.get(pc_id)
        return found is not None and client.may_see(found[2])

    @router.post("/api/offer")
    async def offer(body: OfferIn, client: Client = Depends(auth)) -> dict[str, Any]:
        return await offer_for(body, client)

    @router.post("/sessions/{session_id}/api/offer")
    async def session_offer(
        session_id: str, body: OfferIn, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        """pipecat's clients after `POST /start`: the offer for the session /start made."""
        if body.pc_id and owns(body.pc_id, client) and sessions_of[body.pc_id][0] != session_id:
            raise NotFound(f"peer connection {body.pc_id} not found")
        return await offer_for(body, client, session_id)

    async def offer_for(
        body: OfferIn, client: Client, session_id: str | None = None
    ) -> dict[str, Any]:
        request = SmallWebRTCRequest(
            sdp=body.sdp, type=body.type, pc_id=body.pc_id, restart_pc=body.restart_pc
        )
        if body.pc_id and owns(body.pc_id, client):  # renegotiation of a live call
            sid, key, _ = sessions_of[body.pc_id]
            answer = await handlers[key].handle_web_request(request, _no_new_call)
            assert answer is not None  # pipecat annotates `| None` but raises instead
            return {**answer, "session_id": sid}
        if body.pc_id:
            raise NotFound(f"peer connection {body.pc_id} not found (the call has ended)")
        offer_problem(body.sdp)  # before a session is made for it
        wanted = body.request_data or CallRequest()
        if session_id is not None:  # the path names the session: request_data cannot override it
            wanted = CallRequest(session_id=session_id)
        admitted = await call_session(wanted.session_id, wanted.agent, client)
        sid = admitted.session_id
        try:
            return await answer_call(sid, request, admitted.slot, client)
        except BaseException:
            await admitted.slot.release()
            if admitted.created:  # the session was made for this call: leave nothing behind
                await service.store.delete_config(sid)
                await service.session_deleted(sid)
            raise

    async def answer_call(
        sid: str, request: SmallWebRTCRequest, slot: CallSlot, client: Client
    ) -> dict[str, Any]:
        cached = await service.router.load(sid)
        options = cached.config.transport_options("webrtc")
        assert isinstance(options, WebRTCTransportOptions)
        key = ice_key(options)
        users[key] = users.get(key, 0) + 1
        try:
            return await answer_with(sid, request, slot, client, options, key)
        except BaseException:
            release(key)
            raise

    async def answer_with(
        sid: str,
        request: SmallWebRTCRequest,
        slot: CallSlot,
        client: Client,
        options: WebRTCTransportOptions,
        key: tuple[str, ...],
    ) -> dict[str, Any]:
        """Answer the offer and start its call, which releases `key` when it ends."""
        started: list[WebRTCPeer] = []
        refused: list[SmallWebRTCConnection] = []

        async def start_call(connection: SmallWebRTCConnection) -> None:
            peer = WebRTCPeer(
                connection,
                options,
                rtvi_text_chars=service.settings.rtvi_max_text_chars,
                rtvi_rate=service.settings.rtvi_message_rate,
            )
            try:
                peer.attach()
            except ValueError as exc:
                log.warning("WebRTC offer refused: %s", exc)
                refused.append(connection)
                return
            started.append(peer)
            await connection.connect()  # without it pipecat holds back data-channel messages

        try:
            handler = handler_for(options)
        except SecretResolutionError as exc:  # the transport's environment lacks the TURN secret
            raise HTTPException(503, f"WebRTC ICE servers: {exc}") from None
        except EgressError as exc:  # a config stored before the egress policy, or under another
            raise HTTPException(422, f"WebRTC ICE servers: {exc}") from None
        try:
            answer = await handler.handle_web_request(request, start_call)
        except Exception as exc:  # aiortc's words for a malformed offer
            raise HTTPException(400, f"the SDP offer could not be answered: {exc}") from None
        assert answer is not None  # pipecat annotates `| None` but raises instead
        if not started:
            for connection in refused:
                await connection.disconnect()
            raise HTTPException(400, "the offer has no audio transceiver: add one (sendrecv)")
        peer = started[0]
        pc_id = answer["pc_id"]
        sessions_of[pc_id] = (sid, key, client.tenant.name)

        async def run() -> None:
            watchdog = asyncio.create_task(
                peer.hang_up_unless_connected(service.settings.webrtc_connect_timeout_s)
            )
            try:
                async with slot:
                    call = Call(service, sid, peer)
                    peer.rtvi.bind(call)
                    await call.run()
            finally:
                watchdog.cancel()
                sessions_of.pop(pc_id, None)
                calls.pop(pc_id, None)
                release(key)

        calls[pc_id] = asyncio.create_task(run())
        log.info("WebRTC call %s on session %s", pc_id, sid)
        return {**answer, "session_id": sid}

    @router.patch("/api/offer")
    async def ice_candidates(body: PatchIn, client: Client = Depends(auth)) -> dict[str, str]:
        return await candidates_for(body, client)

    @router.patch("/sessions/{session_id}/api/offer")
    async def session_ice_candidates(
        session_id: str, body: PatchIn, client: Client = Depends(auth)
    ) -> dict[str, str]:
        return await candidates_for(body, client, session_id)

    async def candidates_for(
        body: PatchIn, client: Client, session_id: str | None = None
    ) -> dict[str, str]:
        if not owns(body.pc_id, client) or (
            session_id is not None and sessions_of[body.pc_id][0] != session_id
        ):
            raise NotFound(f"peer connection {body.pc_id} not found")
        _, key, _ = sessions_of[body.pc_id]
        patch = SmallWebRTCPatchRequest(
            pc_id=body.pc_id,
            candidates=[
                IceCandidate(c.candidate, c.sdp_mid, c.sdp_mline_index) for c in body.candidates
            ],
        )
        await handlers[key].handle_patch_request(patch)
        return {"status": "success"}

    service.closers.append(lambda: _close_all(handlers, calls))
    return router


async def _no_new_call(_connection: SmallWebRTCConnection) -> None:
    raise RuntimeError("renegotiation never starts a new call")


async def _close_all(
    handlers: dict[tuple[str, ...], SmallWebRTCRequestHandler], calls: dict[str, asyncio.Task[None]]
) -> None:
    for handler in handlers.values():
        await handler.close()
    for task in list(calls.values()):
        task.cancel()
    await asyncio.gather(*calls.values(), return_exceptions=True)
