"""`/api/sessions`, and the rule for which session a new call joins. A session is a per-call copy
of an agent's config that can change while the call runs (replace, or RFC 7396 merge-patch), and
every stage picks the change up on its next unit of work. The carriers admit a call through the
same code as the HTTP routes (call_sessions), so the ownership check, the tenant's limits and the
"not found" wording are one rule whatever carries the call.

A session belongs to the tenant whose key created it. For any other tenant it does not exist: every
route answers the same 404 as for an id that never existed, and listing leaves it out. Admin keys
see and change every session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Body, Depends, Header, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from voicemesh.config.models import (
    AgentConfig,
    ConfigIssue,
    ConfigValidationError,
    parse_agent_config,
)
from voicemesh.state.store import (
    Conflict,
    NotFound,
    StoredConfig,
    check_agent_name,
    check_session_id,
)
from voicemesh.transport.api.agents import agent_for
from voicemesh.transport.api.security import ApiKeyAuth, Client, SessionRateLimit
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.tenants import CallSlot, CallSlots


@dataclass
class Admission:
    """A call let in: the session it joins, whether it was made for it, and the call's slot in
    its tenant's count, which the carrier releases when the call ends (`async with slot`)."""

    session_id: str
    created: bool
    slot: CallSlot


#: the API's admission of a new call: (session_id, agent, client) → Admission; an existing session
#: of the client's, or a new one from the agent (the default agent when None). Raises NotFound
#: naming what is missing (another tenant's session is missing), RateLimited when the tenant runs
#: all the calls it may or opens sessions too fast.
CallSession = Callable[[str | None, str | None, Client], Awaitable[Admission]]


class SessionIn(BaseModel):
    """Start a session from a named agent, a raw config, or (neither) the default agent."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = Field(None, max_length=64)
    config: AgentConfig | None = None
    ttl_s: int | None = Field(None, ge=10, le=30 * 86400)


class AgentSwitch(BaseModel):
    """Switch a live session to another agent: its config is replaced by that agent's."""

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=64)

    @field_validator("agent")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_agent_name(name)  # a name no agent can have is refused at `agent` (422)


class TtlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: int = Field(ge=10, le=30 * 86400)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _config_json(config: AgentConfig) -> Any:
    return orjson.loads(config.to_json())


def expected_version(if_match: str | None) -> int | None:
    """The version an `If-Match` header names (`"7"`, `7` or `W/"7"`), None without one; a
    header that names no version is a 422 at `If-Match`."""
    if if_match is None:
        return None
    tag = if_match.strip().removeprefix("W/").strip('"')
    if not tag.isdigit() or len(tag) > 18:
        raise ConfigValidationError(
            [ConfigIssue(loc=["If-Match"], msg='If-Match names a session version, e.g. "7"')]
        )
    return int(tag)


def stale(session_id: str, had: int, now: int) -> Conflict:
    return Conflict(
        f"session {session_id} was changed by someone else: you edited version {had}, it is now "
        f"version {now}. Reload it and apply your change again."
    )


def not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id} not found or expired")


def session_ok(session_id: str) -> str:
    """A malformed id names no session: the same 404 as an expired one."""
    try:
        return check_session_id(session_id)
    except ValueError:
        raise not_found(session_id) from None


async def owned(service: TransportService, session_id: str, client: Client) -> str:
    """`session_id` if it exists for `client` (its own, or any for an admin); else the 404 of a
    session that does not exist, word for word."""
    owner = await service.store.get_owner(session_ok(session_id))
    if owner is None or not client.may_see(owner):
        raise not_found(session_id)
    return session_id


async def owned_config(service: TransportService, session_id: str, client: Client) -> StoredConfig:
    """The session's stored config, when it exists for `client` (else owned()'s 404)."""
    stored = await service.store.get_config(session_ok(session_id))
    if stored is None or not client.may_see(stored.owner):
        raise not_found(session_id)
    return stored


def session_json(stored: StoredConfig) -> dict[str, Any]:
    return {
        "session_id": stored.session_id,
        "version": stored.version,
        "agent": stored.agent,
        "owner": stored.owner,
        "ttl_s": max(1, round(stored.ttl_ms / 1000)),
        "created_ms": stored.created_ms,
        "config": _config_json(stored.config),
    }


def call_sessions(
    service: TransportService, limit: SessionRateLimit, slots: CallSlots
) -> CallSession:
    """The CallSession the carriers are given."""

    async def call_session(session_id: str | None, agent: str | None, client: Client) -> Admission:
        """Admit a call: this transport's capacity, the tenant's call slot (a refused call makes
        nothing), then an
        existing session of the client's, or a new one from an agent (the default agent when none
        is named; it counts against the session rate). The slot is given back if that fails."""
        # this transport's own count first: no Valkey round trip, and a full transport makes
        # nothing (no slot, no session) for a call it refuses
        service.capacity.take()
        try:
            admitted = await admit(session_id, agent, client)
        except BaseException:
            service.capacity.give()
            raise
        admitted.slot.also(service.capacity.give)
        return admitted

    async def admit(session_id: str | None, agent: str | None, client: Client) -> Admission:
        store = service.store
        if session_id:
            await owned(service, session_id, client)  # before a slot: a 404 holds nothing
            slot = await slots.acquire(client.tenant)
            return Admission(session_id, False, slot)
        record = await agent_for(store, agent, client)
        slot = await slots.acquire(client.tenant)
        try:
            await limit.hit(store, client)
            stored = await store.create_session(
                record.config, agent=record.name, owner=client.tenant.name
            )
        except BaseException:
            await slot.release()
            raise
        return Admission(stored.session_id, True, slot)

    return call_session


