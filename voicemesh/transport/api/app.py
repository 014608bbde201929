"""The config-manager HTTP API (FastAPI) and the WebSocket call endpoint.

Agents are named templates (no TTL, one default); a session copies an agent's config (or takes a
raw one) at creation and is then changed on its own: replace (PUT) or merge-patch (PATCH, RFC 7396)
its config while a call is open, and the stages apply it on their next unit of work.

/api and /ws/call need an API key (security.py) unless VOICEMESH_AUTH=off; /healthz, /metrics,
the page at / and the OpenAPI docs stay open. New sessions count against
VOICEMESH_SESSION_RATE per client.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import make_asgi_app
from pydantic import BaseModel, ConfigDict, Field

from voicemesh.bus.bus import BusError
from voicemesh.config.logging import redact_logger
from voicemesh.config.models import (
    AgentConfig,
    ConfigIssue,
    ConfigValidationError,
    parse_agent_config,
)
from voicemesh.state.store import Conflict, NotFound, StoreError, check_agent_name, check_session_id
from voicemesh.transport.api.security import (
    ApiKeyAuth,
    Client,
    RateLimited,
    SessionRateLimit,
    Unauthorized,
    on_rate_limited,
    on_unauthorized,
)
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.carriers.daily import daily_routes
from voicemesh.transport.carriers.twilio import twilio_routes
from voicemesh.transport.carriers.webrtc import webrtc_routes
from voicemesh.transport.carriers.websocket import websocket_routes

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class AgentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=2000)
    config: AgentConfig
    default: bool = False


class AgentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=2000)
    config: AgentConfig


class SessionIn(BaseModel):
    """Start a session from a named agent, a raw config, or (neither) the default agent."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = Field(None, max_length=64)
    config: AgentConfig | None = None
    ttl_s: int | None = Field(None, ge=10, le=30 * 86400)


class TtlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: int = Field(ge=10, le=30 * 86400)


class IssueOut(BaseModel):
    loc: list[str | int] = Field(description="JSON path of the problem, as a list")
    path: str = Field(description='the same path, dotted: "connectors.llm.fallback[1]"')
    msg: str


class IssuesOut(BaseModel):
    """What a 422 carries: every problem of the request, each named by its path."""

    detail: list[IssueOut]


class ErrorOut(BaseModel):
    detail: str


# The error bodies this API really sends (FastAPI would document its own 422 shape otherwise).
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "not found (or the session expired)"},
    409: {"model": ErrorOut, "description": "conflict (the name is taken, or a concurrent write)"},
    422: {"model": IssuesOut, "description": "invalid request: each issue names its JSON path"},
}


def _issues(issues: list[ConfigIssue]) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": i.loc, "path": i.path, "msg": i.msg} for i in issues]},
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


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


