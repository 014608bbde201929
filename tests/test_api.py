"""The config-manager HTTP API in-process (httpx + ASGITransport) against real NATS and Valkey."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from pydantic import SecretStr

from voicemesh.bus import Bus, Frame, Kind
from voicemesh.config.settings import Settings
from voicemesh.transport.api.app import create_app
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.api.sessions import merge_patch

API_KEY = "test-api-key-4f1c"


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[TransportService]:
    # Auth stays on (the default): every request below carries the key (tests/test_security.py
    # covers what happens without it).
    svc = TransportService(settings.model_copy(update={"api_keys": (SecretStr(API_KEY),)}))
    await svc.start()  # ASGITransport does not run the lifespan
    yield svc
    await svc.stop()


@pytest.fixture
async def client(service: TransportService) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as c:
        yield c


def mutate(agent_json: dict, fn: Callable[[dict], Any]) -> dict:
    data = copy.deepcopy(agent_json)
    fn(data)
    return data


def echo_config(agent_json: dict) -> dict:
    return mutate(
        agent_json,
        lambda d: d["connectors"].__setitem__(
            "llm", {"primary": "echo", "fallback": [], "config": {"echo": {"prefix": "E"}}}
        ),
    )


def paths(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail
    for item in detail:
        assert {"loc", "path", "msg"} <= set(item)
        assert item["msg"]
    return [d["path"] for d in detail]


async def make_agent(
    client: httpx.AsyncClient, name: str, config: dict, **extra: Any
) -> dict[str, Any]:
    r = await client.post("/api/agents", json={"name": name, "config": config, **extra})
    assert r.status_code == 201, r.text
    return r.json()


async def make_session(client: httpx.AsyncClient, body: dict | None = None) -> dict[str, Any]:
    r = await client.post("/api/sessions", json=body if body is not None else {})
    assert r.status_code == 201, r.text
    return r.json()


# --- bad configs: every case is a 422 naming the path, and nothing is stored -------------------

BAD_CONFIGS: dict[str, tuple[Callable[[dict], Any], str]] = {
    "unknown-primary": (
        lambda d: d["connectors"]["tts"].__setitem__("primary", "nope"),
        "connectors.tts.primary",
    ),
    "unknown-fallback": (
        lambda d: d["connectors"]["llm"].__setitem__("fallback", ["scripted", "nope"]),
        "connectors.llm.fallback[1]",
    ),
    "unknown-stage": (
        lambda d: d["connectors"].__setitem__("vision", {"primary": "x"}),
        "connectors.vision",
    ),
    "stream-mismatch": (
        lambda d: d["pipeline"]["flow"][1].__setitem__("stream", "audio"),
        "pipeline.flow[1].stream",
    ),
    "open-flow": (lambda d: d["pipeline"]["flow"].pop(), "pipeline.flow"),
    "stage-without-connectors": (lambda d: d["connectors"].pop("tts"), "connectors.tts"),
    "secret-in-clear": (
        lambda d: d["connectors"]["llm"]["config"].__setitem__(
            "openai", {"model": "m", "api_key": "sk-x1"}
        ),
        "connectors.llm.config.openai.api_key",
    ),
    # "${ENV}" stands only in a declared credential field, naming an allowed variable
    "reference-in-a-reply": (
        lambda d: d["connectors"]["llm"]["config"]["scripted"].__setitem__(
            "replies", ["${OPENAI_API_KEY}"]
        ),
        "connectors.llm.config.scripted.replies[0]",
    ),
    "reference-in-echo-prefix": (
        lambda d: d["connectors"]["llm"]["config"].__setitem__(
            "echo", {"prefix": "${OPENAI_API_KEY}"}
        ),
        "connectors.llm.config.echo.prefix",
    ),
    "credential-not-allowed": (
        lambda d: d["connectors"]["llm"]["config"].__setitem__(
            "openai", {"model": "m", "api_key": "${VALKEY_PASSWORD}"}
        ),
        "connectors.llm.config.openai.api_key",
    ),
    "bad-option": (
        lambda d: d["connectors"]["llm"]["config"]["smollm2"].__setitem__("max_tokens", 0),
        "connectors.llm.config.smollm2.max_tokens",
    ),
    "missing-pipeline": (lambda d: d.pop("pipeline"), "pipeline"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
async def test_create_agent_with_bad_config(
    client: httpx.AsyncClient, agent_json: dict, case: str
) -> None:
    await make_agent(client, "keep", agent_json)
    before = (await client.get("/api/agents")).json()
    fn, path = BAD_CONFIGS[case]
    r = await client.post("/api/agents", json={"name": "bad", "config": mutate(agent_json, fn)})
    assert f"config.{path}" in paths(r)
    assert (await client.get("/api/agents")).json() == before
    assert (await client.get("/api/agents/bad")).status_code == 404


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
async def test_update_agent_with_bad_config(
    client: httpx.AsyncClient, agent_json: dict, case: str
) -> None:
    await make_agent(client, "a1", agent_json, description="d")
    before = (await client.get("/api/agents/a1")).json()
    fn, path = BAD_CONFIGS[case]
    r = await client.put("/api/agents/a1", json={"config": mutate(agent_json, fn)})
    assert f"config.{path}" in paths(r)
    got = (await client.get("/api/agents/a1")).json()
    assert got == before
    assert got["version"] == 1


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
async def test_create_session_with_bad_config(
    client: httpx.AsyncClient, agent_json: dict, case: str
) -> None:
    fn, path = BAD_CONFIGS[case]
    r = await client.post("/api/sessions", json={"config": mutate(agent_json, fn)})
    assert f"config.{path}" in paths(r)
    assert (await client.get("/api/sessions")).json() == {"sessions": []}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
async def test_replace_session_config_with_bad_config(
    client: httpx.AsyncClient, bus: Bus, settings: Settings, agent_json: dict, case: str
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    sub = await bus.nc.subscribe(f"{settings.subject_prefix}.config.update")
    await bus.nc.flush()
    fn, path = BAD_CONFIGS[case]
    r = await client.put(f"/api/sessions/{sid}/config", json=mutate(agent_json, fn))
    assert path in paths(r)
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["version"] == 1
    assert got["config"]["connectors"]["tts"]["primary"] == "piper"
    # No update is announced for a rejected config.
    with pytest.raises(asyncio.TimeoutError):
        await sub.next_msg(timeout=0.1)


async def test_patch_session_with_bad_result(client: httpx.AsyncClient, agent_json: dict) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    before = (await client.get(f"/api/sessions/{sid}")).json()
    cases = [
        ({"connectors": {"tts": {"primary": "nope"}}}, "connectors.tts.primary"),
        ({"connectors": {"tts": None}}, "connectors.tts"),
        ({"pipeline": None}, "pipeline"),
        (
            {"connectors": {"llm": {"config": {"smollm2": {"max_tokens": 99999}}}}},
            "connectors.llm.config.smollm2.max_tokens",
        ),
        (
            {"connectors": {"llm": {"config": {"smollm2": {"token": "abc"}}}}},
            "connectors.llm.config.smollm2.token",
        ),
    ]
    for patch, path in cases:
        r = await client.patch(f"/api/sessions/{sid}/config", json=patch)
        assert path in paths(r), patch
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["version"] == 1
    assert got["config"] == before["config"]


async def test_patch_body_must_be_an_object(client: httpx.AsyncClient, agent_json: dict) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    r = await client.patch(f"/api/sessions/{sid}/config", json=[1, 2])
    assert r.status_code == 422
    assert (await client.get(f"/api/sessions/{sid}")).json()["version"] == 1


# --- agents ----------------------------------------------------------------------------------


async def test_agents_crud_and_default(client: httpx.AsyncClient, agent_json: dict) -> None:
    r = await client.get("/api/agents")
    assert r.status_code == 200
    assert r.json() == {"default": None, "agents": []}
    assert (await client.get("/api/agents/current")).status_code == 404

    a = await make_agent(client, "support", agent_json, description="helps")
    assert a["name"] == "support" and a["version"] == 1 and a["description"] == "helps"
    assert a["config"]["pipeline"]["flow"][0] == {
        "from": "transport",
        "to": "stt",
        "stream": "audio",
    }
    # The first agent becomes the default.
    listing = (await client.get("/api/agents")).json()
    assert listing["default"] == "support"
    assert [x["name"] for x in listing["agents"]] == ["support"]
    cur = (await client.get("/api/agents/current")).json()
    assert cur["name"] == "support"

    await make_agent(client, "sales", echo_config(agent_json))
    assert (await client.get("/api/agents")).json()["default"] == "support"
    got = (await client.get("/api/agents/sales")).json()
    assert got["config"]["connectors"]["llm"]["primary"] == "echo"

    r = await client.post("/api/agents/sales/set-default")
    assert r.status_code == 200 and r.json() == {"default": "sales"}
    assert (await client.get("/api/agents/current")).json()["name"] == "sales"

    # Update: version goes up, description kept when not given.
    r = await client.put("/api/agents/support", json={"config": echo_config(agent_json)})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["version"] == 2 and up["description"] == "helps"
    assert up["config"]["connectors"]["llm"]["primary"] == "echo"
    r = await client.put(
        "/api/agents/support", json={"config": agent_json, "description": "new text"}
    )
    assert r.json()["version"] == 3 and r.json()["description"] == "new text"

    # Deleting the default clears it.
    r = await client.delete("/api/agents/sales")
    assert r.status_code == 200 and r.json() == {"deleted": "sales"}
    listing = (await client.get("/api/agents")).json()
    assert listing["default"] is None
    assert [x["name"] for x in listing["agents"]] == ["support"]
    assert (await client.get("/api/agents/current")).status_code == 404
    assert (await client.get("/api/agents/sales")).status_code == 404


async def test_create_agent_as_default(client: httpx.AsyncClient, agent_json: dict) -> None:
    await make_agent(client, "one", agent_json)
    await make_agent(client, "two", agent_json, default=True)
    assert (await client.get("/api/agents")).json()["default"] == "two"


async def test_agent_errors(client: httpx.AsyncClient, agent_json: dict) -> None:
    await make_agent(client, "dup", agent_json)
    r = await client.post("/api/agents", json={"name": "dup", "config": echo_config(agent_json)})
    assert r.status_code == 409
    assert (await client.get("/api/agents/dup")).json()["version"] == 1

    assert (await client.get("/api/agents/ghost")).status_code == 404
    assert (await client.put("/api/agents/ghost", json={"config": agent_json})).status_code == 404
    assert (await client.delete("/api/agents/ghost")).status_code == 404
    assert (await client.post("/api/agents/ghost/set-default")).status_code == 404
    assert (await client.get("/api/agents")).json()["default"] == "dup"

    for name in ("has space", "current", "default", ".x"):
        r = await client.post("/api/agents", json={"name": name, "config": agent_json})
        assert paths(r) == ["name"], name
    r = await client.post("/api/agents", json={"name": "x", "config": agent_json, "extra": 1})
    assert "extra" in paths(r)
    r = await client.post("/api/agents", json={"name": "x"})
    assert "config" in paths(r)
    assert [a["name"] for a in (await client.get("/api/agents")).json()["agents"]] == ["dup"]


# --- sessions --------------------------------------------------------------------------------


async def test_session_from_agent_name(client: httpx.AsyncClient, agent_json: dict) -> None:
    await make_agent(client, "main", agent_json)
    await make_agent(client, "echoer", echo_config(agent_json))
    s = await make_session(client, {"agent": "echoer", "ttl_s": 120})
    assert s["agent"] == "echoer" and s["version"] == 1
    assert 118 <= s["ttl_s"] <= 120
    got = (await client.get(f"/api/sessions/{s['session_id']}")).json()
    assert got["session_id"] == s["session_id"]
    assert got["agent"] == "echoer"
    assert got["config"]["connectors"]["llm"]["primary"] == "echo"
    assert 118 <= got["ttl_s"] <= 120


async def test_session_from_raw_config(client: httpx.AsyncClient, agent_json: dict) -> None:
    cfg = echo_config(agent_json)
    s = await make_session(client, {"config": cfg})
    assert s["agent"] is None
    got = (await client.get(f"/api/sessions/{s['session_id']}")).json()
    assert got["agent"] is None
    assert got["config"]["connectors"]["llm"] == {
        "primary": "echo",
        "fallback": [],
        "config": {"echo": {"prefix": "E"}},
    }
    assert got["config"]["system_prompt"] == agent_json["system_prompt"]


async def test_session_from_default_agent(client: httpx.AsyncClient, agent_json: dict) -> None:
    # No agent yet: neither a name nor a config is a 404.
    assert (await client.post("/api/sessions", json={})).status_code == 404
    await make_agent(client, "main", agent_json)
    await make_agent(client, "other", echo_config(agent_json), default=True)
    s = await make_session(client, {})
    assert s["agent"] == "other"
    got = (await client.get(f"/api/sessions/{s['session_id']}")).json()
    assert got["config"]["connectors"]["llm"]["primary"] == "echo"
    # No body at all works too.
    r = await client.post("/api/sessions")
    assert r.status_code == 201 and r.json()["agent"] == "other"


async def test_session_creation_errors(client: httpx.AsyncClient, agent_json: dict) -> None:
    await make_agent(client, "main", agent_json)
    r = await client.post("/api/sessions", json={"agent": "ghost"})
    assert r.status_code == 404
    r = await client.post("/api/sessions", json={"agent": "main", "config": agent_json})
    assert paths(r) == ["agent"]
    r = await client.post("/api/sessions", json={"agent": "main", "ttl_s": 1})
    assert paths(r) == ["ttl_s"]
    assert (await client.get("/api/sessions")).json() == {"sessions": []}


async def test_session_agent_is_a_copy(client: httpx.AsyncClient, agent_json: dict) -> None:
    await make_agent(client, "main", agent_json)
    sid = (await make_session(client, {"agent": "main"}))["session_id"]
    r = await client.put("/api/agents/main", json={"config": echo_config(agent_json)})
    assert r.status_code == 200
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["config"]["connectors"]["llm"]["primary"] == "smollm2"
    assert got["version"] == 1


async def test_list_sessions(client: httpx.AsyncClient, agent_json: dict) -> None:
    a = (await make_session(client, {"config": agent_json}))["session_id"]
    b = (await make_session(client, {"config": agent_json}))["session_id"]
    r = await client.get("/api/sessions")
    assert r.status_code == 200
    assert sorted(r.json()["sessions"]) == sorted([a, b])


async def test_get_missing_session(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/sessions/doesnotexist123")).status_code == 404
    assert (await client.get("/api/sessions/bad.id")).status_code == 404


async def test_replace_session_config(
    client: httpx.AsyncClient, bus: Bus, settings: Settings, agent_json: dict
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    sub = await bus.nc.subscribe(f"{settings.subject_prefix}.config.update")
    await bus.nc.flush()
    r = await client.put(f"/api/sessions/{sid}/config", json=echo_config(agent_json))
    assert r.status_code == 200, r.text
    assert r.json() == {"session_id": sid, "version": 2}
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["version"] == 2
    assert got["config"]["connectors"]["llm"]["primary"] == "echo"
    msg = orjson.loads((await sub.next_msg(timeout=2)).data)
    assert msg["session_id"] == sid and msg["version"] == 2
    r = await client.put(f"/api/sessions/{sid}/config", json=agent_json)
    assert r.json()["version"] == 3
    r = await client.put("/api/sessions/doesnotexist123/config", json=agent_json)
    assert r.status_code == 404


async def test_patch_session_config(
    client: httpx.AsyncClient, bus: Bus, settings: Settings, agent_json: dict
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    sub = await bus.nc.subscribe(f"{settings.subject_prefix}.config.update")
    await bus.nc.flush()
    # Swap the LLM to echo; smollm2 leaves the chain, so its options go too (null removes).
    patch = {"connectors": {"llm": {"primary": "echo", "config": {"smollm2": None}}}}
    r = await client.patch(
        f"/api/sessions/{sid}/config",
        content=orjson.dumps(patch),
        headers={"content-type": "application/merge-patch+json"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"session_id": sid, "version": 2}
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["version"] == 2
    llm = got["config"]["connectors"]["llm"]
    assert llm["primary"] == "echo"
    assert llm["fallback"] == ["scripted"]  # untouched by the patch
    assert set(llm["config"]) == {"scripted"}
    # Everything outside the patch is unchanged.
    assert got["config"]["connectors"]["tts"] == agent_json["connectors"]["tts"]
    assert got["config"]["system_prompt"] == agent_json["system_prompt"]

    msg = orjson.loads((await sub.next_msg(timeout=2)).data)
    assert msg["session_id"] == sid
    assert msg["version"] == 2
    assert msg["updated_keys"] == ["connectors"]

    # Plain application/json is accepted too.
    r = await client.patch(f"/api/sessions/{sid}/config", json={"system_prompt": "Be brief."})
    assert r.status_code == 200 and r.json()["version"] == 3
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["config"]["system_prompt"] == "Be brief."
    assert got["config"]["connectors"]["llm"]["primary"] == "echo"
    msg = orjson.loads((await sub.next_msg(timeout=2)).data)
    assert (msg["session_id"], msg["version"]) == (sid, 3)

    r = await client.patch("/api/sessions/doesnotexist123/config", json={"system_prompt": "x"})
    assert r.status_code == 404


async def test_concurrent_patches_lose_no_update(
    client: httpx.AsyncClient, agent_json: dict
) -> None:
    """PATCH is read-merge-write; two PATCHes at once must not drop one another's change."""
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    original = (await client.get(f"/api/sessions/{sid}")).json()["config"]
    patches = [
        {"system_prompt": "A"},
        {"pipeline": {"name": "renamed"}},
        {"connectors": {"llm": {"config": {"smollm2": {"max_tokens": 11}}}}},
        {"connectors": {"tts": {"config": {"piper": {"volume": 2.0}}}}},
        {"connectors": {"stt": {"config": {"whisper": {"beam_size": 2}}}}},
    ]
    results = await asyncio.gather(
        *(client.patch(f"/api/sessions/{sid}/config", json=p) for p in patches)
    )
    assert all(r.status_code in (200, 409) for r in results), [r.text for r in results]
    applied = [p for p, r in zip(patches, results, strict=True) if r.status_code == 200]
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert got["version"] == 1 + len(applied)
    expected = original
    for p in applied:
        expected = merge_patch(expected, p)
    assert got["config"] == expected


