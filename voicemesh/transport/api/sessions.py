"""`/api/sessions`, and the rule for which session a new call joins. A session is a per-call copy
of an agent's config that can change while the call runs (replace, or RFC 7396 merge-patch), and
every stage picks the change up on its next unit of work. The carriers resolve a call's session
through the same code as the HTTP routes (call_sessions), so the session rate limit and the
"not found" wording are one rule whatever carries the call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel, ConfigDict, Field

from voicemesh.config.models import (
    AgentConfig,
    ConfigIssue,
    ConfigValidationError,
    parse_agent_config,
)
from voicemesh.state.store import Conflict, NotFound, check_session_id
from voicemesh.transport.api.security import ApiKeyAuth, Client, SessionRateLimit
from voicemesh.transport.api.service import TransportService

#: the API's resolver of the session a new call joins: (session_id, agent, client) → session id;
#: an existing session, or a new one from the agent (the default agent when None). Raises NotFound
#: naming what is missing, RateLimited when the client opens sessions too fast.
CallSession = Callable[[str | None, str | None, Client], Awaitable[str]]


class SessionIn(BaseModel):
    """Start a session from a named agent, a raw config, or (neither) the default agent."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = Field(None, max_length=64)
    config: AgentConfig | None = None
    ttl_s: int | None = Field(None, ge=10, le=30 * 86400)


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


def session_ok(session_id: str) -> str:
    """A malformed id names no session: the same 404 as an expired one."""
    try:
        return check_session_id(session_id)
    except ValueError:
        raise NotFound(f"session {session_id} not found") from None


def session_json(stored: Any) -> dict[str, Any]:
    return {
        "session_id": stored.session_id,
        "version": stored.version,
        "agent": stored.agent,
        "ttl_s": max(1, round(stored.ttl_ms / 1000)),
        "created_ms": stored.created_ms,
        "config": _config_json(stored.config),
    }


async def count_new_session(
    service: TransportService, limit: SessionRateLimit | None, client: Client
) -> None:
    if limit is not None:
        await limit.hit(service.store, client)


def call_sessions(service: TransportService, limit: SessionRateLimit | None) -> CallSession:
    """The CallSession the carriers are given."""

    async def call_session(session_id: str | None, agent: str | None, client: Client) -> str:
        """The session a new call joins: an existing one, or a new one from an agent (the default
        agent when none is named). NotFound names what is missing."""
        store = service.store
        if session_id:
            session_ok(session_id)
            if await store.get_config(session_id) is None:
                raise NotFound(f"session {session_id} not found or expired")
            return session_id
        record = await store.get_agent(agent) if agent else await store.get_default_agent()
        if record is None:
            raise NotFound(f"agent {agent!r} not found" if agent else "no default agent")
        await count_new_session(service, limit, client)
        return (await store.create_session(record.config, agent=record.name)).session_id

    return call_session


def sessions_router(
    service: TransportService, auth: ApiKeyAuth, limit: SessionRateLimit | None
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
            record = (
                await store().get_agent(body.agent)
                if body.agent
                else await store().get_default_agent()
            )
            if record is None:
                raise NotFound(
                    f"agent {body.agent!r} not found" if body.agent else "no default agent is set"
                )
            config, agent_name = record.config, record.name
        await count_new_session(service, limit, client)
        stored = await store().create_session(config, ttl_s=body.ttl_s, agent=agent_name)
        return {
            "session_id": stored.session_id,
            "version": stored.version,
            "agent": agent_name,
            "ttl_s": max(1, round(stored.ttl_ms / 1000)),
        }

    @router.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": await store().list_configs()}

    @router.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        stored = await store().get_config(session_ok(session_id))
        if stored is None:
            raise NotFound(f"session {session_id} not found or expired")
        return session_json(stored)

    @router.put("/sessions/{session_id}/config")
    async def replace_config(session_id: str, config: AgentConfig) -> dict[str, Any]:
        version = await store().update_config(session_ok(session_id), config)
        await service.config_changed(session_id, version, ["*"])
        return {"session_id": session_id, "version": version}

    @router.patch("/sessions/{session_id}/config")
    async def patch_config(
        session_id: str,
        patch: dict[str, Any] = Body(..., media_type="application/merge-patch+json"),
    ) -> dict[str, Any]:
        for attempt in range(10):  # compare-and-set: a concurrent writer makes us re-merge
            stored = await store().get_config(session_ok(session_id))
            if stored is None:
                raise NotFound(f"session {session_id} not found or expired")
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

    @router.post("/sessions/{session_id}/ttl")
    async def extend_ttl(session_id: str, body: TtlIn) -> dict[str, Any]:
        if not await store().extend_config_ttl(session_ok(session_id), body.ttl_s):
            raise NotFound(f"session {session_id} not found or expired")
        return {"session_id": session_id, "ttl_s": body.ttl_s}

    @router.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        if not await store().delete_config(session_ok(session_id)):
            raise NotFound(f"session {session_id} not found or expired")
        await service.session_deleted(session_id)
        return {"deleted": session_id}

    @router.get("/sessions/{session_id}/context")
    async def get_context(session_id: str) -> dict[str, Any]:
        if await store().get_version(session_ok(session_id)) is None:
            raise NotFound(f"session {session_id} not found or expired")
        return {"messages": await store().get_context(session_id)}

    return router
