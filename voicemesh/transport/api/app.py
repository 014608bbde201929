"""The transport's HTTP app, put together from its rooms' routers: the config API (agents,
sessions), each carrier's call routes, health, metrics and the web page. Assembly is all it does, so
what a route does is read in one router module, and which routes exist and who may use them is read
here.

/api and every call route need an API key (security.py) unless VOICEMESH_AUTH=off; /healthz,
/metrics, the page at / and the OpenAPI docs stay open. A key names a tenant (tenants.py): every
route and call entry shows a tenant only its own sessions and agents (plus the global agents), and
each tenant's new sessions (VOICEMESH_SESSION_RATE) and concurrent calls
(VOICEMESH_TENANT_MAX_CALLS) are limited. Every request body is capped
(VOICEMESH_MAX_BODY_BYTES, limits.py); WebSocket messages are capped by the uvicorn config in
limits.py.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import make_asgi_app

from voicemesh.bus.bus import BusError
from voicemesh.config.logging import redact_logger
from voicemesh.role import freeze_startup_heap
from voicemesh.state.store import StoreError
from voicemesh.transport.api.agents import agents_router
from voicemesh.transport.api.capacity import RefuseOffersWhenFull
from voicemesh.transport.api.console import console_router
from voicemesh.transport.api.errors import ERRORS, add_error_handlers
from voicemesh.transport.api.limits import BodyLimit
from voicemesh.transport.api.security import ApiKeyAuth, SessionRateLimit
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import call_sessions, sessions_router
from voicemesh.transport.api.start import start_router
from voicemesh.transport.api.tenants import CallSlots
from voicemesh.transport.carriers.daily import DailyRooms, daily_routes
from voicemesh.transport.carriers.twilio import twilio_routes
from voicemesh.transport.carriers.webrtc import webrtc_routes
from voicemesh.transport.carriers.websocket import websocket_routes

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(service: TransportService) -> FastAPI:
    """Raises AuthConfigError when auth is required and no key is configured."""
    auth = ApiKeyAuth(service.settings)
    limit = SessionRateLimit.from_settings(service.settings)
    if auth.required:
        log.info(
            "API keys required on /api and the call routes (%d keys of %d tenants)",
            auth.key_count,
            len(auth.tenants.names),
        )
    else:
        log.warning("API auth is off (VOICEMESH_AUTH=off): anyone who reaches this port can use it")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        redact_logger(name)  # uvicorn logs a WebSocket's query string, where ?api_key= may be

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await service.start()
        except (BusError, StoreError) as exc:
            log.error("transport cannot start: %s", exc)
            raise
        freeze_startup_heap()  # as a stage's run_role does, for the same stalls mid-call
        yield
        await service.stop()

    app = FastAPI(title="voicemesh transport", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    add_error_handlers(app)
    # inside BodyLimit (middleware added later wraps what was added before)
    app.add_middleware(RefuseOffersWhenFull, capacity=service.capacity)
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)

    # One dependency on the /api router: every route below it needs a key.
    api = APIRouter(prefix="/api", dependencies=[Depends(auth)], responses=ERRORS)
    api.include_router(agents_router(service, auth))
    api.include_router(sessions_router(service, auth, limit))
    api.include_router(console_router(service, auth))
    app.include_router(api)
    app.mount("/metrics", make_asgi_app())
    app.include_router(health_router(service))

    # Each carrier guards its own routes with `auth` (Twilio's key may come in its start message).
    settings = service.settings
    slots = CallSlots(
        lambda: service.store, instance=settings.instance_id, lease_s=settings.call_lease_s
    )
    app.state.call_slots = slots
    call_session = call_sessions(service, limit, slots)
    app.state.call_session = call_session
    for routes in (webrtc_routes, twilio_routes):
        app.include_router(routes(service, call_session, auth), responses=ERRORS)
    rooms = DailyRooms()
    app.include_router(daily_routes(service, call_session, auth, rooms), responses=ERRORS)
    app.include_router(websocket_routes(service, call_session, auth))
    # pipecat's clients: POST /start, then /sessions/{id}/api/offer (webrtc_routes) or a room
    app.include_router(start_router(service, auth, limit, call_session, rooms), responses=ERRORS)

    app.include_router(page_router())
    app.include_router(console_page_router())
    mount_prebuilt(app)
    return app


#: pipecat's prebuilt UIs, by preference: the one pipecat's own runner mounts (RTVI 2.x), then
#: the SmallWebRTC-only one (RTVI 1.2); each ships its built page in client/dist
PREBUILT = ("pipecat_ai_prebuilt", "pipecat_ai_small_webrtc_prebuilt")


def prebuilt_dist() -> Path | None:
    """The installed prebuilt UI's static files. Found without importing its package: its
    frontend module prints and logs on import, and needs fastapi[all] for nothing we use."""
    for name in PREBUILT:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        dist = Path(spec.submodule_search_locations[0]) / "client" / "dist"
        if (dist / "index.html").is_file():
            return dist
    return None


def mount_prebuilt(app: FastAPI) -> None:
    """`/client`: pipecat's prebuilt UI, when installed (`make install` installs it); it starts
    calls with POST /start and offers to /sessions/{id}/api/offer, as against pipecat's runner.
    Static files only, open like the page at / (its calls need a key when auth is on)."""
    dist = prebuilt_dist()
    if dist is None:
        log.info("pipecat's prebuilt UI is not installed: nothing at /client")
        return

    @app.get("/client", include_in_schema=False)
    async def client_slash() -> RedirectResponse:
        return RedirectResponse("/client/")

    app.mount("/client", StaticFiles(directory=dist, html=True), name="prebuilt-ui")


def health_router(service: TransportService) -> APIRouter:
    """`/healthz`: 200 when NATS and Valkey answer, else 503 naming which did not (liveness: a
    full transport is alive). `/readyz`: the same, and 503 also while the transport carries
    VOICEMESH_MAX_CALLS calls (readiness: a load balancer sends new calls elsewhere). Both report
    the calls it carries."""
    router = APIRouter()

    async def body() -> dict[str, Any]:
        checks = {"nats": service.bus.nc.is_connected, "valkey": True}
        try:
            await service.store.check()
        except Exception:
            checks["valkey"] = False
        capacity = service.capacity
        return {
            "status": "ok" if all(checks.values()) else "degraded",
            "instance": service.settings.instance_id,
            "checks": checks,
            "ready": all(checks.values()) and capacity.ready,
            "calls": {
                "active": capacity.active,
                "limit": capacity.limit,
                "refused": capacity.refused,
            },
        }

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        found = await body()
        return JSONResponse(found, status_code=200 if found["status"] == "ok" else 503)

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        found = await body()
        return JSONResponse(found, status_code=200 if found["ready"] else 503)

    return router


def page_router() -> APIRouter:
    """`/`: the web client (static/index.html), or a pointer to the docs when it is not shipped."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> Any:
        page = STATIC / "index.html"
        if page.exists():
            return FileResponse(page)
        return {"service": "voicemesh transport", "docs": "/docs", "call": "/ws/call"}

    return router


def console_page_router() -> APIRouter:
    """`/console`: the admin page (static/console/), plain ES modules; it uses only /api."""
    router = APIRouter()
    root = (STATIC / "console").resolve()
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}

    @router.get("/console", include_in_schema=False)
    async def console() -> Any:
        return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})

    @router.get("/console/{name}", include_in_schema=False)
    async def console_file(name: str) -> Any:
        # one flat directory of named files: no path reaches outside it
        path = (root / name).resolve()
        if path.parent != root or path.suffix not in types or not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(
            path, media_type=types[path.suffix], headers={"Cache-Control": "no-cache"}
        )

    return router