async def test_extend_session_ttl(client: httpx.AsyncClient, agent_json: dict) -> None:
    sid = (await make_session(client, {"config": agent_json, "ttl_s": 60}))["session_id"]
    r = await client.post(f"/api/sessions/{sid}/ttl", json={"ttl_s": 900})
    assert r.status_code == 200 and r.json() == {"session_id": sid, "ttl_s": 900}
    got = (await client.get(f"/api/sessions/{sid}")).json()
    assert 898 <= got["ttl_s"] <= 900
    assert got["version"] == 1
    assert paths(await client.post(f"/api/sessions/{sid}/ttl", json={"ttl_s": 5})) == ["ttl_s"]
    r = await client.post("/api/sessions/doesnotexist123/ttl", json={"ttl_s": 900})
    assert r.status_code == 404


async def test_delete_session(
    client: httpx.AsyncClient, bus: Bus, settings: Settings, agent_json: dict
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    ctl: list[Frame] = []

    async def on_ctl(_: str, frame: Frame) -> None:
        ctl.append(frame)

    await bus.subscribe(f"{settings.subject_prefix}.ctl.{sid}", on_ctl)
    upd = await bus.nc.subscribe(f"{settings.subject_prefix}.config.update")
    await bus.nc.flush()
    r = await client.delete(f"/api/sessions/{sid}")
    assert r.status_code == 200 and r.json() == {"deleted": sid}
    assert (await client.get(f"/api/sessions/{sid}")).status_code == 404
    assert (await client.get("/api/sessions")).json() == {"sessions": []}
    assert (await client.delete(f"/api/sessions/{sid}")).status_code == 404
    msg = orjson.loads((await upd.next_msg(timeout=2)).data)
    assert msg["session_id"] == sid
    for _ in range(100):
        if ctl:
            break
        await asyncio.sleep(0.01)
    assert len(ctl) == 1 and ctl[0].kind is Kind.EVENT and ctl[0].as_event == {"type": "end"}


async def test_session_context_route(
    client: httpx.AsyncClient, service: TransportService, agent_json: dict
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    assert (await client.get(f"/api/sessions/{sid}/context")).json() == {"messages": []}
    await service.store.append_context(sid, {"role": "user", "content": "hi"})
    r = await client.get(f"/api/sessions/{sid}/context")
    assert r.json() == {"messages": [{"role": "user", "content": "hi"}]}


# --- health and the NATS side of the config manager ------------------------------------------


async def test_healthz(client: httpx.AsyncClient, settings: Settings) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "instance": settings.instance_id,
        "checks": {"nats": True, "valkey": True},
        "ready": True,
        "calls": {"active": 0, "limit": settings.max_calls, "refused": 0},
    }
    assert (await client.get("/readyz")).status_code == 200


async def test_healthz_reports_a_lost_nats_connection_as_503(
    client: httpx.AsyncClient, service: TransportService
) -> None:
    await service.bus.nc.close()
    r = await client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"nats": False, "valkey": True}


