"""`voicemesh migrate`: a deployment with the keys of the layout before hash tags keeps its agents,
its live sessions (config, TTL, context) and its finished turns after the upgrade, in place on
one server and when its data moves into a Valkey Cluster."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import valkey

from tests.conftest import AGENT_FILE, Servers
from voicemesh.cli import main
from voicemesh.state import ConfigStore
from voicemesh.state.claims import DONE

SID = "legacySession0001"
SID2 = "legacySession0002"


def write_old_layout(client: valkey.Valkey, p: str) -> None:
    """What the store before issue 18 wrote (its _CREATE, _PUT_AGENT and claims), by hand."""
    config = orjson.dumps(orjson.loads(AGENT_FILE.read_bytes())).decode()
    now = int(time.time() * 1000)
    for sid, ttl in ((SID, 120_000), (SID2, 300_000)):
        client.hset(
            f"{p}:session:{sid}",
            mapping={
                "config": config,
                "version": 3,
                "agent": "local",
                "created_ms": now,
                "epoch": 4,
                "owner": "acme",
            },
        )
        client.pexpire(f"{p}:session:{sid}", ttl)
        client.zadd(f"{p}:sessions", {sid: now + ttl})
    client.rpush(f"{p}:ctx:{SID}", orjson.dumps({"role": "user", "content": "hello", "epoch": 1}))
    client.pexpire(f"{p}:ctx:{SID}", 120_000)
    client.zadd(f"{p}:sessions", {"lapsedSession0003": now - 1000})  # an entry behind a lapsed key
    for name in ("local", "other"):
        client.hset(
            f"{p}:agent:{name}",
            mapping={
                "config": config,
                "updated_ms": now,
                "created_ms": now,
                "description": f"the {name} one",
                "version": 2,
            },
        )
        client.sadd(f"{p}:agents", name)
    client.set(f"{p}:agents:default", "other")
    client.hset(
        f"{p}:tenant:acme:agent:mine",
        mapping={"config": config, "updated_ms": now, "created_ms": now, "version": 1},
    )
    client.sadd(f"{p}:tenant:acme:agents", "mine")
    client.set(f"{p}:tenant:acme:agents:default", "mine")
    client.sadd(f"{p}:agents:tenants", "acme")
    client.set(f"{p}:claim:llm:{SID}:4:0", DONE, px=3_600_000)
    client.rpush(f"{p}:progress:{SID}:4", orjson.dumps("Hello there."))


async def check_new_layout(url: str, p: str) -> None:
    store = ConfigStore.from_url(url, key_prefix=p)
    try:
        stored = await store.get_config(SID)
        assert stored is not None
        assert (stored.version, stored.agent, stored.owner) == (3, "local", "acme")
        assert 100_000 < stored.ttl_ms <= 120_000  # the TTL it had, not a fresh one
        # the turn counter goes on from where it was
        assert await store.client.hget(store.keys.session(SID), "epoch") == b"4"
        assert (await store.get_context(SID))[0]["content"] == "hello"
        assert sorted(await store.list_configs()) == sorted([SID, SID2])
        assert sorted(await store.list_configs(owner="acme")) == [SID, SID2]
        assert [a.name for a in await store.list_agents()] == ["local", "other"]
        agent = await store.get_agent("other")
        assert agent is not None and agent.description == "the other one"
        assert await store.default_agent_name() == "other"
        assert [a.name for a in await store.list_agents(tenant="acme")] == ["mine"]
        assert await store.default_agent_name(tenant="acme") == "mine"
        assert await store.agent_tenants() == ["acme"]
        claims = store.claims(owner="x", ttl_ms=1000)
        assert await claims.state(claims.key("llm", SID, 4)) == DONE  # not spoken twice
        assert await claims.progress(SID, 4) == ["Hello there."]
    finally:
        await store.close()


def old_keys(client: Any, p: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"{p}:*") if b"{" not in k)


def test_migrate_in_place_keeps_agents_and_live_sessions(
    servers: Servers, prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    client = valkey.Valkey.from_url(servers.valkey.url)
    write_old_layout(client, prefix)
    monkeypatch.setenv("VALKEY_URL", servers.valkey.url)
    monkeypatch.setenv("VOICEMESH_KEY_PREFIX", prefix)

    assert main(["migrate", "--dry-run"]) == 0
    assert "would have migrated 2 sessions" in capsys.readouterr().out
    assert len(old_keys(client, prefix)) > 10  # a dry run changes nothing

    assert main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert "migrated 2 sessions (1 with context), 3 agents, 2 claims" in out
    assert old_keys(client, prefix) == []
    asyncio.run(check_new_layout(servers.valkey.url, prefix))

    assert main(["migrate"]) == 0  # a second run finds nothing to do
    assert "migrated 0 sessions" in capsys.readouterr().out
    asyncio.run(check_new_layout(servers.valkey.url, prefix))
    client.close()


@pytest.mark.cluster
def test_migrate_from_one_server_into_a_valkey_cluster(
    servers: Servers,
    valkey_cluster: Any,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """Outgrowing one machine: the old server's keys land in the cluster, spread by hash tag."""
    client = valkey.Valkey.from_url(servers.valkey.url)
    write_old_layout(client, prefix)
    monkeypatch.setenv("VALKEY_URL", valkey_cluster.url)
    monkeypatch.setenv("VOICEMESH_KEY_PREFIX", prefix)
    assert main(["migrate", "--from", servers.valkey.url]) == 0
    assert "migrated 2 sessions" in capsys.readouterr().out
    assert old_keys(client, prefix) == []
    asyncio.run(check_new_layout(valkey_cluster.url, prefix))
    client.close()
