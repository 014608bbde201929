"""Two tenants and an admin on one transport (real uvicorn, NATS and Valkey): tenant B walks every
API route and every way of joining a call (WebSocket, WebRTC offer, Twilio, Daily) against tenant
A's session and agent and finds nothing there (404, or the close code of a missing session); each
tenant lists only its own; global agents are read by all and written by admins only; the
per-tenant limits (concurrent calls, session rate) refuse one tenant while the other goes on; the
keys file and the env keys are parsed without ever echoing a key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from pydantic import SecretStr, ValidationError

from tests.conftest import AGENT_FILE
from tests.support import serving
from tests.test_daily import FakeDaily
from tests.test_webrtc import audio_offer
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.state.keys import ADMIN_TENANT
from voicemesh.transport.api.security import ApiKeyAuth, AuthConfigError
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.tenants import CallLimited, CallSlots, Tenants
from voicemesh.transport.carriers import daily

ADMIN = "k-admin-0a1b2c3d4e5f"
A_KEY = "k-acme-9f8e7d6c5b4a"
B_KEY = "k-beta-1122334455aa"
TWILIO_TOKEN = "tw-tenants-token-42"
KEYS = (ADMIN, A_KEY, B_KEY, TWILIO_TOKEN)
MISSING_SID = "M" * 22  # a well-formed id no session has


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(tmp_path: Path, tenants: dict[str, Any]) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": tenants}))
    return str(path)


def tenant_settings(settings: Settings, tmp_path: Path, **more: Any) -> Settings:
    """Admin key ADMIN; tenant acme by its raw key (env), tenant beta by its key's digest (file)."""
    return settings.model_copy(
        update={
            "auth": "required",
            "api_keys": (SecretStr(ADMIN),),
            "tenant_keys": (("acme", SecretStr(A_KEY)),),
            "keys_file": keys_file(tmp_path, {"beta": {"key_sha256": [sha(B_KEY)]}}),
            "twilio_auth_token": SecretStr(TWILIO_TOKEN),
            "webrtc_loopback": True,
            **more,
        }
    )


@dataclass
class Stack:
    service: TransportService
    url: str
    admin: httpx.AsyncClient
    a: httpx.AsyncClient
    b: httpx.AsyncClient

    def ws(self, path: str) -> str:
        return f"ws{self.url[4:]}{path}"


@contextlib.asynccontextmanager
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    service = TransportService(settings)
    await service.start()
    try:
        await service.store.create_agent("local", parse_agent_config(AGENT_FILE.read_bytes()))
        async with serving(service) as url:
            clients = [
                httpx.AsyncClient(base_url=url, headers={"X-API-Key": k}, timeout=20)
                for k in (ADMIN, A_KEY, B_KEY)
            ]
            try:
                yield Stack(service, url, *clients)
            finally:
                for c in clients:
                    await c.aclose()
    finally:
        await service.stop()


@pytest.fixture
async def two(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    async with stack(tenant_settings(settings, tmp_path)) as s:
        yield s


async def new_session(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/api/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


# --- every API route ----------------------------------------------------------------------------


SESSION_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/sessions/{sid}", None),
    ("PUT", "/api/sessions/{sid}/config", "config"),
    ("PATCH", "/api/sessions/{sid}/config", {"system_prompt": "owned by beta now"}),
    ("PUT", "/api/sessions/{sid}/agent", {"agent": "local"}),
    ("POST", "/api/sessions/{sid}/ttl", {"ttl_s": 30}),
    ("GET", "/api/sessions/{sid}/context", None),
    ("DELETE", "/api/sessions/{sid}", None),
]
AGENT_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/agents/{name}", None),
    ("PUT", "/api/agents/{name}", "update"),
    ("POST", "/api/agents/{name}/set-default", None),
    ("DELETE", "/api/agents/{name}", None),
    ("POST", "/api/sessions", "from-agent"),
]


