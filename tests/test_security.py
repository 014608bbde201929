"""API keys on /api and /ws/call, the session creation rate limit (shared through Valkey), and
credentials + TLS for NATS and Valkey, against real servers: nats-server with a user and password
(and with a token, and with TLS and client certificates), valkey-server with requirepass and an
ACL user."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from pydantic import SecretStr, ValidationError

from tests.conftest import AGENT_FILE, ROOT, Servers
from tests.support import serving
from voicemesh.bus import Bus, BusError
from voicemesh.callers.websocket import call_over_websocket, ws_url
from voicemesh.cli import _up_auth
from voicemesh.config.connections import nats_options, redact_url, valkey_options
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import ConnectionSettings, Settings
from voicemesh.servers import EmbeddedServer, free_port, start_nats, start_valkey
from voicemesh.state import ConfigStore, StoreError
from voicemesh.transport.api import tenants
from voicemesh.transport.api.app import create_app
from voicemesh.transport.api.security import INVALID, MISSING, ApiKeyAuth, AuthConfigError
from voicemesh.transport.api.service import TransportService

KEY = "k-primary-9a8b7c6d5e"
OTHER_KEY = "k-second-1f2e3d4c5b"
WRONG = "k-wrong-000000000000"
NATS_PASSWORD = "nats-pw-7Yq2"
VALKEY_PASSWORD = "valkey-pw-Zr81"
SECRETS = (KEY, OTHER_KEY, WRONG, NATS_PASSWORD, VALKEY_PASSWORD)


# --- an app per test, in-process ----------------------------------------------------------------


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    """start(settings) → a started TransportService; all stopped at teardown."""
    running: list[TransportService] = []

    async def start(settings: Settings) -> TransportService:
        svc = TransportService(settings)
        await svc.start()
        running.append(svc)
        return svc

    yield start
    for svc in running:
        await svc.stop()


def keyed(settings: Settings, *keys: str, **more: Any) -> Settings:
    return settings.model_copy(
        update={"api_keys": tuple(SecretStr(k) for k in keys), "auth": "required", **more}
    )


@contextlib.asynccontextmanager
async def api_client(
    service: TransportService, *, client_ip: str = "127.0.0.1", **kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service)
    transport = httpx.ASGITransport(app=app, client=(client_ip, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", **kw) as c:
        yield c


async def seed_agent(service: TransportService) -> None:
    await service.store.create_agent("local", parse_agent_config(AGENT_FILE.read_bytes()))


# The protected route families: each with a method, a path and a body that would succeed.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/agents", None),
    ("POST", "/api/agents", "agent"),
    ("GET", "/api/agents/current", None),
    ("GET", "/api/agents/local", None),
    ("PUT", "/api/agents/local", "update"),
    ("DELETE", "/api/agents/local", None),
    ("POST", "/api/agents/local/set-default", None),
    ("POST", "/api/sessions", {}),
    ("GET", "/api/sessions", None),
    ("GET", "/api/sessions/{sid}", None),
    ("PUT", "/api/sessions/{sid}/config", "config"),
    ("PATCH", "/api/sessions/{sid}/config", {"system_prompt": "x"}),
    ("PUT", "/api/sessions/{sid}/agent", {"agent": "local"}),
    ("POST", "/api/sessions/{sid}/ttl", {"ttl_s": 60}),
    ("DELETE", "/api/sessions/{sid}", None),
    ("GET", "/api/sessions/{sid}/context", None),
]


def body_for(kind: Any, agent_json: dict) -> Any:
    return (
        {
            "agent": {"name": "other", "config": agent_json},
            "update": {"config": agent_json},
            "config": agent_json,
        }.get(kind, kind)
        if isinstance(kind, str)
        else kind
    )


async def test_every_protected_route_wants_a_valid_key(
    settings: Settings, started: Callable[..., Any], agent_json: dict
) -> None:
    svc = await started(keyed(settings, KEY, OTHER_KEY))
    await seed_agent(svc)
    sid = (await svc.store.create_session(parse_agent_config(orjson.dumps(agent_json)))).session_id
    refusals = {
        "none": ({}, MISSING),
        "wrong bearer": ({"Authorization": f"Bearer {WRONG}"}, INVALID),
        "wrong x-api-key": ({"X-API-Key": WRONG}, INVALID),
        "empty bearer": ({"Authorization": "Bearer "}, MISSING),
        "basic scheme": ({"Authorization": f"Basic {KEY}"}, MISSING),
    }
    async with api_client(svc) as c:
        for method, path, kind in ROUTES:
            url = path.format(sid=sid)
            body = body_for(kind, agent_json)
            for name, (headers, detail) in refusals.items():
                r = await c.request(method, url, json=body, headers=headers)
                assert r.status_code == 401, (method, url, name, r.text)
                assert r.json() == {"detail": detail}, (method, url, name)
                assert r.headers["www-authenticate"] == "Bearer"
            # The query parameter is for WebSockets only; over HTTP it is no key.
            r = await c.request(method, url, json=body, params={"api_key": KEY})
            assert r.status_code == 401 and r.json() == {"detail": MISSING}, (method, url)
    # Nothing was done by any refused request.
    assert await svc.store.get_agent("other") is None
    assert [a.name for a in await svc.store.list_agents()] == ["local"]
    assert await svc.store.list_configs() == [sid]
    assert (await svc.store.get_config(sid)).version == 1  # type: ignore[union-attr]
    # and with the key, every one of them is served (whatever its own answer)
    async with api_client(svc, headers={"X-API-Key": KEY}) as c:
        for method, path, kind in ROUTES:
            r = await c.request(method, path.format(sid=sid), json=body_for(kind, agent_json))
            assert r.status_code not in (401, 500), (method, path, r.text)


async def test_the_right_key_works_in_both_header_forms(
    settings: Settings, started: Callable[..., Any], agent_json: dict
) -> None:
    svc = await started(keyed(settings, KEY, OTHER_KEY))
    await seed_agent(svc)
    async with api_client(svc) as c:
        for headers in (
            {"Authorization": f"Bearer {KEY}"},
            {"authorization": f"bearer {OTHER_KEY}"},  # the second key, any case of the scheme
            {"X-API-Key": KEY},
            {"x-api-key": OTHER_KEY},
        ):
            r = await c.get("/api/agents", headers=headers)
            assert r.status_code == 200, (headers, r.text)
            assert r.json()["default"] == "local"
        r = await c.post("/api/sessions", json={}, headers={"X-API-Key": KEY})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        r = await c.patch(
            f"/api/sessions/{sid}/config",
            json={"system_prompt": "hi"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200 and r.json()["version"] == 2


async def test_open_routes_need_no_key(settings: Settings, started: Callable[..., Any]) -> None:
    svc = await started(keyed(settings, KEY))
    async with api_client(svc) as c:
        r = await c.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = await c.get("/metrics/")
        assert r.status_code == 200 and "voicemesh_" in r.text
        r = await c.get("/")
        assert r.status_code == 200 and "voicemesh" in r.text
        assert "API key" in r.text and "Bearer" in r.text  # the page can ask for a key
        assert (await c.get("/openapi.json")).status_code == 200


async def test_every_configured_key_is_compared_in_constant_time(
    settings: Settings, started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = (KEY, OTHER_KEY, "k-third-55555")
    svc = await started(keyed(settings, *keys))
    calls: list[tuple[bytes, bytes]] = []
    real = tenants.secrets.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    def sha(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    monkeypatch.setattr(tenants.secrets, "compare_digest", spy)
    async with api_client(svc) as c:
        for presented, status in ((KEY, 200), (keys[2], 200), (WRONG, 401)):
            calls.clear()
            r = await c.get("/api/sessions", headers={"Authorization": f"Bearer {presented}"})
            assert r.status_code == status
            # every key's digest (only digests are kept), even after the first one matched; the
            # dependency ran once
            assert sorted(b for _, b in calls) == sorted(sha(k) for k in keys), presented
            assert all(a == sha(presented) for a, _ in calls)
        calls.clear()  # also on the route that reads the client (its dependency is cached)
        r = await c.post("/api/sessions", json={}, headers={"X-API-Key": KEY})
        assert r.status_code == 404  # no default agent: authenticated, then not found
        assert len(calls) == len(keys)


async def test_auth_required_without_keys_refuses_to_start(
    settings: Settings, servers: Servers
) -> None:
    svc = TransportService(settings.model_copy(update={"auth": "required", "api_keys": ()}))
    with pytest.raises(AuthConfigError, match="VOICEMESH_API_KEYS is empty") as err:
        create_app(svc)
    assert "VOICEMESH_AUTH=off" in str(err.value)

    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEMESH_")}
    env.update(NATS_URL=servers.nats.url, VALKEY_URL=servers.valkey.url)
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "voicemesh", "serve", "transport", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("voicemesh serve transport: VOICEMESH_AUTH is 'required'")


async def test_auth_off_needs_no_key(settings: Settings, started: Callable[..., Any]) -> None:
    assert Settings().auth == "required"  # off only when configured
    svc = await started(settings.model_copy(update={"auth": "off", "api_keys": ()}))
    async with api_client(svc) as c:
        assert (await c.get("/api/agents")).status_code == 200


# --- the WebSocket ----------------------------------------------------------------------------


async def ws_open(url: str, **params: str) -> tuple[dict[str, Any], Any]:
    """Connect, read the first event, hang up; (event, close code or None if still open)."""
    headers = params.pop("_headers", None)
    async with websockets.connect(ws_url(url, **params), additional_headers=headers) as ws:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        if first.get("type") == "error":
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return first, ws.close_code
        await ws.send(orjson.dumps({"type": "end"}).decode())
        return first, None


async def test_websocket_wants_a_valid_key(
    settings: Settings, started: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    svc = await started(keyed(settings, KEY, OTHER_KEY))
    await seed_agent(svc)
    async with serving(svc) as url:
        for params, detail in (
            ({}, MISSING),
            ({"api_key": WRONG}, INVALID),
            ({"_headers": {"Authorization": f"Bearer {WRONG}"}}, INVALID),
            ({"agent": "local", "_headers": {"X-API-Key": WRONG}}, INVALID),
        ):
            event, code = await ws_open(url, **params)  # type: ignore[arg-type]
            assert event == {"type": "error", "error": detail}, params
            assert code == 4401, params
        assert await svc.store.list_configs() == []  # no session was made for a refused call

        for params in (
            {"api_key": KEY},  # what browsers do
            {"_headers": {"Authorization": f"Bearer {OTHER_KEY}"}},
            {"agent": "local", "_headers": {"X-API-Key": KEY}},
        ):
            event, code = await ws_open(url, **params)  # type: ignore[arg-type]
            assert event["type"] == "session" and code is None, (params, event)

        # the WAV client: the key in a header
        result = await call_over_websocket(url, [], None, api_key=KEY)
        assert result.session_id and result.turns == []
        with pytest.raises(RuntimeError, match="invalid API key"):
            await call_over_websocket(url, [], None, api_key=WRONG)
        with pytest.raises(RuntimeError, match="missing API key"):
            await call_over_websocket(url, [], None)

    # uvicorn logged the WebSocket lines, query string and all: the key is masked
    ws_lines = [r.getMessage() for r in caplog.records if '"WebSocket /ws/call' in r.getMessage()]
    assert any("api_key=***" in line for line in ws_lines), ws_lines
    for secret in SECRETS:
        assert secret not in caplog.text


# --- the session rate limit ---------------------------------------------------------------------


async def test_session_rate_limit_gives_429_and_recovers_after_the_window(
    settings: Settings, started: Callable[..., Any]
) -> None:
    # KEY is an admin key (tenant "admin"), OTHER_KEY a key of tenant "beta": a budget each
    svc = await started(
        keyed(settings, KEY, session_rate="3/1.5", tenant_keys=(("beta", SecretStr(OTHER_KEY)),))
    )
    await seed_agent(svc)
    async with api_client(svc, headers={"X-API-Key": KEY}) as c:
        for _ in range(3):
            assert (await c.post("/api/sessions", json={})).status_code == 201
        r = await c.post("/api/sessions", json={})
        assert r.status_code == 429, r.text
        assert r.json() == {"detail": r.json()["detail"]} and "at most 3 per 1.5 s" in r.text
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= 2
        # other routes are not limited, and another tenant has its own budget
        assert (await c.get("/api/sessions")).status_code == 200
        other = await c.post("/api/sessions", json={}, headers={"X-API-Key": OTHER_KEY})
        assert other.status_code == 201
        assert len(await svc.store.list_configs()) == 4  # the refused one made nothing

        await asyncio.sleep(retry + 0.05)
        assert (await c.post("/api/sessions", json={})).status_code == 201


async def test_session_rate_limit_is_shared_by_transport_instances(
    settings: Settings, started: Callable[..., Any]
) -> None:
    """Two transports on one Valkey: one budget per client across both."""
    limited = keyed(settings, KEY, session_rate="3/60")
    a = await started(limited.model_copy(update={"instance_id": "transport-a"}))
    b = await started(limited.model_copy(update={"instance_id": "transport-b"}))
    await seed_agent(a)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with api_client(a, headers=auth) as ca, api_client(b, headers=auth) as cb:
        codes = [(await c.post("/api/sessions", json={})).status_code for c in (ca, cb, ca, cb, ca)]
        assert codes == [201, 201, 201, 429, 429]
        r = await cb.post("/api/sessions", json={})
        assert r.status_code == 429 and 55 <= int(r.headers["retry-after"]) <= 60
    # the counter is the tenant's (admin keys: tenant "admin"), never named by the key
    keys = [k.decode() async for k in a.store.client.scan_iter(f"{settings.key_prefix}:rate:*")]
    assert keys == [f"{settings.key_prefix}:rate:sessions:tenant:admin"]
    assert KEY not in keys[0]


async def test_session_rate_limit_by_address_when_auth_is_off(
    settings: Settings, started: Callable[..., Any]
) -> None:
    svc = await started(settings.model_copy(update={"auth": "off", "session_rate": "1/60"}))
    await seed_agent(svc)
    async with api_client(svc, client_ip="10.0.0.1") as one, api_client(svc) as local:
        assert (await one.post("/api/sessions", json={})).status_code == 201
        assert (await one.post("/api/sessions", json={})).status_code == 429
        assert (await local.post("/api/sessions", json={})).status_code == 201
        assert (await local.post("/api/sessions", json={})).status_code == 429


async def test_sessions_made_by_the_websocket_count_too(
    settings: Settings, started: Callable[..., Any]
) -> None:
    svc = await started(keyed(settings, KEY, session_rate="2/60"))
    await seed_agent(svc)
    auth = {"X-API-Key": KEY}
    async with serving(svc) as url:
        async with httpx.AsyncClient(base_url=url, headers=auth) as http:
            r = await http.post("/api/sessions", json={})
            assert r.status_code == 201
            sid = r.json()["session_id"]
            event, code = await ws_open(url, agent="local", _headers=auth)  # type: ignore[arg-type]
            assert event["type"] == "session" and code is None  # the 2nd new session
            event, code = await ws_open(url, api_key=KEY)  # default agent: a 3rd
            assert code == 4429, event
            assert event["type"] == "error" and "too many new sessions" in event["error"]
            assert 55 <= event["retry_after_s"] <= 60
            assert (await http.post("/api/sessions", json={})).status_code == 429
            # joining an existing session makes none: not limited
            event, code = await ws_open(url, session_id=sid, api_key=KEY)
            assert event["type"] == "session" and event["session_id"] == sid and code is None
    assert len(await svc.store.list_configs()) == 2


def test_session_rate_setting() -> None:
    assert Settings(session_rate="30/60").session_rate_limit == (30, 60.0)
    assert Settings(session_rate=" 5 / 0.5 ").session_rate_limit == (5, 0.5)
    assert Settings(session_rate="off").session_rate_limit is None
    assert Settings().session_rate_limit == (60, 60.0)  # on by default, per tenant
    for bad in ("30", "0/60", "30/0", "x/y", "-1/5"):
        with pytest.raises(ValidationError, match="COUNT/SECONDS"):
            Settings(session_rate=bad)


# --- secrets stay secret ------------------------------------------------------------------------


async def test_no_key_in_a_log_line_or_a_response(
    settings: Settings, started: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    svc = await started(
        keyed(settings, KEY, session_rate="1/60", tenant_keys=(("beta", SecretStr(OTHER_KEY)),))
    )
    await seed_agent(svc)
    bodies: list[str] = []
    async with api_client(svc) as c:
        for headers in (
            {},
            {"Authorization": f"Bearer {WRONG}"},
            {"X-API-Key": WRONG},
            {"Authorization": f"Bearer {KEY}"},
            {"X-API-Key": OTHER_KEY},
        ):
            for method, path in (("GET", "/api/agents"), ("POST", "/api/sessions")):
                r = await c.request(method, path, json={}, headers=headers)
                bodies.append(r.text + str(r.headers))
        assert r.status_code == 201  # the other tenant's first session
        r = await c.post("/api/sessions", json={}, headers={"X-API-Key": OTHER_KEY})
        assert r.status_code == 429
        bodies.append(r.text + str(r.headers))
        bodies.append((await c.get("/healthz")).text)
    assert any("refused GET /api/agents" in m for m in caplog.messages), caplog.messages
    assert any("session rate limit reached by tenant:beta" in m for m in caplog.messages)
    for secret in (KEY, OTHER_KEY, WRONG):
        assert secret not in caplog.text
        assert all(secret not in b for b in bodies)
    # nor in the settings' repr or a validation error that carries them
    s = keyed(settings, KEY)
    assert KEY not in repr(s) and KEY not in str(s.model_dump())
    with pytest.raises(ValidationError) as err:
        Settings(api_keys=f"{KEY},{OTHER_KEY}", session_rate="nope", nats_password=NATS_PASSWORD)
    assert all(secret not in str(err.value) for secret in SECRETS)


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_API_KEYS", f" {KEY}, {OTHER_KEY} ,, ")
    monkeypatch.setenv("VOICEMESH_AUTH", "required")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == [KEY, OTHER_KEY]
    auth = ApiKeyAuth(s)
    assert auth.matches(KEY) and auth.matches(OTHER_KEY)
    assert not auth.matches(WRONG) and not auth.matches("") and not auth.matches(KEY[:-1])
    monkeypatch.setenv("VOICEMESH_AUTH", "maybe")
    with pytest.raises(ValidationError):
        Settings()


def test_up_turns_auth_off_for_local_use_unless_keys_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VOICEMESH_AUTH", raising=False)
    env: dict[str, str] = {}
    notes = _up_auth(env, Settings(api_keys=""), "127.0.0.1", 8080)
    assert env["VOICEMESH_AUTH"] == "off"
    assert notes == [
        "API auth is off (local use): no key needed. Set VOICEMESH_API_KEYS to require one"
    ]
    notes = _up_auth({}, Settings(api_keys=""), "0.0.0.0", 8080)
    assert "warning: auth is off and the API listens on 0.0.0.0:8080" in notes[1]

    env = {}
    notes = _up_auth(env, Settings(api_keys=f"{KEY},{OTHER_KEY}"), "127.0.0.1", 8080)
    assert env["VOICEMESH_AUTH"] == "required"
    assert "API auth is on" in notes[0] and "2 keys" in notes[0] and KEY not in notes[0]

    monkeypatch.setenv("VOICEMESH_AUTH", "required")
    env = {"VOICEMESH_AUTH": "required"}
    with pytest.raises(ValueError, match="VOICEMESH_API_KEYS is empty"):
        _up_auth(env, Settings(api_keys=""), "127.0.0.1", 8080)


# --- NATS and Valkey credentials ----------------------------------------------------------------


@dataclass
class AuthServers:
    nats: EmbeddedServer  # --user u --pass NATS_PASSWORD
    nats_token: EmbeddedServer  # --auth token
    valkey: EmbeddedServer  # --requirepass VALKEY_PASSWORD, plus ACL user "vm"


@pytest.fixture(scope="module")
def auth_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServers]:
    data = tmp_path_factory.mktemp("auth-servers")
    nats = start_nats(data, args=["--user", "u", "--pass", NATS_PASSWORD], name="nats-auth")
    token = start_nats(data, args=["--auth", NATS_PASSWORD + "tok"], name="nats-token")
    valkey = start_valkey(data, args=["--requirepass", VALKEY_PASSWORD], name="valkey-auth")
    yield AuthServers(nats, token, valkey)
    for s in (nats, token, valkey):
        s.stop()


def with_password(url: str, user: str, password: str) -> str:
    return url.replace("://", f"://{user}:{password}@", 1)


async def test_bus_connects_with_credentials_from_settings_or_url(
    auth_servers: AuthServers,
) -> None:
    url = auth_servers.nats.url
    for bus_url, conn in (
        (url, ConnectionSettings(nats_user="u", nats_password=NATS_PASSWORD)),
        (with_password(url, "u", NATS_PASSWORD), ConnectionSettings()),
        (auth_servers.nats_token.url, ConnectionSettings(nats_token=NATS_PASSWORD + "tok")),
    ):
        bus = await Bus.connect(bus_url, name="t", settings=conn)
        try:
            sub = await bus.nc.subscribe("sec.ping")
            await bus.nc.publish("sec.ping", b"x")
            assert (await sub.next_msg(timeout=2)).data == b"x"
        finally:
            await bus.close()


async def test_bus_without_or_with_wrong_credentials_fails_clearly(
    auth_servers: AuthServers, caplog: pytest.LogCaptureFixture
) -> None:
    url = auth_servers.nats.url
    for bus_url, conn in (
        (url, ConnectionSettings()),
        (url, ConnectionSettings(nats_user="u", nats_password="not-" + NATS_PASSWORD)),
        (with_password(url, "u", "not-" + NATS_PASSWORD), ConnectionSettings()),
        (auth_servers.nats_token.url, ConnectionSettings(nats_token="nope")),
    ):
        t0 = time.monotonic()
        with pytest.raises(BusError) as err:
            await asyncio.wait_for(Bus.connect(bus_url, name="t", settings=conn), 10)
        assert time.monotonic() - t0 < 5  # no endless retry of a refused login
        msg = str(err.value)
        assert "refused the connection (" in msg and "Authorization Violation" in msg
        assert "VOICEMESH_NATS_USER" in msg and "VOICEMESH_NATS_TOKEN" in msg
        assert NATS_PASSWORD not in msg
        assert f"127.0.0.1:{auth_servers.nats.port}" in msg or "127.0.0.1" in msg
    assert NATS_PASSWORD not in caplog.text


async def test_store_with_password_username_or_url(auth_servers: AuthServers) -> None:
    url = auth_servers.valkey.url
    admin = ConfigStore.from_url(url, settings=ConnectionSettings(valkey_password=VALKEY_PASSWORD))
    await admin.check()
    await admin.client.execute_command(
        "ACL", "SETUSER", "vm", "on", f">{VALKEY_PASSWORD}-vm", "~*", "&*", "+@all"
    )
    await admin.close()
    for store_url, conn in (
        (url, ConnectionSettings(valkey_password=VALKEY_PASSWORD)),
        (url, ConnectionSettings(valkey_username="vm", valkey_password=VALKEY_PASSWORD + "-vm")),
        (with_password(url, "", VALKEY_PASSWORD), ConnectionSettings()),
        (with_password(url, "vm", VALKEY_PASSWORD + "-vm"), ConnectionSettings()),
    ):
        store = ConfigStore.from_url(store_url, settings=conn, key_prefix="sec")
        try:
            await store.check()
            sid = (
                await store.create_session(parse_agent_config(AGENT_FILE.read_bytes()), ttl_s=30)
            ).session_id
            assert (await store.get_config(sid)) is not None
        finally:
            await store.close()


async def test_store_without_or_with_wrong_password_fails_clearly(
    auth_servers: AuthServers,
) -> None:
    url = auth_servers.valkey.url
    for store_url, conn, says in (
        (url, ConnectionSettings(), "wants a login"),
        (url, ConnectionSettings(valkey_password="not-" + VALKEY_PASSWORD), "refused the login"),
        (with_password(url, "", "not-" + VALKEY_PASSWORD), ConnectionSettings(), "refused"),
    ):
        store = ConfigStore.from_url(store_url, settings=conn)
        try:
            with pytest.raises(StoreError) as err:
                await store.check()
        finally:
            await store.close()
        msg = str(err.value)
        assert says in msg and "VOICEMESH_VALKEY_PASSWORD" in msg, msg
        assert VALKEY_PASSWORD not in msg
        assert f"127.0.0.1:{auth_servers.valkey.port}" in msg


async def test_transport_role_connects_with_the_settings(
    auth_servers: AuthServers, started: Callable[..., Any], prefix: str
) -> None:
    base = Settings(
        nats_url=auth_servers.nats.url,
        valkey_url=auth_servers.valkey.url,
        subject_prefix=prefix,
        key_prefix=prefix,
        auth="off",
        preload=False,
    )
    good = base.model_copy(
        update={
            "nats_user": "u",
            "nats_password": SecretStr(NATS_PASSWORD),
            "valkey_password": SecretStr(VALKEY_PASSWORD),
        }
    )
    svc = await started(good)
    async with api_client(svc) as c:
        r = await c.get("/healthz")
        assert r.status_code == 200 and r.json()["checks"] == {"nats": True, "valkey": True}
        assert (await c.get("/api/agents")).status_code == 200

    no_valkey = good.model_copy(update={"valkey_password": None})
    with pytest.raises(StoreError, match="VOICEMESH_VALKEY_PASSWORD"):
        await TransportService(no_valkey).start()
    no_nats = good.model_copy(update={"nats_user": None, "nats_password": None})
    failed = TransportService(no_nats)
    with pytest.raises(BusError, match="VOICEMESH_NATS_USER"):
        await failed.start()
    await failed.store.close()


async def test_stage_role_takes_credentials_from_its_settings(
    auth_servers: AuthServers, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage connects with the credentials of its Settings, which a role reads from its
    environment (VOICEMESH_NATS_USER, ...) at start."""
    from tests.support import Services
    from voicemesh.pipeline import LLMService

    monkeypatch.setenv("VOICEMESH_NATS_USER", "u")
    monkeypatch.setenv("VOICEMESH_NATS_PASSWORD", NATS_PASSWORD)
    monkeypatch.setenv("VOICEMESH_VALKEY_PASSWORD", VALKEY_PASSWORD)
    settings = Settings(
        nats_url=auth_servers.nats.url,
        valkey_url=auth_servers.valkey.url,
        subject_prefix=prefix,
        key_prefix=prefix,
        preload=False,
    )
    services = Services(settings)
    llm = await services.start(LLMService)
    try:
        reply = await llm.bus.nc.request(f"{prefix}.health.llm", b"{}", timeout=2)
        assert orjson.loads(reply.data)["role"] == "llm"
    finally:
        await services.stop(llm)
    # and without them in its settings, the stage refuses to start with a clear error
    monkeypatch.delenv("VOICEMESH_VALKEY_PASSWORD")
    bare = Settings(
        nats_url=auth_servers.nats.url,
        valkey_url=auth_servers.valkey.url,
        subject_prefix=prefix,
        key_prefix=prefix,
        preload=False,
    )
    with pytest.raises(Exception, match="VOICEMESH_VALKEY_PASSWORD"):
        await Services(bare).start(LLMService)


