"""ConfigStore against a real Valkey: sessions with TTL, the expiry index, context, agents. Every
test runs on one valkey-server and on a Valkey Cluster (3 masters + replicas): the key layout
must never touch two slots in one script (CROSSSLOT)."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest

from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.state.store import (
    ConfigStore,
    Conflict,
    NotFound,
    check_agent_name,
    check_session_id,
)

pytestmark = pytest.mark.clusters


@pytest.fixture
def config(agent_json: dict) -> AgentConfig:
    return parse_agent_config(agent_json)


@pytest.fixture
def echo_config(agent_json: dict) -> AgentConfig:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = {"primary": "echo", "config": {"echo": {"prefix": "Echo"}}}
    return parse_agent_config(data)


# --- sessions --------------------------------------------------------------------------------


async def test_create_and_get_session(store: ConfigStore, config: AgentConfig) -> None:
    stored = await store.create_session(config, ttl_s=120, agent="local")
    check_session_id(stored.session_id)
    assert stored.version == 1
    assert stored.agent == "local"
    got = await store.get_config(stored.session_id)
    assert got is not None
    assert got.config == config
    assert got.version == 1
    assert got.agent == "local"
    assert 118_000 < got.ttl_ms <= 120_000
    assert got.created_ms == stored.created_ms
    assert await store.get_version(stored.session_id) == 1


async def test_session_ids_are_unique_and_unguessable(
    store: ConfigStore, config: AgentConfig
) -> None:
    ids = {(await store.create_session(config, ttl_s=60)).session_id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) >= 20 for i in ids)


async def test_get_missing_session(store: ConfigStore) -> None:
    assert await store.get_config("doesnotexist123") is None
    assert await store.get_version("doesnotexist123") is None
    assert await store.get_config_ttl("doesnotexist123") is None


async def test_session_without_agent(store: ConfigStore, config: AgentConfig) -> None:
    stored = await store.create_session(config, ttl_s=60)
    got = await store.get_config(stored.session_id)
    assert got is not None and got.agent is None


async def test_default_ttl(settings, config: AgentConfig) -> None:
    s = ConfigStore.from_url(settings.valkey_url, key_prefix=settings.key_prefix, default_ttl_s=77)
    try:
        stored = await s.create_session(config)
        assert stored.ttl_ms == 77_000
        assert await s.get_config_ttl(stored.session_id) == 77
        with pytest.raises(ValueError):
            await s.create_session(config, ttl_s=0)
    finally:
        await s.close()


async def test_update_bumps_version_and_keeps_ttl(
    store: ConfigStore, config: AgentConfig, echo_config: AgentConfig
) -> None:
    sid = (await store.create_session(config, ttl_s=100)).session_id
    assert await store.update_config(sid, echo_config) == 2
    got = await store.get_config(sid)
    assert got is not None
    assert got.version == 2
    assert got.config == echo_config
    assert got.config.stage("llm").primary == "echo"
    assert 98_000 < got.ttl_ms <= 100_000
    assert await store.update_config(sid, config) == 3
    assert await store.update_config(sid, config) == 4
    got = await store.get_config(sid)
    assert got is not None and got.version == 4 and got.config == config


async def test_update_missing_session(store: ConfigStore, config: AgentConfig) -> None:
    with pytest.raises(NotFound):
        await store.update_config("doesnotexist123", config)
    # It must not create the key either.
    assert await store.get_config("doesnotexist123") is None
    assert await store.client.exists(store.keys.session("doesnotexist123")) == 0


async def test_store_config_creates_and_replaces(
    store: ConfigStore, config: AgentConfig, echo_config: AgentConfig
) -> None:
    sid = "my-session-0001"
    assert await store.store_config(sid, config, ttl_s=50) == 1
    assert await store.store_config(sid, echo_config, ttl_s=200) == 2
    got = await store.get_config(sid)
    assert got is not None and got.version == 2 and got.config == echo_config
    assert 198_000 < got.ttl_ms <= 200_000
    assert sid in await store.list_configs()
    with pytest.raises(ValueError):
        await store.store_config("bad id", config)


async def test_list_sessions(store: ConfigStore, config: AgentConfig) -> None:
    assert await store.list_configs() == []
    a = (await store.create_session(config, ttl_s=60)).session_id
    b = (await store.create_session(config, ttl_s=60)).session_id
    assert sorted(await store.list_configs()) == sorted([a, b])


async def test_ttl_and_extend(store: ConfigStore, config: AgentConfig) -> None:
    sid = (await store.create_session(config, ttl_s=30)).session_id
    assert await store.get_config_ttl(sid) == 30
    await store.append_context(sid, {"role": "user", "content": "hi"})
    assert await store.extend_config_ttl(sid, 500) is True
    assert await store.get_config_ttl(sid) == 500
    # The context follows the session's TTL.
    ctx_ttl = await store.client.pttl(store.keys.context(sid))
    assert 499_000 < ctx_ttl <= 500_000
    # The index entry follows it too: score = expiry in ms.
    score = await store.client.zscore(store.keys.sessions_of(sid), sid)
    session_pttl = await store.client.pttl(store.keys.session(sid))
    assert abs(score - (time.time() * 1000 + session_pttl)) < 2_000
    assert await store.extend_config_ttl("doesnotexist123", 500) is False
    gone = "doesnotexist123"
    assert await store.client.zscore(store.keys.sessions_of(gone), gone) is None


async def test_expired_session_leaves_no_index_entry(
    store: ConfigStore, config: AgentConfig
) -> None:
    short = (await store.create_session(config, ttl_s=1)).session_id
    long = (await store.create_session(config, ttl_s=60)).session_id
    assert sorted(await store.list_configs()) == sorted([short, long])
    await asyncio.sleep(1.15)
    assert await store.get_config(short) is None
    assert await store.client.exists(store.keys.session(short)) == 0
    # Listing never returns an id whose key has lapsed...
    assert await store.list_configs() == [long]
    # ...and cleanup leaves no entry behind in the index.
    await store.cleanup_expired_configs()
    members = [m.decode() for m in await store.client.zrange(store.keys.sessions_of(long), 0, -1)]
    assert members == [long]


async def test_cleanup_expired_counts(store: ConfigStore, config: AgentConfig) -> None:
    for _ in range(3):
        await store.create_session(config, ttl_s=1)
    keep = (await store.create_session(config, ttl_s=60)).session_id
    assert await store.cleanup_expired_configs() == 0
    await asyncio.sleep(1.15)
    assert await store.cleanup_expired_configs() == 3
    assert sum([await store.client.zcard(k) for k in store.keys.sessions_shards]) == 1
    assert await store.cleanup_expired_configs() == 0
    assert await store.list_configs() == [keep]


async def test_index_entry_of_a_vanished_key_is_not_listed(
    store: ConfigStore, config: AgentConfig
) -> None:
    """A session key can vanish before its score says so (maxmemory eviction of volatile keys, an
    operator's DEL): cleanup_expired_configs promises to drop "any whose key was deleted", and a
    listing must not return such an id."""
    gone = (await store.create_session(config, ttl_s=60)).session_id
    keep = (await store.create_session(config, ttl_s=60)).session_id
    await store.client.delete(store.keys.session(gone))
    assert await store.list_configs() == [keep]
    await store.cleanup_expired_configs()
    assert await store.client.zscore(store.keys.sessions_of(gone), gone) is None


async def test_extend_keeps_session_listed_past_original_ttl(
    store: ConfigStore, config: AgentConfig
) -> None:
    sid = (await store.create_session(config, ttl_s=1)).session_id
    assert await store.extend_config_ttl(sid, 30)
    await asyncio.sleep(1.15)
    assert await store.get_config(sid) is not None
    assert await store.list_configs() == [sid]


async def test_delete_session_deletes_context(store: ConfigStore, config: AgentConfig) -> None:
    sid = (await store.create_session(config, ttl_s=60)).session_id
    await store.append_context(sid, {"role": "user", "content": "hello"})
    assert await store.client.exists(store.keys.context(sid)) == 1
    assert await store.delete_config(sid) is True
    assert await store.get_config(sid) is None
    assert await store.client.exists(store.keys.context(sid)) == 0
    assert await store.get_context(sid) == []
    assert await store.client.zscore(store.keys.sessions_of(sid), sid) is None
    assert await store.list_configs() == []
    assert await store.delete_config(sid) is False


async def test_next_epoch(store: ConfigStore, config: AgentConfig) -> None:
    sid = (await store.create_session(config, ttl_s=60)).session_id
    assert await store.next_epoch(sid) == 1
    assert await store.next_epoch(sid) == 2
    assert await store.next_epoch(sid) == 3
    # Config updates do not touch the epoch.
    await store.update_config(sid, config)
    assert await store.next_epoch(sid) == 4
    with pytest.raises(NotFound):
        await store.next_epoch("doesnotexist123")
    assert await store.client.exists(store.keys.session("doesnotexist123")) == 0


async def test_next_epoch_is_atomic(store: ConfigStore, config: AgentConfig) -> None:
    sid = (await store.create_session(config, ttl_s=60)).session_id
    epochs = await asyncio.gather(*(store.next_epoch(sid) for _ in range(50)))
    assert sorted(epochs) == list(range(1, 51))


async def test_context_append_gets_session_ttl(store: ConfigStore, config: AgentConfig) -> None:
    sid = (await store.create_session(config, ttl_s=40)).session_id
    assert await store.append_context(sid, {"role": "user", "content": "a"}) == 1
    assert (
        await store.append_context(
            sid, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}
        )
        == 3
    )
    ctx_ttl = await store.client.pttl(store.keys.context(sid))
    session_ttl = await store.client.pttl(store.keys.session(sid))
    assert 0 < ctx_ttl <= 40_000
    assert abs(ctx_ttl - session_ttl) < 1_000
    assert await store.get_context(sid) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert [m["content"] for m in await store.get_context(sid, last=2)] == ["b", "c"]


async def test_context_append_to_missing_session(store: ConfigStore) -> None:
    with pytest.raises(NotFound):
        await store.append_context("doesnotexist123", {"role": "user", "content": "x"})
    # No context key without a session (it would have no TTL).
    assert await store.client.exists(store.keys.context("doesnotexist123")) == 0


async def test_context_expires_with_session(store: ConfigStore, config: AgentConfig) -> None:
    sid = (await store.create_session(config, ttl_s=1)).session_id
    await store.append_context(sid, {"role": "user", "content": "x"})
    await asyncio.sleep(1.15)
    assert await store.client.exists(store.keys.context(sid)) == 0
    assert await store.get_context(sid) == []


async def test_keys_are_prefixed(store: ConfigStore, config: AgentConfig, prefix: str) -> None:
    sid = (await store.create_session(config, ttl_s=60)).session_id
    await store.create_agent("a1", config)
    keys = {k.decode() async for k in store.client.scan_iter(match=f"{prefix}:*")}
    assert f"{prefix}:session:{{{sid}}}" in keys
    assert f"{prefix}:agent:{{agents}}:a1" in keys
    assert all(k.startswith(f"{prefix}:") for k in keys)


# --- agents ----------------------------------------------------------------------------------


async def test_agent_crud(
    store: ConfigStore, config: AgentConfig, echo_config: AgentConfig
) -> None:
    assert await store.list_agents() == []
    assert await store.get_default_agent() is None
    rec = await store.create_agent("support", config, description="first line")
    assert rec.name == "support"
    assert rec.version == 1
    assert rec.description == "first line"
    assert rec.config == config
    assert rec.created_ms == rec.updated_ms > 0

    got = await store.get_agent("support")
    assert got == rec
    assert [a.name for a in await store.list_agents()] == ["support"]

    await asyncio.sleep(0.005)
    up = await store.update_agent("support", echo_config)
    assert up.version == 2
    assert up.config == echo_config
    assert up.description == "first line"  # kept when not given
    assert up.created_ms == rec.created_ms
    assert up.updated_ms > rec.updated_ms

    up = await store.update_agent("support", config, description="second")
    assert up.version == 3
    assert up.description == "second"
    up = await store.update_agent("support", config, description="")
    assert up.version == 4
    assert up.description == ""  # an explicit empty description clears it

    assert await store.delete_agent("support") is True
    assert await store.get_agent("support") is None
    assert await store.list_agents() == []
    assert await store.delete_agent("support") is False


async def test_list_agents_sorted(store: ConfigStore, config: AgentConfig) -> None:
    for name in ("zeta", "alpha", "mid.v2"):
        await store.create_agent(name, config)
    assert [a.name for a in await store.list_agents()] == ["alpha", "mid.v2", "zeta"]


async def test_first_agent_becomes_default(store: ConfigStore, config: AgentConfig) -> None:
    await store.create_agent("first", config)
    await store.create_agent("second", config)
    default = await store.get_default_agent()
    assert default is not None and default.name == "first"


async def test_set_default(store: ConfigStore, config: AgentConfig) -> None:
    await store.create_agent("first", config)
    await store.create_agent("second", config)
    await store.set_default_agent("second")
    default = await store.get_default_agent()
    assert default is not None and default.name == "second"
    with pytest.raises(NotFound):
        await store.set_default_agent("missing")
    default = await store.get_default_agent()
    assert default is not None and default.name == "second"


async def test_deleting_default_clears_it(store: ConfigStore, config: AgentConfig) -> None:
    await store.create_agent("first", config)
    await store.create_agent("second", config)
    assert await store.delete_agent("second")  # not the default: the default stays
    default = await store.get_default_agent()
    assert default is not None and default.name == "first"
    assert await store.delete_agent("first")
    assert await store.get_default_agent() is None
    assert await store.client.exists(store.keys.default_agent) == 0
    # The next agent created becomes the default again.
    await store.create_agent("third", config)
    default = await store.get_default_agent()
    assert default is not None and default.name == "third"


async def test_duplicate_create_conflicts(
    store: ConfigStore, config: AgentConfig, echo_config: AgentConfig
) -> None:
    await store.create_agent("dup", config, description="original")
    with pytest.raises(Conflict):
        await store.create_agent("dup", echo_config, description="other")
    got = await store.get_agent("dup")
    assert got is not None
    assert got.version == 1 and got.config == config and got.description == "original"


async def test_update_missing_agent(store: ConfigStore, config: AgentConfig) -> None:
    with pytest.raises(NotFound):
        await store.update_agent("ghost", config)
    assert await store.get_agent("ghost") is None
    assert await store.list_agents() == []
    assert await store.get_default_agent() is None


@pytest.mark.parametrize(
    "name",
    [
        *("", "has space", ".hidden", "-dash", "a/b", "a*b", "x" * 65, "current", "default", "ünï"),
        *("local\n", "local\r\n", "\nlocal"),  # `$` alone would let a trailing newline through
    ],
)
async def test_invalid_agent_names_rejected(
    store: ConfigStore, config: AgentConfig, name: str
) -> None:
    with pytest.raises(ValueError):
        check_agent_name(name)
    with pytest.raises(ValueError):
        await store.create_agent(name, config)
    with pytest.raises(ValueError):
        await store.update_agent(name, config)
    assert await store.list_agents() == []


@pytest.mark.parametrize("name", ["a", "Agent_1", "v1.2-beta", "x" * 64, "9lives"])
def test_valid_agent_names(name: str) -> None:
    assert check_agent_name(name) == name


@pytest.mark.parametrize(
    "sid",
    ["short", "has.dot", "with space", "a*bcdefgh", "x" * 65, "abcdefgh\n", "abcdefgh_12\n"],
)
def test_invalid_session_ids(sid: str) -> None:
    with pytest.raises(ValueError):
        check_session_id(sid)


# --- leases and claims handed out by the store -----------------------------------------------


async def test_lease_holder_follows_the_lease(store: ConfigStore) -> None:
    session = "leasetest123"
    assert await store.lease_holder("stt", session) is None
    leases = store.leases(owner="stt-a", ttl_ms=5_000)
    assert await leases.acquire(store.keys.lease("stt", session)) == "stt-a"
    assert await store.lease_holder("stt", session) == "stt-a"
    assert await store.lease_holder("tts", session) is None  # leases are per stage
    await leases.release(store.keys.lease("stt", session))
    assert await store.lease_holder("stt", session) is None


async def test_claims_use_the_store_key_layout(store: ConfigStore) -> None:
    claims = store.claims(owner="llm-a", ttl_ms=5_000)
    key = claims.key("llm", "claimtest123", 7)
    assert key == store.keys.claim("llm", "claimtest123", 7, 0)
    assert await claims.take(key)
    assert not await store.claims(owner="llm-b", ttl_ms=5_000).take(key)
    await claims.finish(key)
    assert await claims.state(key) == "done"


# --- cluster layout (issue 18) -----------------------------------------------------------------


async def test_every_key_of_a_session_shares_its_slot(
    store: ConfigStore, config: AgentConfig
) -> None:
    """A Valkey Cluster refuses a script or DEL whose keys span slots (CROSSSLOT): the session's
    hash, context, leases, claims and progress lists carry its id as their hash tag."""
    from valkey.crc import key_slot

    sid = (await store.create_session(config, ttl_s=60)).session_id
    k = store.keys
    names = [
        k.session(sid),
        k.context(sid),
        k.lease("stt", sid),
        k.claim("llm", sid, 3, 0),
        k.claim("tts", sid, 3, 2),
        k.progress(sid, 3),
    ]
    assert len({key_slot(n.encode()) for n in names}) == 1
    for tenant in (None, "acme"):
        scope = [k.agent("a1", tenant), k.agent_names(tenant), k.default_of(tenant)]
        assert len({key_slot(n.encode()) for n in scope}) == 1


async def test_session_index_is_sharded(store: ConfigStore, config: AgentConfig) -> None:
    """No single index key is every create's hot spot: 40 sessions land in many shards, spread
    over the slots (and so the masters) of a cluster; listing still finds every one."""
    from valkey.crc import key_slot

    sids = [(await store.create_session(config, ttl_s=60)).session_id for _ in range(40)]
    used = {store.keys.sessions_of(s) for s in sids}
    assert len(used) >= 8
    assert len({key_slot(u.encode()) for u in used}) == len(used)
    assert sorted(await store.list_configs()) == sorted(sids)
    assert not await store.client.exists(f"{store.keys.prefix}:sessions")  # the old global key