def body(kind: Any, agent_json: dict, name: str = "") -> Any:
    if kind == "config":
        return agent_json
    if kind == "update":
        return {"config": agent_json}
    if kind == "from-agent":
        return {"agent": name}
    return kind


async def test_every_api_route_finds_nothing_of_another_tenant(
    two: Stack, agent_json: dict
) -> None:
    a_sid = await new_session(two.a)
    await two.service.store.append_context(a_sid, {"role": "user", "content": "acme's secret"})
    r = await two.a.post("/api/agents", json={"name": "acme-bot", "config": agent_json})
    assert r.status_code == 201 and r.json()["owner"] == "acme", r.text

    for method, path, kind in SESSION_ROUTES:
        theirs = await two.b.request(method, path.format(sid=a_sid), json=body(kind, agent_json))
        missing = await two.b.request(
            method, path.format(sid=MISSING_SID), json=body(kind, agent_json)
        )
        assert theirs.status_code == missing.status_code == 404, (method, path, theirs.text)
        # exactly like a session that does not exist: the same words, but for the id
        assert theirs.json()["detail"].replace(a_sid, "ID") == missing.json()["detail"].replace(
            MISSING_SID, "ID"
        ), (method, path)
        assert "acme" not in theirs.text
    for method, path, kind in AGENT_ROUTES:
        theirs = await two.b.request(
            method, path.format(name="acme-bot"), json=body(kind, agent_json, "acme-bot")
        )
        missing = await two.b.request(
            method, path.format(name="nobody"), json=body(kind, agent_json, "nobody")
        )
        assert theirs.status_code == missing.status_code == 404, (method, path, theirs.text)
        assert theirs.json()["detail"].replace("acme-bot", "X") == missing.json()["detail"].replace(
            "nobody", "X"
        ), (method, path)

    # nothing of acme's changed, and acme still has all of it
    stored = await two.service.store.get_config(a_sid)
    assert stored is not None and stored.version == 1 and stored.owner == "acme"
    assert stored.ttl_ms > 60_000  # the TTL was not cut to 30 s
    r = await two.a.get(f"/api/sessions/{a_sid}/context")
    assert r.status_code == 200 and r.json()["messages"][0]["content"] == "acme's secret"
    r = await two.a.get("/api/agents/acme-bot")
    assert r.status_code == 200 and r.json()["version"] == 1
    for method, path, kind in SESSION_ROUTES:  # and every route serves its owner
        r = await two.a.request(method, path.format(sid=a_sid), json=body(kind, agent_json))
        assert r.status_code == 200, (method, path, r.text)
    # an admin sees and changes any tenant's session
    other = await new_session(two.b)
    r = await two.admin.patch(f"/api/sessions/{other}/config", json={"system_prompt": "x"})
    assert r.status_code == 200 and r.json()["version"] == 2
    assert (await two.admin.get(f"/api/sessions/{other}")).json()["owner"] == "beta"


async def test_listing_shows_only_your_own(two: Stack, agent_json: dict) -> None:
    a_sids = {await new_session(two.a) for _ in range(2)}
    b_sids = {await new_session(two.b)}
    admin_sid = await new_session(two.admin)
    r = await two.a.get("/api/sessions")
    assert set(r.json()["sessions"]) == a_sids
    r = await two.b.get("/api/sessions")
    assert set(r.json()["sessions"]) == b_sids
    r = await two.admin.get("/api/sessions")
    assert set(r.json()["sessions"]) == a_sids | b_sids | {admin_sid}

    await two.a.post("/api/agents", json={"name": "acme-bot", "config": agent_json})
    await two.b.post("/api/agents", json={"name": "beta-bot", "config": agent_json})
    # the same name in two tenants: two agents, neither sees the other's
    await two.b.post("/api/agents", json={"name": "acme-bot", "config": agent_json})

    def listed(r: httpx.Response) -> set[tuple[str, str | None]]:
        return {(a["name"], a["owner"]) for a in r.json()["agents"]}

    assert listed(await two.a.get("/api/agents")) == {("acme-bot", "acme"), ("local", None)}
    assert listed(await two.b.get("/api/agents")) == {
        ("beta-bot", "beta"),
        ("acme-bot", "beta"),
        ("local", None),
    }
    assert listed(await two.admin.get("/api/agents")) == {
        ("local", None),
        ("acme-bot", "acme"),
        ("acme-bot", "beta"),
        ("beta-bot", "beta"),
    }
    # an admin addresses a tenant's agents with ?tenant=; a tenant cannot name another
    r = await two.admin.get("/api/agents/beta-bot", params={"tenant": "beta"})
    assert r.status_code == 200 and r.json()["owner"] == "beta"
    assert (await two.admin.get("/api/agents/beta-bot")).status_code == 404  # not global
    r = await two.a.get("/api/agents", params={"tenant": "beta"})
    assert r.status_code == 404
    r = await two.a.get("/api/agents/beta-bot", params={"tenant": "beta"})
    assert r.status_code == 404