async def test_health_request_reply(
    bus: Bus, settings: Settings, service: TransportService
) -> None:
    reply = await bus.nc.request(f"{settings.subject_prefix}.health.transport", b"{}", timeout=2)
    assert orjson.loads(reply.data) == {"role": "transport", "instance": settings.instance_id}


async def test_config_get_request_reply(
    client: httpx.AsyncClient, bus: Bus, settings: Settings, agent_json: dict
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    subject = f"{settings.subject_prefix}.config.get.{sid}"
    body = orjson.loads((await bus.nc.request(subject, b"", timeout=2)).data)
    assert body["status"] == "success"
    assert body["session_id"] == sid
    assert body["version"] == 1
    assert body["configurations"]["connectors"]["llm"]["primary"] == "smollm2"
    assert body["configurations"]["pipeline"]["flow"][3] == {
        "from": "tts",
        "to": "transport",
        "stream": "audio",
    }
    await client.patch(f"/api/sessions/{sid}/config", json={"system_prompt": "changed"})
    body = orjson.loads((await bus.nc.request(subject, b"", timeout=2)).data)
    assert body["version"] == 2
    assert body["configurations"]["system_prompt"] == "changed"


async def test_config_get_unknown_session(
    bus: Bus, settings: Settings, service: TransportService
) -> None:
    subject = f"{settings.subject_prefix}.config.get.doesnotexist123"
    body = orjson.loads((await bus.nc.request(subject, b"", timeout=2)).data)
    assert body["status"] == "error"
    assert "doesnotexist123" in body["error"]
    assert "configurations" not in body


def test_merge_patch_rfc7396() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    assert merge_patch(target, {"a": "z", "c": {"f": None}}) == {
        "a": "z",
        "c": {"d": "e"},
        "l": [1, 2],
    }
    assert merge_patch(target, {"l": [3]})["l"] == [3]
    assert merge_patch({"a": [1]}, {"a": {"b": "c"}}) == {"a": {"b": "c"}}
    assert merge_patch({"a": "b"}, ["c"]) == ["c"]
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}  # not mutated