async def test_serve_without_credentials_exits_with_a_clear_error(
    auth_servers: AuthServers,
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VOICEMESH_")}
    base.update(
        NATS_URL=auth_servers.nats.url,
        VALKEY_URL=auth_servers.valkey.url,
        VOICEMESH_PRELOAD="false",
    )

    def serve(role: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "voicemesh", "serve", role],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=ROOT,
            env={**base, **env},
        )

    no_valkey, no_nats, transport = await asyncio.gather(
        asyncio.to_thread(
            serve, "llm", VOICEMESH_NATS_USER="u", VOICEMESH_NATS_PASSWORD=NATS_PASSWORD
        ),
        asyncio.to_thread(serve, "tts", VOICEMESH_VALKEY_PASSWORD=VALKEY_PASSWORD),
        asyncio.to_thread(
            serve,
            "transport",
            VOICEMESH_AUTH="off",
            VOICEMESH_HTTP_PORT=str(free_port()),
            VOICEMESH_VALKEY_PASSWORD=VALKEY_PASSWORD,
        ),
    )
    assert no_valkey.returncode == 1, no_valkey.stderr
    assert "voicemesh serve llm: Valkey at valkey://127.0.0.1:" in no_valkey.stderr
    assert "VOICEMESH_VALKEY_PASSWORD" in no_valkey.stderr
    assert no_nats.returncode == 1, no_nats.stderr
    assert "voicemesh serve tts: NATS at nats://127.0.0.1:" in no_nats.stderr, no_nats.stderr
    assert transport.returncode != 0, transport.stderr  # uvicorn: 3, startup failed
    assert "transport cannot start: NATS at nats://127.0.0.1:" in transport.stderr
    for proc in (no_valkey, no_nats, transport):
        out = proc.stdout + proc.stderr
        assert NATS_PASSWORD not in out and VALKEY_PASSWORD not in out


