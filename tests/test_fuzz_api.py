"""Schemathesis against the config-manager API's own OpenAPI schema, in-process (ASGI), with a real
TransportService on the test's NATS and Valkey.

Each operation gets generated requests (schema-conforming and schema-violating ones, plus bodies
built from valid and mutated agent configs and path parameters that name things that exist) and
three properties are checked for every one of them:

- no 5xx (and no exception out of the app);
- the response conforms to the schema the operation declares for its status code;
- nothing is half-stored: after a rejected (4xx) write, the agents (and the default), every
  session's stored hash and the session index are exactly what they were before, read straight
  from Valkey.

Schemathesis drives ASGI apps on its own event-loop thread (and runs the app's lifespan there,
which starts the TransportService), so the tests are synchronous and read Valkey through a store
on a loop of their own.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
import schemathesis.checks
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi as st_asgi

from tests.config_strategies import (
    AGENT,
    WEBSOCKET,
    json_safe,
    mutated_agent,
    set_at,
    valid_configs,
)
from tests.conftest import Servers
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.state import ConfigStore
from voicemesh.state.keys import AGENT_NAME
from voicemesh.transport.api.app import create_app
from voicemesh.transport.api.service import TransportService

EXAMPLES = 50


def open_api(settings: Settings) -> Settings:
    """The API without keys (auth has its own tests), where this build has API keys."""
    if "auth" in Settings.model_fields:
        return settings.model_copy(update={"auth": "off"})
    return settings


# The operations, read off the app's schema once at import (an app on a service that is never
# started: building the app connects to nothing).
_OFFLINE = open_api(
    Settings(nats_url="nats://127.0.0.1:9", valkey_url="valkey://127.0.0.1:9/0", preload=False)
)
_OPENAPI = create_app(TransportService(_OFFLINE)).openapi()
OPERATIONS = [
    (method.upper(), path)
    for path, item in _OPENAPI["paths"].items()
    for method in item
    if method in ("get", "post", "put", "patch", "delete")
]
WRITES = {"POST", "PUT", "PATCH", "DELETE"}

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.response_schema_conformance,
]


# --- the store, read directly ----------------------------------------------------------------


class Valkey:
    """A ConfigStore on an event loop of its own, for reading what the API wrote."""

    def __init__(self, url: str, prefix: str):
        self.loop = asyncio.new_event_loop()
        self.store = ConfigStore.from_url(url, key_prefix=prefix)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def snapshot(self) -> dict[str, Any]:
        return self.run(self._snapshot())

    async def _snapshot(self) -> dict[str, Any]:
        client, keys = self.store.client, self.store.keys
        names = sorted(n.decode() for n in await client.smembers(keys.agents))
        sessions = []
        for shard in keys.sessions_shards:  # the index is sharded (voicemesh.state.keys)
            sessions += [s.decode() for s in await client.zrange(shard, 0, -1)]
        sessions.sort()
        return {
            "default": await client.get(keys.default_agent),
            "agents": {n: await client.hgetall(keys.agent(n)) for n in names},
            "index": sessions,
            "sessions": {s: await client.hgetall(keys.session(s)) for s in sessions},
        }

    def close(self) -> None:
        self.run(self.store.close())
        self.loop.close()


@dataclass
class Api:
    schema: Any
    valkey: Valkey
    agents: list[str]
    session: str


@pytest.fixture
def api(servers: Servers) -> Iterator[Api]:
    prefix = f"f{uuid.uuid4().hex[:10]}"
    settings = open_api(
        Settings(
            nats_url=servers.nats.url,
            valkey_url=servers.valkey.url,
            subject_prefix=prefix,
            key_prefix=prefix,
            preload=False,
        )
    )
    app = create_app(TransportService(settings))
    valkey = Valkey(servers.valkey.url, prefix)
    try:
        # Loading the schema runs the app's lifespan on schemathesis's loop: the service starts.
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # Things for the requests to find: two agents (one the default) and a session.
        config = parse_agent_config(AGENT)
        valkey.run(valkey.store.create_agent("main", config, description="seed"))
        valkey.run(valkey.store.create_agent("spare", config))
        session = valkey.run(valkey.store.create_session(config, agent="main")).session_id
        yield Api(schema, valkey, ["main", "spare"], session)
    finally:
        try:
            st_asgi.shutdown_lifespans()  # stops the service
        finally:
            valkey.close()


# --- what goes into the requests -------------------------------------------------------------

names = (
    st.sampled_from(
        ["main", "spare", "new-agent", "current", "default", "ghost", "has space", ".x", "a" * 65]
    )
    | st.from_regex(AGENT_NAME, fullmatch=True)
    | st.text(max_size=12)
)


def sendable(value: Any) -> bool:
    """JSON an HTTP client can send (no NaN or infinity)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


