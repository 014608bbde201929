"""API keys on the config API and the call endpoints, and the limit on new sessions.

Every key names a tenant (tenants.py: admin keys from VOICEMESH_API_KEYS, tenant keys from
VOICEMESH_TENANT_KEYS or VOICEMESH_KEYS_FILE); a request's Client is that tenant. With auth off,
every caller is the one admin tenant. The session limit is a fixed-window counter in Valkey per
tenant (per address with auth off), so every transport instance enforces one shared budget; a
counter's name holds the tenant's name or the address, never a key.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketState

from voicemesh.bus.events import ErrorEvent
from voicemesh.config.settings import Settings
from voicemesh.errors import VoicemeshError
from voicemesh.state import ConfigStore
from voicemesh.transport.api.tenants import AuthConfigError, RateLimited, Tenant, Tenants

__all__ = ["AuthConfigError", "RateLimited"]  # raised from here too

log = logging.getLogger(__name__)

#: WebSocket close codes (4000 + the HTTP status they stand for)
WS_UNAUTHORIZED = 4401
WS_RATE_LIMITED = 4429

MISSING = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
INVALID = "invalid API key"


class Unauthorized(VoicemeshError):
    status = 401

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class CrossOrigin(Unauthorized):
    """A browser page from another origin, while auth is off (see ApiKeyAuth.__call__)."""

    status = 403


@dataclass(frozen=True, slots=True)
class Client:
    """Who is calling: a tenant, and the id its session rate is counted under
    (`tenant:<name>`, or `ip:<address>` with auth off)."""

    id: str
    tenant: Tenant

    @property
    def admin(self) -> bool:
        return self.tenant.admin

    def may_see(self, owner: str) -> bool:
        """Whether a session or agent of `owner` exists for this client (else: 404)."""
        return self.tenant.may_see(owner)


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin ("http://127.0.0.1:8080") is the server's Host header."""
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and rest.lower() == host.lower() != ""