# --- connection options and TLS -----------------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("nats://u:pw@h:4222") == "nats://u:***@h:4222"
    assert redact_url("valkey://:pw@h:6379/0") == "valkey://:***@h:6379/0"
    assert redact_url("nats://token@h:4222") == "nats://***@h:4222"
    assert redact_url("valkeys://user:p%40ss@[::1]:6380/1") == "valkeys://user:***@[::1]:6380/1"
    assert redact_url("nats://h:4222") == "nats://h:4222"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated
    CA, made with the `cryptography` package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = make_ca("voicemesh test CA")

    def leaf(cn: str, usage: Any, sans: list[x509.GeneralName]) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client_key, client_cert = leaf("voicemesh-role", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    _, other_ca = make_ca("some other CA")
    return Pki(
        ca=write_cert(ca_cert, out / "ca.pem"),
        server_cert=write_cert(server_cert, out / "server.pem"),
        server_key=write_key(server_key, out / "server-key.pem"),
        client_cert=write_cert(client_cert, out / "client.pem"),
        client_key=write_key(client_key, out / "client-key.pem"),
        other_ca=write_cert(other_ca, out / "other-ca.pem"),
    )


def test_nats_options_from_settings(pki: Pki) -> None:
    assert nats_options(ConnectionSettings()) == {}
    assert nats_options(ConnectionSettings(nats_user="u", nats_password="p")) == {
        "user": "u",
        "password": "p",
        "inbox_prefix": "_INBOX.u",  # the user's own inboxes, which permissions can scope
    }
    explicit = ConnectionSettings(nats_user="u", nats_password="p", nats_inbox_prefix="_R.u")
    assert nats_options(explicit)["inbox_prefix"] == "_R.u"
    assert nats_options(ConnectionSettings(nats_token="t")) == {"token": "t"}
    opts = nats_options(
        ConnectionSettings(
            nats_tls_ca=str(pki.ca),
            nats_tls_cert=str(pki.client_cert),
            nats_tls_key=str(pki.client_key),
        )
    )
    ctx = opts["tls"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 1  # our CA, not the system store
    with pytest.raises(ValueError, match="VOICEMESH_NATS_TLS_CA: cannot read /nonexistent"):
        nats_options(ConnectionSettings(nats_tls_ca="/nonexistent/ca.pem"))
    with pytest.raises(ValueError, match="not a usable certificate and key"):
        nats_options(
            ConnectionSettings(nats_tls_cert=str(pki.client_cert), nats_tls_key=str(pki.ca))
        )
    for bad in (
        {"nats_tls_cert": str(pki.client_cert)},
        {"nats_token": "t", "nats_user": "u"},
        {"nats_password": "p"},
        {"valkey_tls_key": str(pki.client_key)},
    ):
        with pytest.raises(ValidationError):
            ConnectionSettings(**bad)


def test_valkey_options_from_settings(pki: Pki) -> None:
    plain = "valkey://127.0.0.1:6379/0"
    assert valkey_options(ConnectionSettings(), plain) == {}
    assert valkey_options(ConnectionSettings(valkey_username="vm", valkey_password="p"), plain) == {
        "username": "vm",
        "password": "p",
    }
    tls = ConnectionSettings(
        valkey_tls_ca=str(pki.ca),
        valkey_tls_cert=str(pki.client_cert),
        valkey_tls_key=str(pki.client_key),
    )
    for scheme in ("valkeys", "rediss"):
        assert valkey_options(tls, f"{scheme}://h:6380/0") == {
            "ssl_cert_reqs": "required",
            "ssl_ca_certs": str(pki.ca),
            "ssl_certfile": str(pki.client_cert),
            "ssl_keyfile": str(pki.client_key),
        }
    assert valkey_options(ConnectionSettings(), "valkeys://h:6380/0") == {
        "ssl_cert_reqs": "required"
    }
    with pytest.raises(ValueError, match=r"VOICEMESH_VALKEY_TLS_CA.*use valkeys://"):
        valkey_options(tls, plain)
    # what the store's client is built with
    store = ConfigStore.from_url("valkeys://127.0.0.1:6380/2", settings=tls)
    pool = store.client.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["ssl_ca_certs"] == str(pki.ca)
    assert pool.connection_kwargs["ssl_certfile"] == str(pki.client_cert)
    assert pool.connection_kwargs["db"] == 2


@pytest.fixture(scope="module")
def tls_nats(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """nats-server with TLS that also wants a client certificate signed by our CA."""
    data = tmp_path_factory.mktemp("tls-nats")
    args = [
        "--tls",
        "--tlscert",
        str(pki.server_cert),
        "--tlskey",
        str(pki.server_key),
        "--tlscacert",
        str(pki.ca),
        "--tlsverify",
    ]
    server = start_nats(data, args=args, name="nats-tls")
    yield server
    server.stop()


async def test_nats_over_tls_with_a_client_certificate(tls_nats: EmbeddedServer, pki: Pki) -> None:
    good = ConnectionSettings(
        nats_tls_ca=str(pki.ca),
        nats_tls_cert=str(pki.client_cert),
        nats_tls_key=str(pki.client_key),
    )
    for url in (tls_nats.url, tls_nats.url.replace("nats://", "tls://")):
        bus = await Bus.connect(url, name="t", settings=good)
        try:
            sub = await bus.nc.subscribe("sec.tls")
            await bus.nc.publish("sec.tls", b"over tls")
            assert (await sub.next_msg(timeout=2)).data == b"over tls"
        finally:
            await bus.close()

    # The server's certificate is checked: a CA that did not sign it fails, at once and clearly.
    t0 = time.monotonic()
    with pytest.raises(BusError, match=r"TLS with NATS at nats://127\.0\.0\.1:.* failed") as err:
        wrong_ca = good.model_copy(update={"nats_tls_ca": str(pki.other_ca)})
        await asyncio.wait_for(Bus.connect(tls_nats.url, name="t", settings=wrong_ca), 10)
    assert "VOICEMESH_NATS_TLS_CA" in str(err.value)
    assert time.monotonic() - t0 < 5

    # No client certificate: the server (--tlsverify) refuses; that fails at once too.
    t0 = time.monotonic()
    with pytest.raises(BusError):
        no_cert = ConnectionSettings(nats_tls_ca=str(pki.ca))
        await asyncio.wait_for(Bus.connect(tls_nats.url, name="t", settings=no_cert), 10)
    assert time.monotonic() - t0 < 5


# --- auth off: only this server's own pages ----------------------------------------------------


async def test_auth_off_refuses_other_origins_and_serves_its_own_page(
    settings: Settings, started: Callable[..., Any]
) -> None:
    """With no key to ask for, a web page from another site must not drive the API or open a
    call from the user's browser; the transport's own page, and tools that send no Origin, may."""
    svc = await started(settings.model_copy(update={"auth": "off", "api_keys": ()}))
    await seed_agent(svc)
    async with serving(svc) as url:
        host = url.removeprefix("http://")
        evil = {"Origin": "http://evil.example"}
        async with httpx.AsyncClient(base_url=url) as http:
            refused = await http.post("/api/sessions", json={"agent": "local"}, headers=evil)
            assert refused.status_code == 403, refused.text
            assert refused.json()["detail"].startswith("origin http://evil.example refused")
            for origin in (f"http://{host}", None):  # its own page; curl or the CLI
                headers = {"Origin": origin} if origin else {}
                assert (await http.get("/api/agents", headers=headers)).status_code == 200
        event, code = await ws_open(url, agent="local", _headers=evil)  # type: ignore[arg-type]
        assert event["type"] == "error" and "origin http://evil.example refused" in event["error"]
        assert code == 4403
        # a look-alike host is another origin too
        sneaky = {"Origin": f"http://{host}.evil.example"}
        event, code = await ws_open(url, agent="local", _headers=sneaky)  # type: ignore[arg-type]
        assert code == 4403
        # DNS rebinding: a page whose name now resolves to 127.0.0.1 sends that name as Host
        # and as Origin, which match each other; only an address, localhost or the configured
        # host is this server's own name (one dependency guards HTTP and WebSockets alike)
        port = host.rpartition(":")[2]
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        async with httpx.AsyncClient(base_url=url) as http:
            refused = await http.post("/api/sessions", json={"agent": "local"}, headers=rebound)
            assert refused.status_code == 403, refused.text
            local = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
            assert (await http.get("/api/agents", headers=local)).status_code == 200
        event, code = await ws_open(url, agent="local", _headers={"Origin": f"http://{host}"})  # type: ignore[arg-type]
        assert event["type"] == "session" and code is None
    assert len(await svc.store.list_configs()) == 1  # only the allowed call made a session


def test_the_host_names_trusted_with_auth_off() -> None:
    from voicemesh.transport.api.security import trusted_host

    for host in (
        "127.0.0.1:8080",
        "localhost:8080",
        "[::1]:8080",
        "192.168.1.20:8080",
        "LOCALHOST",
    ):
        assert trusted_host(host, "127.0.0.1"), host
    assert trusted_host("voice.lan:8080", "voice.lan")  # VOICEMESH_HTTP_HOST names it
    for host in ("evil.example:8080", "127.0.0.1.nip.io:8080", "localhost.evil.example", ""):
        assert not trusted_host(host, "127.0.0.1"), host


async def test_auth_on_does_not_look_at_origin(
    settings: Settings, started: Callable[..., Any]
) -> None:
    svc = await started(keyed(settings, KEY))
    headers = {"Authorization": f"Bearer {KEY}", "Origin": "http://x.example"}
    async with api_client(svc, headers=headers) as c:  # the key decides, not the page
        assert (await c.get("/api/agents")).status_code == 200