async def test_global_agents_are_read_by_all_and_written_by_admins(
    two: Stack, agent_json: dict
) -> None:
    for tenant in (two.a, two.b):
        r = await tenant.get("/api/agents/local")
        assert r.status_code == 200 and r.json()["owner"] is None
        assert (await tenant.get("/api/agents/current")).json()["name"] == "local"
    refused = [
        await two.b.put("/api/agents/local", json={"config": agent_json, "description": "mine"}),
        await two.b.delete("/api/agents/local"),
    ]
    for r in refused:
        assert r.status_code == 403 and "only an admin key" in r.json()["detail"], r.text
    record = await two.service.store.get_agent("local")
    assert record is not None and record.version == 1 and record.description == ""
    # a tenant's own agent of the same name shadows the global one for that tenant only
    r = await two.b.post("/api/agents", json={"name": "local", "config": agent_json})
    assert r.status_code == 201 and r.json()["owner"] == "beta"
    assert (await two.b.get("/api/agents/local")).json()["owner"] == "beta"
    assert (await two.a.get("/api/agents/local")).json()["owner"] is None
    # set-default is the tenant's own choice; the global default stays
    r = await two.a.post("/api/agents", json={"name": "acme-bot", "config": agent_json})
    r = await two.a.post("/api/agents/acme-bot/set-default")
    assert r.status_code == 200
    assert (await two.a.get("/api/agents/current")).json()["name"] == "acme-bot"
    assert (await two.b.get("/api/agents/current")).json()["name"] == "local"
    assert (await two.admin.get("/api/agents/current")).json()["name"] == "local"
    sid = await new_session(two.a)  # no agent named: the tenant's default
    assert (await two.a.get(f"/api/sessions/{sid}")).json()["agent"] == "acme-bot"
    # the admin writes the global agent
    r = await two.admin.put("/api/agents/local", json={"config": agent_json, "description": "v2"})
    assert r.status_code == 200 and r.json()["version"] == 2
    r = await two.admin.post("/api/agents", json={"name": "shared", "config": agent_json})
    assert r.status_code == 201 and r.json()["owner"] is None
    assert (await two.b.get("/api/agents/shared")).status_code == 200


# --- every way of joining a call ----------------------------------------------------------------