def host_name(host: str) -> str:
    """The name or address of a Host header, without its port ("[::1]:8080" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def trusted_host(host: str, own: str) -> bool:
    """Whether a Host header can be this server's own with auth off: an IP address,
    `localhost`, or the configured VOICEMESH_HTTP_HOST. Not any other name: a page whose name
    the attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host and as Origin,
    which then match each other."""
    name = host_name(host)
    if name in ("localhost", own.strip().lower()):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _address(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else "unknown"


class ApiKeyAuth:
    """The FastAPI dependency guarding /api and /ws/call (applied to their routers)."""

    def __init__(self, settings: Settings):
        self.required = settings.auth == "required"
        self.http_host = settings.http_host
        self.tenants = Tenants(settings)
        if self.required and not self.tenants.key_count:
            raise AuthConfigError(
                "VOICEMESH_AUTH is 'required' but VOICEMESH_API_KEYS is empty and no tenant "
                "key is configured: set admin keys (VOICEMESH_API_KEYS, comma-separated) or "
                "tenant keys (VOICEMESH_TENANT_KEYS, VOICEMESH_KEYS_FILE), or VOICEMESH_AUTH=off "
                "for local use only"
            )

    @property
    def key_count(self) -> int:
        return self.tenants.key_count

    @staticmethod
    def presented(conn: HTTPConnection) -> str | None:
        """The key the client sent: a Bearer token, X-API-Key, or (WebSocket only, as browsers
        cannot set headers there) the `api_key` query parameter."""
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        header = conn.headers.get("x-api-key", "").strip()
        if header:
            return header
        if conn.scope["type"] == "websocket":
            query = conn.query_params.get("api_key", "").strip()
            if query:
                return query
        return None

    def matches(self, presented: str) -> bool:
        return self.identify(presented) is not None

    def identify(self, presented: str) -> Client | None:
        """The client a presented key makes (constant time: Tenants.identify), or None."""
        tenant = self.tenants.identify(presented)
        return None if tenant is None else Client(f"tenant:{tenant.name}", tenant)

    async def __call__(self, conn: HTTPConnection) -> Client:
        if not self.required:
            # With no key to ask for, any web page the user opens could drive this API or open
            # /ws/call from their browser (WebSockets are not bound by CORS). Browsers always
            # send Origin there; tools (curl, the CLI callers) send none. So a request that
            # names an origin must name this server's own, the page it serves.
            origin = conn.headers.get("origin")
            host = conn.headers.get("host", "")
            if origin is not None and not (
                same_origin(origin, host) and trusted_host(host, self.http_host)
            ):
                self._refuse(conn, f"cross-origin {origin!r} with auth off")
                raise CrossOrigin(
                    f"origin {origin} refused: with API auth off, only pages served by this "
                    "transport may use it (set VOICEMESH_API_KEYS to allow other origins)"
                )
            return Client(f"ip:{_address(conn)}", self.tenants.admin)
        presented = self.presented(conn)
        if presented is None:
            self._refuse(conn, "no key")
            raise Unauthorized(MISSING)
        client = self.identify(presented)
        if client is None:
            self._refuse(conn, "wrong key")
            raise Unauthorized(INVALID)
        return client

    @staticmethod
    def _refuse(conn: HTTPConnection, why: str) -> None:
        what = "WebSocket" if conn.scope["type"] == "websocket" else conn.scope.get("method", "")
        log.info("refused %s %s from %s: %s", what, conn.url.path, _address(conn), why)


# Fixed window: the first hit of a window starts its expiry; a key found without one (it cannot
# happen through this script, but a manual SET could do it) gets one too, so no client is ever
# locked out for good.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if n == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class SessionRateLimit:
    """At most N new sessions per client per S seconds, shared by every transport. (N, S) is the
    client's tenant's (VOICEMESH_SESSION_RATE, or its own in the keys file); None: no limit."""

    def __init__(self, *, key_prefix: str):
        self.key_prefix = key_prefix
        self._script: Any = None
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionRateLimit:
        return cls(key_prefix=settings.key_prefix)

    def key(self, client: Client) -> str:
        return f"{self.key_prefix}:rate:sessions:{client.id}"

    async def hit(self, store: ConfigStore, client: Client) -> None:
        """Count one new session for `client`; RateLimited if it is over the limit."""
        if client.tenant.session_rate is None:
            return
        count, window_s = client.tenant.session_rate
        # The counters are this limiter's own keys; it borrows the store's connection only.
        valkey_client = store.client
        if self._client is not valkey_client:
            self._client, self._script = valkey_client, valkey_client.register_script(_HIT)
        window_ms = max(1, round(window_s * 1000))
        n, ttl_ms = await self._script(keys=[self.key(client)], args=[window_ms])
        if int(n) > count:
            retry = max(1, math.ceil(int(ttl_ms) / 1000))
            if int(n) == count + 1:  # once per window, not for every refused attempt
                log.warning(
                    "session rate limit reached by %s (%d per %g s)", client.id, count, window_s
                )
            raise RateLimited(
                f"too many new sessions: at most {count} per {window_s:g} s; retry in {retry} s",
                retry,
            )


async def reject_websocket(ws: WebSocket, code: int, event: ErrorEvent) -> None:
    """Tell the caller why in an `error` event, then close with `code`."""
    if ws.client_state == WebSocketState.CONNECTING:
        await ws.accept()
    await ws.send_text(event.wire_json().decode())
    await ws.close(code=code)


async def on_unauthorized(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    assert isinstance(exc, Unauthorized)
    if isinstance(conn, WebSocket):
        await reject_websocket(conn, 4000 + exc.status, ErrorEvent(error=exc.detail))
        return None
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)


async def retry_later(
    conn: HTTPConnection, detail: str, retry_after_s: int, *, status: int, ws_code: int
) -> JSONResponse | None:
    """A refusal the client may retry, in the shape of its connection: HTTP `status` with
    Retry-After, or an `error` event (with `retry_after_s`) and WebSocket close `ws_code`."""
    if isinstance(conn, WebSocket):
        event = ErrorEvent(error=detail, retry_after_s=retry_after_s)
        await reject_websocket(conn, ws_code, event)
        return None
    return JSONResponse(
        {"detail": detail}, status_code=status, headers={"Retry-After": str(retry_after_s)}
    )


async def on_rate_limited(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    assert isinstance(exc, RateLimited)
    return await retry_later(
        conn, exc.detail, exc.retry_after_s, status=429, ws_code=WS_RATE_LIMITED
    )