configs = st.one_of(
    st.just(AGENT),
    valid_configs().filter(sendable),
    mutated_agent(json_safe).filter(sendable),
    json_safe,
    st.sampled_from(
        [
            set_at(("connectors", "llm", "fallback"), 5),
            set_at(("connectors", "llm", "fallback"), [{}]),
            set_at(("connectors", "llm", "fallback"), ["anthropic"]),
            set_at((*WEBSOCKET, "energy_threshold_db"), -(2**70)),
        ]
    ),
)


def body_strategies(method: str, path: str) -> list[st.SearchStrategy[Any]]:
    """Bodies built from agent configs, for the operations that take one."""
    maybe_text = st.none() | st.text(max_size=30)
    if (method, path) == ("POST", "/api/agents"):
        return [
            st.fixed_dictionaries(
                {"name": names, "config": configs},
                optional={"description": maybe_text, "default": st.booleans()},
            )
        ]
    if (method, path) == ("PUT", "/api/agents/{name}"):
        return [st.fixed_dictionaries({"config": configs}, optional={"description": maybe_text})]
    if (method, path) == ("POST", "/api/sessions"):
        return [
            st.fixed_dictionaries(
                {},
                optional={
                    "agent": st.none() | names,
                    "config": st.none() | configs,
                    "ttl_s": st.none() | st.integers(-5, 40 * 86400),
                },
            )
        ]
    if (method, path) == ("PUT", "/api/sessions/{session_id}/config"):
        return [configs]
    if (method, path) == ("PATCH", "/api/sessions/{session_id}/config"):
        partial = configs.map(
            lambda c: (
                {k: v for k, v in c.items() if k != "system_prompt"} if isinstance(c, dict) else c
            )
        )
        return [
            partial,
            st.dictionaries(
                st.sampled_from(["system_prompt", "pipeline", "connectors"]), json_safe
            ),
            st.sampled_from(
                [
                    {"connectors": {"llm": {"fallback": 5}}},
                    {"connectors": {"llm": {"primary": ["smollm2"]}}},
                    {"connectors": {"llm": {"fallback": ["anthropic"]}}},
                    {
                        "connectors": {
                            "transport": {
                                "config": {"websocket": {"energy_threshold_db": -(2**70)}}
                            }
                        }
                    },
                    {"connectors": {"tts": None}},
                    {"pipeline": {"flow": None}},
                ]
            ),
        ]
    if (method, path) == ("POST", "/api/sessions/{session_id}/ttl"):
        return [st.fixed_dictionaries({"ttl_s": st.integers(-10, 40 * 86400) | json_safe})]
    return []


def strategies(api: Api, method: str, path: str) -> st.SearchStrategy[Any]:
    op = api.schema[path][method]
    # mostly things that exist (so writes get past the lookup), now and then ones that do not
    known: dict[str, list[str]] = {
        "name": [*api.agents * 3, "current", "ghost", "has space", ".x"],
        "session_id": [*[api.session] * 4, "doesnotexist123", "bad.id", "x", "%2e%2e"],
    }
    params = [p for p in known if "{" + p + "}" in path]
    found: list[st.SearchStrategy[Any]] = [
        op.as_strategy(GenerationMode.POSITIVE),
        op.as_strategy(GenerationMode.NEGATIVE),
    ]
    fixed = st.fixed_dictionaries({p: st.sampled_from(known[p]) for p in params})
    bodies = body_strategies(method, path)
    if params or bodies:

        @st.composite
        def seeded(draw: st.DrawFn) -> Any:
            kwargs: dict[str, Any] = {}
            if params:
                kwargs["path_parameters"] = draw(fixed)
            if bodies:
                kwargs["body"] = draw(st.one_of(bodies))
                if method == "PATCH":
                    kwargs["media_type"] = draw(
                        st.sampled_from(["application/merge-patch+json", "application/json"])
                    )
            return draw(op.as_strategy(GenerationMode.POSITIVE, **kwargs))

        found += [seeded(), seeded()]  # half the examples seeded
    return st.one_of(found)


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=list(HealthCheck),
    # no shrinking: every example is a round trip through the app and Valkey, so shrinking a
    # failure takes minutes; the report's curl line reproduces the failing request as it was
    phases=[Phase.explicit, Phase.generate],
)