def sessions_router(
    service: TransportService, auth: ApiKeyAuth, limit: SessionRateLimit
) -> APIRouter:
    """The session routes, without prefix: create_app mounts them under its /api router, whose
    key dependency `auth` is (the same dependency here is cached: it runs once)."""
    router = APIRouter()
    store = lambda: service.store  # noqa: E731  (bound at request time, after lifespan start)

    @router.post("/sessions", status_code=201)
    async def create_session(
        body: SessionIn | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        body = body or SessionIn()
        if body.agent and body.config:
            raise ConfigValidationError(
                [ConfigIssue(loc=["agent"], msg="give an agent name or a config, not both")]
            )
        agent_name = None
        if body.config is not None:
            config = body.config
        else:
            record = await agent_for(store(), body.agent, client)
            config, agent_name = record.config, record.name
        await limit.hit(store(), client)
        stored = await store().create_session(
            config, ttl_s=body.ttl_s, agent=agent_name, owner=client.tenant.name
        )
        return {
            "session_id": stored.session_id,
            "version": stored.version,
            "agent": agent_name,
            "owner": stored.owner,
            "ttl_s": max(1, round(stored.ttl_ms / 1000)),
        }

    @router.get("/sessions")
    async def list_sessions(client: Client = Depends(auth)) -> dict[str, Any]:
        owner = None if client.admin else client.tenant.name
        return {"sessions": await store().list_configs(owner=owner)}

    @router.get("/sessions/{session_id}")
    async def get_session(
        session_id: str, response: Response, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        stored = await owned_config(service, session_id, client)
        response.headers["ETag"] = f'"{stored.version}"'  # for If-Match on PUT and PATCH
        return session_json(stored)

    async def still_at(session_id: str, client: Client, if_match: str | None) -> int | None:
        """The version `If-Match` names (None without one), once the caller's session is known
        to be still at it (else 409, naming both versions)."""
        had = expected_version(if_match)
        stored = await owned_config(service, session_id, client)
        if had is not None and had != stored.version:
            raise stale(session_id, had, stored.version)
        return had

    async def replace(
        session_id: str,
        client: Client,
        had: int | None,
        config: AgentConfig,
        agent: str | None = None,
    ) -> int:
        """Write the whole config (compare-and-set on `had`: a writer who got in between makes
        it a 409) and tell the stages; returns the new version."""
        try:
            version = await store().update_config(
                session_id, config, expect_version=had, agent=agent
            )
        except Conflict:
            current = await owned_config(service, session_id, client)
            raise stale(session_id, had or 0, current.version) from None
        await service.config_changed(session_id, version, ["*"])
        return version

    @router.put("/sessions/{session_id}/config")
    async def replace_config(
        session_id: str,
        config: AgentConfig,
        client: Client = Depends(auth),
        if_match: str | None = Header(None),
    ) -> dict[str, Any]:
        """With `If-Match: "<version>"` the write happens only if the session is still at that
        version (else 409, naming both versions)."""
        had = await still_at(session_id, client, if_match)
        version = await replace(session_id, client, had, config)
        return {"session_id": session_id, "version": version}

    @router.patch("/sessions/{session_id}/config")
    async def patch_config(
        session_id: str,
        patch: dict[str, Any] = Body(..., media_type="application/merge-patch+json"),
        client: Client = Depends(auth),
        if_match: str | None = Header(None),
    ) -> dict[str, Any]:
        """Without If-Match a concurrent writer makes us re-merge (the patch applies to whatever
        is current); with `If-Match: "<version>"` the patch applies to that version only, and a
        session changed since answers 409: an editor never overwrites a change it did not see."""
        had = expected_version(if_match)
        for attempt in range(10):  # compare-and-set: a concurrent writer makes us re-merge
            stored = await owned_config(service, session_id, client)
            if had is not None and had != stored.version:
                raise stale(session_id, had, stored.version)
            config = parse_agent_config(merge_patch(_config_json(stored.config), patch))
            try:
                version = await store().update_config(
                    session_id, config, expect_version=stored.version
                )
                break
            except Conflict:
                if attempt == 9:
                    raise
        await service.config_changed(session_id, version, sorted(patch))
        return {"session_id": session_id, "version": version}

    @router.put("/sessions/{session_id}/agent")
    async def switch_agent(
        session_id: str,
        body: AgentSwitch,
        client: Client = Depends(auth),
        if_match: str | None = Header(None),
    ) -> dict[str, Any]:
        """Replace the session's config by agent `body.agent`'s, as the caller's tenant sees it
        (its own agents, then the global ones: another tenant's agent is "not found", the same
        404 as a name nobody has), under the same If-Match rule as PUT .../config. The session
        keeps its id, TTL and conversation; the stages take the new config on their next unit
        of work, so the next turn is the new agent's."""
        had = await still_at(session_id, client, if_match)
        record = await agent_for(store(), body.agent, client)
        version = await replace(session_id, client, had, record.config, agent=record.name)
        return {"session_id": session_id, "version": version, "agent": record.name}

    @router.post("/sessions/{session_id}/ttl")
    async def extend_ttl(
        session_id: str, body: TtlIn, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        if not await store().extend_config_ttl(
            await owned(service, session_id, client), body.ttl_s
        ):
            raise not_found(session_id)
        return {"session_id": session_id, "ttl_s": body.ttl_s}

    @router.delete("/sessions/{session_id}")
    async def delete_session(session_id: str, client: Client = Depends(auth)) -> dict[str, Any]:
        if not await store().delete_config(await owned(service, session_id, client)):
            raise not_found(session_id)
        await service.session_deleted(session_id)
        return {"deleted": session_id}

    @router.get("/sessions/{session_id}/context")
    async def get_context(session_id: str, client: Client = Depends(auth)) -> dict[str, Any]:
        return {"messages": await store().get_context(await owned(service, session_id, client))}

    return router