def create_app(service: TransportService) -> FastAPI:
    """Raises AuthConfigError when auth is required and no key is configured."""
    auth = ApiKeyAuth(service.settings)
    limit = SessionRateLimit.from_settings(service.settings)
    if auth.required:
        log.info("API keys required on /api and /ws/call (%d configured)", auth.key_count)
    else:
        log.warning("API auth is off (VOICEMESH_AUTH=off): anyone who reaches this port can use it")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        redact_logger(name)  # uvicorn logs a WebSocket's query string, where ?api_key= may be

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        try:
            await service.start()
        except (BusError, StoreError) as exc:
            log.error("transport cannot start: %s", exc)
            raise
        yield
        await service.stop()

    app = FastAPI(title="voicemesh transport", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    # One dependency on each protected router: every route below them needs a key.
    api = APIRouter(prefix="/api", dependencies=[Depends(auth)], responses=ERRORS)
    app.add_exception_handler(Unauthorized, on_unauthorized)  # type: ignore[arg-type]
    app.add_exception_handler(RateLimited, on_rate_limited)  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        issues = []
        for err in exc.errors():
            loc = (
                list(err.get("loc", ()))[1:]
                if err.get("loc", ("",))[0] == "body"
                else list(err.get("loc", ()))
            )
            ctx = err.get("ctx") or {}
            if err.get("type") == "agent_config" and "issues" in ctx:
                issues += [ConfigIssue(loc=[*loc, *i["loc"]], msg=i["msg"]) for i in ctx["issues"]]
            else:
                issues.append(ConfigIssue(loc=loc, msg=err.get("msg", "invalid")))
        return _issues(issues)

    @app.exception_handler(ConfigValidationError)
    async def _invalid_config(_: Request, exc: ConfigValidationError) -> JSONResponse:
        return _issues(exc.issues)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return _error(409, str(exc))

    store = lambda: service.store  # noqa: E731  (bound at request time, after lifespan start)

    def name_ok(name: str) -> str:
        try:
            return check_agent_name(name)
        except ValueError as exc:
            raise ConfigValidationError([ConfigIssue(loc=["name"], msg=str(exc))]) from None

    def session_ok(session_id: str) -> str:
        try:
            return check_session_id(session_id)
        except ValueError:
            raise NotFound(f"session {session_id} not found") from None

    # --- agents (seed 004) -------------------------------------------------------------------

    @api.get("/agents")
    async def list_agents() -> dict[str, Any]:
        default = await store().get_default_agent()
        agents = await store().list_agents()
        return {
            "default": default.name if default else None,
            "agents": [a.to_json() for a in agents],
        }

    @api.post("/agents", status_code=201)
    async def create_agent(body: AgentIn) -> dict[str, Any]:
        record = await store().create_agent(
            name_ok(body.name), body.config, description=body.description
        )
        if body.default:
            await store().set_default_agent(record.name)
        return record.to_json()

    @api.get("/agents/current")
    async def current_agent() -> dict[str, Any]:
        record = await store().get_default_agent()
        if record is None:
            raise NotFound("no default agent is set")
        return record.to_json()

    @api.get("/agents/{name}")
    async def get_agent(name: str) -> dict[str, Any]:
        record = await store().get_agent(name)
        if record is None:
            raise NotFound(f"agent {name!r} not found")
        return record.to_json()

    @api.put("/agents/{name}")
    async def update_agent(name: str, body: AgentUpdate) -> dict[str, Any]:
        record = await store().update_agent(
            name_ok(name), body.config, description=body.description
        )
        return record.to_json()

    @api.delete("/agents/{name}")
    async def delete_agent(name: str) -> dict[str, Any]:
        if not await store().delete_agent(name):
            raise NotFound(f"agent {name!r} not found")
        return {"deleted": name}

    @api.post("/agents/{name}/set-default")
    async def set_default(name: str) -> dict[str, Any]:
        await store().set_default_agent(name)
        return {"default": name}

    # --- sessions ----------------------------------------------------------------------------

    def session_json(stored: Any) -> dict[str, Any]:
        return {
            "session_id": stored.session_id,
            "version": stored.version,
            "agent": stored.agent,
            "ttl_s": max(1, round(stored.ttl_ms / 1000)),
            "created_ms": stored.created_ms,
            "config": _config_json(stored.config),
        }

    async def count_new_session(client: Client) -> None:
        if limit is not None:
            await limit.hit(store(), client)

    @api.post("/sessions", status_code=201)
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
        await count_new_session(client)
        stored = await store().create_session(config, ttl_s=body.ttl_s, agent=agent_name)
        return {
            "session_id": stored.session_id,
            "version": stored.version,
            "agent": agent_name,
            "ttl_s": max(1, round(stored.ttl_ms / 1000)),
        }

    @api.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": await store().list_configs()}

    @api.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        stored = await store().get_config(session_ok(session_id))
        if stored is None:
            raise NotFound(f"session {session_id} not found or expired")
        return session_json(stored)

    @api.put("/sessions/{session_id}/config")
    async def replace_config(session_id: str, config: AgentConfig) -> dict[str, Any]:
        version = await store().update_config(session_ok(session_id), config)
        await service.config_changed(session_id, version, ["*"])
        return {"session_id": session_id, "version": version}

    @api.patch("/sessions/{session_id}/config")
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

    @api.post("/sessions/{session_id}/ttl")
    async def extend_ttl(session_id: str, body: TtlIn) -> dict[str, Any]:
        if not await store().extend_config_ttl(session_ok(session_id), body.ttl_s):
            raise NotFound(f"session {session_id} not found or expired")
        return {"session_id": session_id, "ttl_s": body.ttl_s}

    @api.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        if not await store().delete_config(session_ok(session_id)):
            raise NotFound(f"session {session_id} not found or expired")
        await service.session_deleted(session_id)
        return {"deleted": session_id}

    @api.get("/sessions/{session_id}/context")
    async def get_context(session_id: str) -> dict[str, Any]:
        if await store().get_version(session_ok(session_id)) is None:
            raise NotFound(f"session {session_id} not found or expired")
        return {"messages": await store().get_context(session_id)}

    app.include_router(api)
    app.mount("/metrics", make_asgi_app())

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        checks = {"nats": service.bus.nc.is_connected, "valkey": True}
        try:
            await store().check()
        except Exception:
            checks["valkey"] = False
        ok = all(checks.values())
        body = {
            "status": "ok" if ok else "degraded",
            "instance": service.settings.instance_id,
            "checks": checks,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def call_session(session_id: str | None, agent: str | None, client: Client) -> str:
        """The session a new call joins: an existing one, or a new one from an agent (the default
        agent when none is named). NotFound names what is missing."""
        if session_id:
            session_ok(session_id)
            if await store().get_config(session_id) is None:
                raise NotFound(f"session {session_id} not found or expired")
            return session_id
        record = await store().get_agent(agent) if agent else await store().get_default_agent()
        if record is None:
            raise NotFound(f"agent {agent!r} not found" if agent else "no default agent")
        await count_new_session(client)
        return (await store().create_session(record.config, agent=record.name)).session_id

    app.state.call_session = call_session
    for routes in (webrtc_routes, twilio_routes, daily_routes):
        app.include_router(routes(service, call_session, auth), responses=ERRORS)

    app.include_router(websocket_routes(service, call_session, auth))

    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        page = STATIC / "index.html"
        if page.exists():
            return FileResponse(page)
        return {"service": "voicemesh transport", "docs": "/docs", "call": "/ws/call"}

    return app