@pytest.mark.parametrize(
    ("method", "path"),
    OPERATIONS,
    ids=[f"{m}{p}".replace("{", "").replace("}", "") for m, p in OPERATIONS],
)
def test_operation(api: Api, method: str, path: str) -> None:
    @FUZZ
    @given(case=strategies(api, method, path))
    def run(case: Any) -> None:
        before = api.valkey.snapshot() if method in WRITES else None
        response = case.call()
        case.validate_response(response, checks=CHECKS)
        assert response.status_code < 500, response.text
        if before is not None and 400 <= response.status_code < 500:
            after = api.valkey.snapshot()
            assert after == before, (
                f"{method} {path} answered {response.status_code} but changed the store"
            )

    run()


# --- known bad bodies, deterministic ---------------------------------------------------------


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    service = TransportService(open_api(settings))
    await service.start()
    app = create_app(service)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is a 500
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c
    await service.stop()


BAD_BODIES = {
    "fallback-not-a-list": set_at(("connectors", "llm", "fallback"), 5),
    "fallback-of-objects": set_at(("connectors", "llm", "fallback"), [{}]),
    "primary-a-list": set_at(("connectors", "llm", "primary"), ["smollm2"]),
    "int-beyond-64-bits": set_at((*WEBSOCKET, "energy_threshold_db"), -(2**70)),
    "chain-connector-missing-required-options": set_at(
        ("connectors", "llm", "fallback"), ["anthropic"]
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_known_bad_configs_are_422_and_not_stored(
    client: httpx.AsyncClient, store: ConfigStore, case: str
) -> None:
    config = BAD_BODIES[case]
    r = await client.post("/api/agents", json={"name": "main", "config": AGENT})
    assert r.status_code == 201, r.text
    sid = (await client.post("/api/sessions", json={})).json()["session_id"]
    agents_before = [(a.name, a.version) for a in await store.list_agents()]

    r = await client.post("/api/agents", json={"name": "bad", "config": config})
    assert r.status_code == 422, (r.status_code, r.text)
    r = await client.put("/api/agents/main", json={"config": config})
    assert r.status_code == 422, (r.status_code, r.text)
    r = await client.post("/api/sessions", json={"config": config})
    assert r.status_code == 422, (r.status_code, r.text)
    r = await client.put(f"/api/sessions/{sid}/config", json=config)
    assert r.status_code == 422, (r.status_code, r.text)
    r = await client.patch(f"/api/sessions/{sid}/config", json={"connectors": config["connectors"]})
    assert r.status_code == 422, (r.status_code, r.text)

    assert [(a.name, a.version) for a in await store.list_agents()] == agents_before
    assert await store.list_configs() == [sid]
    assert (await store.get_config(sid)).version == 1  # type: ignore[union-attr]


async def test_non_finite_numbers_are_refused_not_stored_as_null(
    client: httpx.AsyncClient, store: ConfigStore
) -> None:
    """Python's json (which Starlette uses) reads NaN and Infinity; orjson (which the store
    writes with) turns them into null, and the stored config no longer parses."""
    for literal in ("-Infinity", "NaN"):
        cfg = copy.deepcopy(AGENT)
        cfg["connectors"]["transport"]["config"]["websocket"]["energy_threshold_db"] = -1.5
        body = orjson.dumps({"name": "inf", "config": cfg}).replace(b"-1.5", literal.encode())
        r = await client.post(
            "/api/agents", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 422, (literal, r.status_code, r.text)
        assert await store.get_agent("inf") is None
        r = await client.get("/api/agents")
        assert r.status_code == 200, r.text