# --- ids and names end where the string ends (fullmatch, not `$`) --------------------------------


async def test_agent_name_with_a_trailing_newline_is_refused(
    client: httpx.AsyncClient, agent_json: dict
) -> None:
    for name in ("local\n", "local\r\n"):
        r = await client.post("/api/agents", json={"name": name, "config": agent_json})
        assert r.status_code == 422, (name, r.text)
        assert "name" in paths(r)
        r = await client.put(f"/api/agents/{quote(name)}", json={"config": agent_json})
        assert 400 <= r.status_code < 500, (name, r.text)
    assert (await client.get("/api/agents")).json()["agents"] == []
    await make_agent(client, "local", agent_json)  # the name itself is fine


async def test_session_id_with_a_trailing_newline_is_refused(
    client: httpx.AsyncClient, agent_json: dict
) -> None:
    sid = (await make_session(client, {"config": agent_json}))["session_id"]
    assert (await client.get(f"/api/sessions/{sid}")).status_code == 200
    for bad in (f"{sid}%0A", f"{sid}%0D%0A"):
        assert (await client.get(f"/api/sessions/{bad}")).status_code == 404
        r = await client.patch(f"/api/sessions/{bad}/config", json={})
        assert r.status_code == 404, r.text
        assert (await client.delete(f"/api/sessions/{bad}")).status_code == 404
    assert (await client.get(f"/api/sessions/{sid}")).status_code == 200