async def ws_join(url: str, key: str, **params: str) -> tuple[dict[str, Any], int | None]:
    """The first event and the close code (None: the call was running, and was hung up)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    async with websockets.connect(f"{url}?{query}", additional_headers={"X-API-Key": key}) as ws:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        if first.get("type") == "error":
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return first, ws.close_code
        await ws.send(orjson.dumps({"type": "end"}).decode())
        return first, None


async def test_websocket_joins_only_your_own_session(two: Stack, agent_json: dict) -> None:
    a_sid = await new_session(two.a)
    await two.a.post("/api/agents", json={"name": "acme-bot", "config": agent_json})
    url = two.ws("/ws/call")
    theirs, code = await ws_join(url, B_KEY, session_id=a_sid)
    missing, missing_code = await ws_join(url, B_KEY, session_id=MISSING_SID)
    assert code == missing_code == 4404
    assert theirs["error"].replace(a_sid, "ID") == missing["error"].replace(MISSING_SID, "ID")
    event, code = await ws_join(url, B_KEY, agent="acme-bot")
    assert code == 4404 and "acme-bot" in event["error"]
    # its owner and an admin join it
    for key in (A_KEY, ADMIN):
        event, code = await ws_join(url, key, session_id=a_sid)
        assert event["type"] == "session" and event["session_id"] == a_sid and code is None
    assert set(await two.service.store.list_configs(owner="beta")) == set()


async def test_webrtc_offer_and_trickle_only_for_your_own(two: Stack) -> None:
    a_sid = await new_session(two.a)
    offer = await audio_offer()
    wanted = {"sdp": offer, "type": "offer", "request_data": {"session_id": a_sid}}
    r = await two.b.post("/api/offer", json=wanted)
    missing = await two.b.post(
        "/api/offer", json={**wanted, "request_data": {"session_id": MISSING_SID}}
    )
    assert r.status_code == missing.status_code == 404
    assert r.json()["detail"].replace(a_sid, "ID") == missing.json()["detail"].replace(
        MISSING_SID, "ID"
    )
    # acme's own call: beta can neither renegotiate it nor trickle candidates into it
    r = await two.a.post("/api/offer", json=wanted)
    assert r.status_code == 200, r.text
    pc_id = r.json()["pc_id"]
    r = await two.b.patch("/api/offer", json={"pc_id": pc_id, "candidates": []})
    assert r.status_code == 404
    r = await two.b.post("/api/offer", json={"sdp": offer, "type": "offer", "pc_id": pc_id})
    assert r.status_code == 404
    r = await two.a.patch("/api/offer", json={"pc_id": pc_id, "candidates": []})
    assert r.status_code == 200


def twilio_sign(token: str, url: str) -> str:
    """Twilio's algorithm for a GET: base64(HMAC-SHA1(auth token, the full URL))."""
    mac = hmac.new(token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


async def twilio_join(url: str, **parameters: str) -> int | None:
    """A Twilio stream (signed as Twilio signs it) that starts with `parameters`: its close code,
    or None when the call was taken (then it stops)."""
    headers = {"X-Twilio-Signature": twilio_sign(TWILIO_TOKEN, url)}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(orjson.dumps({"event": "connected", "protocol": "Call"}).decode())
        start = {
            "streamSid": "MZ" + "1" * 32,
            "callSid": "CA1",
            "customParameters": parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await ws.send(orjson.dumps({"event": "start", "start": start}).decode())
        try:
            await asyncio.wait_for(ws.recv(), 1.0)
        except websockets.ConnectionClosed:
            return ws.close_code
        except TimeoutError:
            pass
        await ws.send(orjson.dumps({"event": "stop"}).decode())
        return None


async def test_twilio_joins_only_your_own_session(
    two: Stack, agent_json: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a_sid = await new_session(two.a)
    await two.a.post("/api/agents", json={"name": "acme-bot", "config": agent_json})
    url = two.ws("/ws/twilio")
    assert await twilio_join(url, session_id=a_sid, api_key=B_KEY) == 4404
    assert await twilio_join(url, session_id=MISSING_SID, api_key=B_KEY) == 4404
    assert await twilio_join(url, agent="acme-bot", api_key=B_KEY) == 4404
    assert await twilio_join(url, session_id=a_sid, api_key=A_KEY) is None  # its owner's
    assert await twilio_join(url, agent="acme-bot", api_key=A_KEY) is None
    assert await twilio_join(url, session_id=a_sid, api_key="k-nobody") == 4401
    for secret in KEYS:
        assert secret not in caplog.text


async def test_daily_starts_and_stops_only_your_own(
    two: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daily, "daily_transport", FakeDaily)
    room = "https://example.daily.co/acme"
    a_sid = await new_session(two.a)
    r = await two.b.post("/api/daily/calls", json={"session_id": a_sid, "room_url": room})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert not FakeDaily.made or FakeDaily.made[-1].room_url != room
    r = await two.a.post("/api/daily/calls", json={"session_id": a_sid, "room_url": room})
    assert r.status_code == 201, r.text
    # acme's session has a bot now: beta still finds no session (not a 409 that tells it so)
    r = await two.b.post("/api/daily/calls", json={"session_id": a_sid, "room_url": room})
    assert r.status_code == 404
    r = await two.b.delete(f"/api/daily/calls/{a_sid}")
    missing = await two.b.delete(f"/api/daily/calls/{MISSING_SID}")
    assert r.status_code == missing.status_code == 404
    assert r.json()["detail"].replace(a_sid, "ID") == missing.json()["detail"].replace(
        MISSING_SID, "ID"
    )
    r = await two.a.post("/api/daily/calls", json={"session_id": a_sid, "room_url": room})
    assert r.status_code == 409  # its owner is told
    r = await two.a.delete(f"/api/daily/calls/{a_sid}")
    assert r.status_code == 200 and r.json()["session_id"] == a_sid


# --- per-tenant limits --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def held_call(url: str, key: str) -> AsyncIterator[dict[str, Any]]:
    """A /ws/call kept open (on the default agent) until the block ends."""
    async with websockets.connect(url, additional_headers={"X-API-Key": key}) as ws:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        yield first
        if first.get("type") == "session":
            await ws.send(orjson.dumps({"type": "end"}).decode())


async def test_concurrent_calls_per_tenant(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """beta may run 2 calls at once (its own limit in the keys file); acme keeps the default."""
    limited = tenant_settings(settings, tmp_path, session_rate="off")
    limited = limited.model_copy(
        update={
            "keys_file": keys_file(tmp_path, {"beta": {"key_sha256": [sha(B_KEY)], "max_calls": 2}})
        }
    )
    async with stack(limited) as s:
        url = s.ws("/ws/call")
        async with held_call(url, B_KEY) as one, held_call(url, B_KEY) as two:
            assert one["type"] == two["type"] == "session"  # their slots were taken before
            assert await probe(s).count("beta") == 2
            # a third: refused over the WebSocket, over WebRTC and over Daily, sessions untouched
            before = await s.service.store.list_configs(owner="beta")
            event, code = await ws_join(url, B_KEY)
            assert code == 4429 and event["retry_after_s"] >= 1
            assert "too many concurrent calls: tenant beta runs 2 of at most 2" in event["error"]
            r = await s.b.post("/api/offer", json={"sdp": await audio_offer(), "type": "offer"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
            r = await s.b.post("/api/daily/calls", json={"room_url": "https://x.daily.co/r"})
            assert r.status_code == 429 and "retry-after" in r.headers
            assert await s.service.store.list_configs(owner="beta") == before
            # acme (and the admin) call on meanwhile
            for key in (A_KEY, ADMIN):
                event, code = await ws_join(url, key)
                assert event["type"] == "session" and code is None
        # the calls ended: beta calls again (their slots were given back)
        await until_async(lambda: probe(s).count("beta"), 0)
        event, code = await ws_join(url, B_KEY)
        assert event["type"] == "session" and code is None
    assert "call limit of tenant beta reached" in caplog.text


def probe(s: Stack) -> CallSlots:
    """A reader of the tenants' call counts in the stack's Valkey."""
    return CallSlots(lambda: s.service.store, instance="probe", lease_s=30)


async def until_async(read: Any, want: Any, limit_s: float = 5.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if await read() == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still {await read()!r}, not {want!r}")


async def test_a_crashed_transports_call_slots_lapse(settings: Settings, store: Any) -> None:
    """A slot is a lease: a transport that stops renewing (it died) frees its tenant's slots
    within one lease, with no one to release them."""
    tenant = Tenants(
        settings.model_copy(
            update={"tenant_keys": (("acme", SecretStr(A_KEY)),), "tenant_max_calls": 1}
        )
    ).identify(A_KEY)
    assert tenant is not None and tenant.max_calls == 1
    crashed = CallSlots(lambda: store, instance="crashed", lease_s=1)
    slot = await crashed.acquire(tenant)
    other = CallSlots(lambda: store, instance="alive", lease_s=1)
    with pytest.raises(CallLimited):
        await other.acquire(tenant)
    await asyncio.sleep(0.8)  # renewed meanwhile (every third of the lease): still held
    with pytest.raises(CallLimited):
        await other.acquire(tenant)
    assert slot._renewer is not None
    slot._renewer.cancel()  # the transport dies: no renewal, no release
    await asyncio.sleep(1.2)
    assert await other.count("acme") == 0
    again = await other.acquire(tenant)
    await again.release()
    assert await other.count("acme") == 0


async def test_session_rate_per_tenant(settings: Settings, tmp_path: Path) -> None:
    async with stack(tenant_settings(settings, tmp_path, session_rate="2/60")) as s:
        for _ in range(2):
            await new_session(s.a)
        r = await s.a.post("/api/sessions", json={})
        assert r.status_code == 429 and 55 <= int(r.headers["retry-after"]) <= 60
        assert "at most 2 per 60 s" in r.json()["detail"]
        event, code = await ws_join(s.ws("/ws/call"), A_KEY)  # a new session by call: counted
        assert code == 4429 and event["retry_after_s"] >= 55
        # beta has its own budget, and acme may still join the sessions it has
        for _ in range(2):
            await new_session(s.b)
        a_sid = (await s.a.get("/api/sessions")).json()["sessions"][0]
        event, code = await ws_join(s.ws("/ws/call"), A_KEY, session_id=a_sid)
        assert event["type"] == "session" and code is None


# --- configuration ------------------------------------------------------------------------------


def test_keys_from_env_and_file(settings: Settings, tmp_path: Path) -> None:
    path = keys_file(
        tmp_path,
        {
            "acme": {"keys": ["k-acme-file-0001"], "max_calls": 3, "session_rate": "5/10"},
            "ops": {"key_sha256": [sha("k-ops-777")], "admin": True},
            "quiet": {"keys": ["k-quiet-0002"], "max_calls": 0, "session_rate": "off"},
        },
    )
    tenants = Tenants(
        settings.model_copy(
            update={
                "api_keys": (SecretStr(ADMIN),),
                "tenant_keys": (("acme", SecretStr(A_KEY)),),
                "keys_file": path,
            }
        )
    )
    assert tenants.names == ["acme", ADMIN_TENANT, "ops", "quiet"]
    acme, ops, admin = (tenants.identify(k) for k in ("k-acme-file-0001", "k-ops-777", ADMIN))
    assert acme is not None and acme == tenants.identify(A_KEY)  # both of acme's keys
    assert (acme.name, acme.admin, acme.max_calls, acme.session_rate) == ("acme", False, 3, (5, 10))
    assert ops is not None and ops.admin and ops.max_calls == 20 and ops.session_rate == (60, 60)
    assert admin is not None and admin.name == ADMIN_TENANT and admin.admin
    quiet = tenants.identify("k-quiet-0002")
    assert quiet is not None and (quiet.max_calls, quiet.session_rate) == (0, None)
    assert tenants.identify("k-ops-777x") is None and tenants.identify("") is None


def test_env_tenant_keys_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_TENANT_KEYS", f" acme:{A_KEY} , beta:{B_KEY},, ")
    s = Settings()
    assert [(t, k.get_secret_value()) for t, k in s.tenant_keys] == [
        ("acme", A_KEY),
        ("beta", B_KEY),
    ]
    assert A_KEY not in repr(s)
    for bad, said in (
        (f"{A_KEY}", "entry 1 is not TENANT:KEY"),
        (f"acme:{A_KEY},Bad Name:{B_KEY}", "entry 2: tenant 'Bad Name'"),
        (f"acme:{A_KEY},beta:", "entry 2 is not TENANT:KEY"),
        (f"acme\n:{A_KEY}", "entry 1: tenant"),
    ):
        monkeypatch.setenv("VOICEMESH_TENANT_KEYS", bad)
        with pytest.raises(ValidationError) as err:
            Settings()
        assert said in str(err.value), (bad, str(err.value))
        assert A_KEY not in str(err.value) and B_KEY not in str(err.value)


def test_bad_keys_configs_are_refused_without_echoing_a_key(
    settings: Settings, tmp_path: Path
) -> None:
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({}, {"Acme": {"keys": [A_KEY]}}, "tenants.Acme: Value error, tenant name 'Acme'"),
        ({}, {"acme": {"keys": [A_KEY], "owner": "x"}}, "tenants.acme.owner: Extra inputs"),
        ({}, {"acme": {"key_sha256": [A_KEY]}}, "tenants.acme.key_sha256.0: String should match"),
        ({}, {"acme": {"keys": [A_KEY], "session_rate": "lots"}}, "COUNT/SECONDS"),
        ({}, {"acme": {"keys": [A_KEY]}, "beta": {"keys": [A_KEY]}}, "two tenants"),
        ({}, {"admin": {"keys": [A_KEY]}}, "give it admin: true"),
        ({"tenant_keys": (("admin", SecretStr(B_KEY)),)}, {}, "names tenant 'admin'"),
        ({"tenant_keys": (("ops", SecretStr(B_KEY)),)}, {"ops": {"admin": True}}, "an admin in"),
        ({"api_keys": (SecretStr(A_KEY),)}, {"acme": {"key_sha256": [sha(A_KEY)]}}, "two"),
    ]
    for more, file, said in cases:
        path = keys_file(tmp_path, file)
        with pytest.raises(AuthConfigError) as err:
            ApiKeyAuth(settings.model_copy(update={"keys_file": path, **more}))
        assert said in str(err.value), (file, str(err.value))
        assert A_KEY not in str(err.value) and B_KEY not in str(err.value)
        assert sha(A_KEY) not in str(err.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AuthConfigError, match=r"bad\.json"):
        ApiKeyAuth(settings.model_copy(update={"keys_file": str(tmp_path / "bad.json")}))
    with pytest.raises(AuthConfigError, match="cannot read it"):
        ApiKeyAuth(settings.model_copy(update={"keys_file": str(tmp_path / "none.json")}))
    # tenant keys alone are enough for auth to be required
    auth = ApiKeyAuth(
        settings.model_copy(
            update={"auth": "required", "tenant_keys": (("acme", SecretStr(A_KEY)),)}
        )
    )
    assert auth.required and auth.key_count == 1 and auth.matches(A_KEY)


async def test_auth_off_is_one_admin_tenant(settings: Settings, agent_json: dict) -> None:
    service = TransportService(settings.model_copy(update={"auth": "off"}))
    await service.start()
    try:
        async with serving(service) as url, httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/api/agents", json={"name": "mine", "config": agent_json})
            assert r.status_code == 201 and r.json()["owner"] is None  # global: admins write
            r = await c.post("/api/sessions", json={})
            assert r.status_code == 201 and r.json()["owner"] == ADMIN_TENANT
            # a session stored before owners existed is the admin tenant's, and shows up
            old = await service.store.create_session(parse_agent_config(orjson.dumps(agent_json)))
            await service.store.client.hdel(service.store.keys.session(old.session_id), "owner")
            assert (await service.store.get_config(old.session_id)).owner == ADMIN_TENANT  # type: ignore[union-attr]
            assert old.session_id in (await c.get("/api/sessions")).json()["sessions"]
    finally:
        await service.stop()
