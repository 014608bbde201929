"""What the console (static/console/) needs beyond the agent and session routes, all under /api and
the same key and tenant rules, so any integrator could build the same page:

- `GET /api/schema`: the agent config's JSON Schema (`voicemesh config schema`) and, per
  connector's credential field, the `${ENV}` names the operator allows (names, never values);
- `GET /api/connectors/health`: the connectors marked down in the shared health marks;
- `GET /api/events`: one Server-Sent Events stream for the sessions and health views: a snapshot
  of the client's sessions and the health marks every VOICEMESH_CONSOLE_REFRESH_S, and every
  caller event of the client's live calls as it happens;
- `GET /api/sessions/{id}/events`: one stream for a session's detail view: the session (version,
  TTL) on the same period, and its call's caller events.

A call publishes a copy of each caller event on `vm.watch.<sid>` (Call._watched), so a watcher may
sit on any transport instance, not only the one carrying the call. The stream shows a tenant only
its own sessions' events: the owner of every session id seen on the wildcard subscription is
looked up once (another tenant's session is skipped, as if it did not exist). Streams are counted
per process (VOICEMESH_CONSOLE_MAX_STREAMS) and each one's queue is bounded: a reader too slow for
its events loses the oldest, never the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from nats.aio.msg import Msg

from voicemesh.bus import Subjects
from voicemesh.config.connectors import CONNECTOR_OPTIONS
from voicemesh.config.models import agent_config_schema
from voicemesh.config.secrets import allowed_env, credential_fields
from voicemesh.state.store import StoredConfig
from voicemesh.transport.api.security import ApiKeyAuth, Client
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import owned_config, session_json
from voicemesh.transport.api.tenants import RateLimited

log = logging.getLogger(__name__)

#: events a stream may hold for a slow reader before it drops the oldest
QUEUE_MAX = 256
#: sessions a snapshot lists at most (the newest first)
SNAPSHOT_MAX = 200


def secret_refs() -> dict[str, dict[str, dict[str, list[str]]]]:
    """stage → connector → credential field → the ${ENV} names allowed there."""
    out: dict[str, dict[str, dict[str, list[str]]]] = {}
    for stage, models in CONNECTOR_OPTIONS.items():
        for name, model in models.items():
            for field, spec in credential_fields(model).items():
                names = list(allowed_env(stage, name, spec))
                out.setdefault(stage, {}).setdefault(name, {})[field] = names
    return out


async def health_marks(service: TransportService, client: Client) -> list[dict[str, Any]]:
    """Every connector marked down (voicemesh.connectors.health): stage, name, since when, why.
    A tenant gets the kind of failure, not its words: a mark may come from another tenant's
    connector (its options' fingerprint) and the message may name its endpoint."""
    store = service.store.client
    prefix = f"{service.settings.key_prefix}:health:"
    marks: list[dict[str, Any]] = []
    now_ms = time.time() * 1000
    async for key in store.scan_iter(match=prefix + "*", count=500):
        raw, ttl = await asyncio.gather(store.get(key), store.pttl(key))
        if raw is None or ttl <= 0:
            continue
        try:
            body = orjson.loads(raw)
            hold = int(body.get("hold_ms") or 0)
            error = body.get("error") or {}
            mark: dict[str, Any] = {
                "stage": str(body["stage"]),
                "connector": str(body["connector"]),
                "fingerprint": str(body.get("fp", "")),
                "since_ms": round(now_ms - max(0, hold - ttl)),
                "until_ms": round(now_ms + ttl),
                "code": str(error.get("code", "")),
                "kind": str(error.get("kind", "")),
                "status": error.get("status"),
            }
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue
        if client.admin:
            mark["message"] = str(error.get("message", ""))[:500]
            mark["by"] = str(body.get("by", ""))[:100]
        marks.append(mark)
    return sorted(marks, key=lambda m: (m["stage"], m["connector"]))


def session_summary(stored: StoredConfig) -> dict[str, Any]:
    """A session as the list shows it: no config body beyond each stage's connectors."""
    out = session_json(stored)
    connectors = out.pop("config").get("connectors", {})
    out["stages"] = {
        stage: {"primary": c.get("primary"), "fallback": c.get("fallback") or []}
        for stage, c in connectors.items()
    }
    return out


async def sessions_of(service: TransportService, client: Client) -> list[dict[str, Any]]:
    owner = None if client.admin else client.tenant.name
    ids = await service.store.list_configs(owner=owner)
    found = await asyncio.gather(*(service.store.get_config(i) for i in ids[-SNAPSHOT_MAX:]))
    rows = [session_summary(s) for s in found if s is not None and client.may_see(s.owner)]
    return sorted(rows, key=lambda r: -int(r["created_ms"]))


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Streams:
    """The live streams of this process, counted against VOICEMESH_CONSOLE_MAX_STREAMS."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    def take(self) -> None:
        if self.open >= self.limit:
            raise RateLimited(f"too many live console streams here (at most {self.limit})", 5)
        self.open += 1

    def give(self) -> None:
        self.open -= 1


class Watch:
    """One stream's subscription to `vm.watch.<sid>` (or every session's), with its owner check,
    feeding a bounded queue."""

    def __init__(self, service: TransportService, client: Client, session: str | None):
        self.svc, self.client, self.session = service, client, session
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_MAX)
        self._owners: dict[str, bool] = {}
        self.dropped = 0

    async def _visible(self, session: str) -> bool:
        if self.session is not None or self.client.admin:
            return True  # one session's stream: ownership was checked when it opened
        seen = self._owners.get(session)
        if seen is None:
            owner = await self.svc.store.get_owner(session)
            seen = owner is not None and self.client.may_see(owner)
            if len(self._owners) > 4096:
                self._owners.clear()
            self._owners[session] = seen
        return seen

    async def on_msg(self, msg: Msg) -> None:
        session = Subjects.session_of(msg.subject)
        try:
            if not await self._visible(session):
                return
            body = orjson.loads(msg.data)
        except Exception as exc:  # Valkey away, or a bad copy: skip this one
            log.debug("watch event skipped: %s", exc)
            return
        body["session_id"] = session
        self.put(sse("call", body))

    def put(self, chunk: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(chunk)


def console_router(service: TransportService, auth: ApiKeyAuth) -> APIRouter:
    """The routes above, without prefix: create_app mounts them under its /api router."""
    router = APIRouter()
    settings = service.settings
    streams = Streams(settings.console_max_streams)

    @router.get("/schema")
    async def schema(client: Client = Depends(auth)) -> dict[str, Any]:
        return {"schema": agent_config_schema(), "secret_refs": secret_refs()}

    @router.get("/connectors/health")
    async def connectors_health(client: Client = Depends(auth)) -> dict[str, Any]:
        return {"down": await health_marks(service, client)}

    async def stream(request: Request, client: Client, session: str | None) -> AsyncIterator[bytes]:
        watch = Watch(service, client, session)
        subject = service.subjects.watch(session) if session else service.subjects.watch_all
        sub = await service.bus.nc.subscribe(subject, cb=watch.on_msg)
        period = settings.console_refresh_s
        try:
            yield b"retry: 3000\n\n"
            while not await request.is_disconnected():
                if session is None:
                    watch.put(
                        sse(
                            "snapshot",
                            {
                                "sessions": await sessions_of(service, client),
                                "health": await health_marks(service, client),
                                "now_ms": round(time.time() * 1000),
                            },
                        )
                    )
                else:
                    stored = await service.store.get_config(session)
                    if stored is None or not client.may_see(stored.owner):
                        yield sse("ended", {"session_id": session})
                        return
                    body = session_json(stored)
                    body["now_ms"] = round(time.time() * 1000)
                    watch.put(sse("session", body))
                deadline = asyncio.get_running_loop().time() + period
                while (left := deadline - asyncio.get_running_loop().time()) > 0:
                    with contextlib.suppress(TimeoutError):
                        yield await asyncio.wait_for(watch.queue.get(), timeout=left)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            streams.give()

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}

    @router.get("/events")
    async def events(request: Request, client: Client = Depends(auth)) -> StreamingResponse:
        streams.take()
        return StreamingResponse(
            stream(request, client, None), media_type="text/event-stream", headers=headers
        )

    @router.get("/sessions/{session_id}/events")
    async def session_events(
        session_id: str, request: Request, client: Client = Depends(auth)
    ) -> StreamingResponse:
        await owned_config(service, session_id, client)  # another tenant's: the usual 404
        streams.take()
        return StreamingResponse(
            stream(request, client, session_id), media_type="text/event-stream", headers=headers
        )

    return router
