"""`POST /start`, the way pipecat's clients begin a call (`PipecatClient.startBotAndConnect`, the
prebuilt UI, pipecat's own runner): it makes a session and answers its id, and the client then
offers to `/sessions/{sessionId}/api/offer` (webrtc.py), sending the same headers as here.

    POST /start {createDailyRoom?, enableDefaultIceServers?, transport?, body?: {agent | config}}
         → {sessionId, iceConfig?: {iceServers: [{urls}]}}

`body` picks the agent the way `POST /api/sessions` does (a named agent, a whole config, or the
default agent), under the same rules: the API key (Authorization: Bearer, or X-API-Key, from the
client's `startBotParams.headers`) names the tenant that owns the session, another tenant's agent
does not exist, and each new session counts against the tenant's session rate. `iceConfig` lists
the session's STUN servers only: a TURN credential is resolved in the transport's environment and
never leaves it.

    POST /start {createDailyRoom: true, body?} → {dailyRoom, dailyToken, sessionId}

makes a Daily room and its tokens with Daily's REST API (DAILY_API_KEY in the transport's
environment; without it a 422 naming `createDailyRoom`, and no session is made), puts the bot in
it through the Daily carrier's own join (the call holds one of the tenant's call slots), and
answers the room and a non-owner token for the caller, which `@pipecat-ai/daily-transport` joins
with. A failure leaves no session behind.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from voicemesh.config.connectors import WebRTCTransportOptions
from voicemesh.config.models import AgentConfig, ConfigIssue, ConfigValidationError
from voicemesh.transport.api.agents import agent_for
from voicemesh.transport.api.security import ApiKeyAuth, Client, SessionRateLimit
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import CallSession
from voicemesh.transport.carriers.daily import DailyRooms


class StartBody(BaseModel):
    """What the client puts in `startBotParams.requestData` (pipecat's `body`)."""

    model_config = ConfigDict(extra="ignore")
    agent: str | None = Field(None, max_length=64)
    config: AgentConfig | None = None


class StartIn(BaseModel):
    """pipecat runner's /start body; fields it has that we do not use are ignored."""

    model_config = ConfigDict(extra="ignore")
    create_daily_room: bool = Field(
        False, validation_alias=AliasChoices("createDailyRoom", "create_daily_room")
    )
    enable_default_ice_servers: bool = Field(
        False,
        validation_alias=AliasChoices("enableDefaultIceServers", "enable_default_ice_servers"),
    )
    transport: Literal["webrtc", "daily"] | None = None
    body: StartBody | None = Field(None, validation_alias=AliasChoices("body", "requestData"))


def stun_servers(options: WebRTCTransportOptions) -> list[dict[str, Any]]:
    """The session's ICE servers a browser may be told: STUN URLs, no TURN (its credential is a
    secret of the transport's environment)."""
    urls = [u for u in options.ice_servers if u.lower().startswith(("stun:", "stuns:"))]
    return [{"urls": urls}] if urls else []


def start_router(
    service: TransportService,
    auth: ApiKeyAuth,
    limit: SessionRateLimit,
    call_session: CallSession,
    rooms: DailyRooms,
) -> APIRouter:
    router = APIRouter()

    @router.post("/start")
    async def start(body: StartIn | None = None, client: Client = Depends(auth)) -> dict[str, Any]:
        body = body or StartIn()
        daily = body.create_daily_room or body.transport == "daily"
        if daily and not body.create_daily_room:
            msg = (
                "a Daily call from /start needs createDailyRoom: true; to use a room of your "
                "own, start a bot in it with POST /api/daily/calls {room_url, agent | session_id}"
            )
            raise ConfigValidationError([ConfigIssue(loc=["createDailyRoom"], msg=msg)])
        if body.create_daily_room and (rooms.start is None or not service.settings.daily_api_key):
            # before a session is made: a request this deployment cannot serve leaves nothing
            msg = (
                "this transport makes no Daily rooms: it needs DAILY_API_KEY in its environment; "
                "or start a bot in your room with POST /api/daily/calls"
            )
            raise ConfigValidationError([ConfigIssue(loc=["createDailyRoom"], msg=msg)])
        if not service.capacity.ready:  # its call would be refused: make no session for it
            service.capacity.take()  # raises AtCapacity (503 with Retry-After), counted
        wanted = body.body or StartBody()
        store = service.store
        if wanted.agent and wanted.config:
            raise ConfigValidationError(
                [ConfigIssue(loc=["body", "agent"], msg="give an agent name or a config, not both")]
            )
        agent_name = None
        if wanted.config is not None:
            config = wanted.config
        else:
            record = await agent_for(store, wanted.agent, client)
            config, agent_name = record.config, record.name
        await limit.hit(store, client)
        stored = await store.create_session(config, agent=agent_name, owner=client.tenant.name)
        if daily:
            return await in_new_room(stored.session_id, client)
        answer: dict[str, Any] = {"sessionId": stored.session_id}
        if body.enable_default_ice_servers:
            options = config.transport_options("webrtc")
            assert isinstance(options, WebRTCTransportOptions)
            answer["iceConfig"] = {"iceServers": stun_servers(options)}
        return answer

    async def in_new_room(sid: str, client: Client) -> dict[str, Any]:
        try:
            assert rooms.start is not None  # checked before the session was made
            admitted = await call_session(sid, None, client)
            try:
                return await rooms.start(sid, admitted.slot, client)
            except BaseException:
                await admitted.slot.release()
                raise
        except BaseException:
            await service.store.delete_config(sid)  # made for this call: nothing left behind
            raise

    return router
