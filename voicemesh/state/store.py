"""Session configs, named agents and conversation context in Valkey.

A session is one hash (config JSON, version, agent, owner, turn epoch) with a TTL; its context is
a list with the same TTL. The session index is sharded sorted sets scored by expiry time, so a
listing never returns an id whose key has lapsed, and cleanup removes exactly the lapsed entries
(the layout, and why it runs on a Valkey Cluster too, is in voicemesh.state.keys). Every
write that depends on a key existing is a Lua script, so nothing is half-written and no key is
re-created without its TTL.

Ownership: a session's owner (the tenant whose key made it) is a field of its hash, read with the
config in the same HGETALL, so a stage's config read costs what it did; the API checks it. Agents
are global (the operator's catalogue) or a tenant's own, each scope with its own keys.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson
import valkey.asyncio as valkey
from valkey.exceptions import ConnectionError as ValkeyConnectionError
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

from voicemesh.config.connections import redact_url
from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.config.settings import ConnectionSettings
from voicemesh.errors import VoicemeshError
from voicemesh.state.awaited import awaited
from voicemesh.state.claims import Claims
from voicemesh.state.client import Client, connect, is_cluster, is_cluster_url, redact_cluster_url
from voicemesh.state.keys import ADMIN_TENANT, AGENT_NAME, SESSION_ID, Keys
from voicemesh.state.lease import Leases

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(VoicemeshError, ConnectionError):
    """Valkey cannot be used: unreachable, refused our login, or TLS failed."""


class NotFound(VoicemeshError, LookupError):
    pass


class Conflict(VoicemeshError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class StoredConfig:
    session_id: str
    config: AgentConfig
    version: int
    agent: str | None
    ttl_ms: int
    created_ms: int
    #: the tenant whose key created it (ADMIN_TENANT for sessions from before owners)
    owner: str = ADMIN_TENANT


@dataclass(frozen=True, slots=True)
class AgentRecord:
    name: str
    config: AgentConfig
    version: int
    description: str
    created_ms: int
    updated_ms: int
    #: None: a global agent (readable by every tenant, written by admins); else its tenant
    owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "config": orjson.loads(self.config.to_json()),
        }


# The session index shard is another slot than the session (voicemesh.state.keys), so no script
# writes it: its ZADD goes first, so an index entry never says a session lapses before it does.

# KEYS[1] session hash; ARGV config, ttl_ms, agent, now_ms, id, owner
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'config', ARGV[1], 'version', 1, 'agent', ARGV[3],
           'created_ms', ARGV[4], 'epoch', 0, 'owner', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Replace the config of a live session, keep its TTL, bump the version. KEYS[1] hash;
# ARGV config, expected current version or '' (compare-and-set for read-modify-write callers),
# and optionally the agent the config now comes from (a switch of the session's agent)
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'version') ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], 'config', ARGV[1])
if ARGV[3] then redis.call('HSET', KEYS[1], 'agent', ARGV[3]) end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""

# Create or replace with a fresh TTL (store_config). KEYS[1] hash, KEYS[2] context; ARGV config,
# ttl_ms, now_ms, id, owner (of a new session; an existing one
# keeps its own)
_STORE = """
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'config', ARGV[1])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[3])
redis.call('HSETNX', KEYS[1], 'epoch', 0)
redis.call('HSETNX', KEYS[1], 'agent', '')
redis.call('HSETNX', KEYS[1], 'owner', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return v
"""

# KEYS[1] hash, KEYS[2] context; ARGV ttl_ms
_EXTEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS[1] hash
# ARGV[1]: the lowest epoch to return (a transport that numbered turns itself while Valkey was
# down catches the counter up, so no epoch is ever handed out twice)
_NEXT_EPOCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
if e < tonumber(ARGV[1] or 0) then
  e = tonumber(ARGV[1])
  redis.call('HSET', KEYS[1], 'epoch', e)
end
return e
"""

# Append to the context with the session's remaining TTL. KEYS[1] context; ARGV the session hash,
# then the items. The hash is only read, so it is an argument: Valkey's ACL takes every declared
# key as written, and the llm stage's user may only read session hashes (voicemesh.state.acl).
_APPEND = """
local ttl = redis.call('PTTL', ARGV[1])
if ttl <= 0 then return -1 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('LLEN', KEYS[1])
"""

# The bot's reply of one turn: KEYS[1] context list; ARGV epoch, entry JSON, force ('1' from the
# transport: what the caller heard when cut off; '0' from the LLM stage), the session hash (read
# only, so an argument, as in _APPEND).
# An entry of that epoch is replaced in place, unless it marks an interruption and this write is not
# forced (the LLM finished a reply the caller never heard all of); a new one goes before the first
# message of a later turn, so a barge-in's truncated reply stays ahead of the turn that cut it off.
_PUT_REPLY = """
local ttl = redis.call('PTTL', ARGV[4])
if ttl <= 0 then return -1 end
local epoch = tonumber(ARGV[1])
local items = redis.call('LRANGE', KEYS[1], -64, -1)
local base = redis.call('LLEN', KEYS[1]) - #items
local later = nil
for i, raw in ipairs(items) do
  local ok, m = pcall(cjson.decode, raw)
  if ok and type(m) == 'table' then
    local e = tonumber(m['epoch'])
    if m['role'] == 'assistant' and e == epoch then
      if m['interrupted'] and ARGV[3] ~= '1' then return 0 end
      redis.call('LSET', KEYS[1], base + i - 1, ARGV[2])
      redis.call('PEXPIRE', KEYS[1], ttl)
      return 1
    end
    if later == nil and e ~= nil and e > epoch then later = raw end
  end
end
if later ~= nil then redis.call('LINSERT', KEYS[1], 'BEFORE', later, ARGV[2])
else redis.call('RPUSH', KEYS[1], ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return 2
"""

# Agents: KEYS[1] agent hash, KEYS[2] name set, KEYS[3] default key (one scope: one slot); ARGV
# name, config, now_ms, mode ('create'|'update'), description or '' ,
# keep-description flag, tenant ('' for a global agent: the first one becomes the default)
_PUT_AGENT = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[4] == 'create' and exists then return -1 end
if ARGV[4] == 'update' and not exists then return 0 end
redis.call('HSET', KEYS[1], 'config', ARGV[2], 'updated_ms', ARGV[3])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[3])
if ARGV[6] == '1' then redis.call('HSETNX', KEYS[1], 'description', ARGV[5])
else redis.call('HSET', KEYS[1], 'description', ARGV[5]) end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('SADD', KEYS[2], ARGV[1])
if ARGV[7] == '' and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], ARGV[1])
end
return v
"""

# KEYS[1] agent hash, KEYS[2] name set, KEYS[3] default key; ARGV name
_DELETE_AGENT = """
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return n
"""

# KEYS[1] agent hash, KEYS[2] default key; ARGV name
_SET_DEFAULT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""


#: Valkey cannot be reached (down, restarting, loading its AOF): what a caller that can go on
#: without it catches.
UNREACHABLE = (ValkeyConnectionError, ValkeyTimeoutError)


async def best_effort(what: str, aw: Awaitable[T], default: T) -> T:
    """`aw`, or `default` with a warning while Valkey is unreachable: for the reads and writes a
    turn can do without (claims, progress, context), so a Valkey outage degrades a live call
    instead of losing its turns. Shielded: a command cut off by a cancellation can leave its
    connection waiting forever."""
    try:
        return await asyncio.shield(aw)
    except UNREACHABLE as exc:
        log.warning("Valkey unreachable, %s skipped: %s", what, exc)
        return default


def new_session_id() -> str:
    """128 bits from the OS CSPRNG, URL- and subject-safe."""
    return secrets.token_urlsafe(16)


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id):
        raise ValueError(f"invalid session id {session_id!r}: 8-64 of A-Z a-z 0-9 _ -")
    return session_id


def check_agent_name(name: str) -> str:
    if not AGENT_NAME.fullmatch(name) or name in ("current", "default"):
        raise ValueError(
            f"invalid agent name {name!r}: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or "
            "digit, and not 'current' or 'default'"
        )
    return name


class ConfigStore:
    """Per-session configs with a TTL, plus agents and each session's conversation context."""

    def __init__(self, client: Client, *, key_prefix: str = "vm", default_ttl_s: int = 3600):
        # Typed as the single-server client: the cluster client answers the same commands and
        # scripts (routed by key), and callers should not need to know which one they hold.
        self.client = cast(valkey.Valkey, client)
        #: a Valkey Cluster client: no MULTI/EXEC (a cluster pipeline is not a transaction)
        self.cluster = is_cluster(client)
        self.where = "valkey"  # the redacted URL, for messages (set by from_url)
        self.keys = Keys(key_prefix)
        self.default_ttl_s = default_ttl_s
        client = self.client
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._store = client.register_script(_STORE)
        self._extend = client.register_script(_EXTEND)
        self._next_epoch = client.register_script(_NEXT_EPOCH)
        self._append = client.register_script(_APPEND)
        self._put_reply = client.register_script(_PUT_REPLY)
        self._put_agent = client.register_script(_PUT_AGENT)
        self._delete_agent = client.register_script(_DELETE_AGENT)
        self._set_default = client.register_script(_SET_DEFAULT)

    @classmethod
    def from_url(
        cls, url: str, *, settings: ConnectionSettings | None = None, **kw: Any
    ) -> ConfigStore:
        """A store on `url` with the credentials and TLS of `settings` (read from the environment
        when not given; credentials in the URL win). Connects lazily: `check()` proves it."""
        settings = settings if settings is not None else ConnectionSettings()
        cluster = settings.valkey_cluster or is_cluster_url(url)
        store = cls(connect(url, settings, cluster=cluster), **kw)
        store.where = redact_cluster_url(url) if cluster else redact_url(url)
        return store

    def _pipeline(self, *, atomic: bool) -> Any:
        """A pipeline; MULTI/EXEC on a single server when `atomic`. A cluster has no
        transactions across a pipeline: the callers' atomic pipelines touch one session's keys,
        which the ordering of their commands keeps consistent enough (an HGETALL and PTTL of one
        key)."""
        return self.client.pipeline(transaction=atomic and not self.cluster)

    async def check(self) -> None:
        """One round trip; a refused login, TLS failure or unreachable server is a StoreError
        that says what to set (and never carries a password)."""
        try:
            await self.client.ping()
        except valkey.AuthenticationError as exc:
            verb = "wants a login" if "required" in str(exc).lower() else "refused the login"
            raise StoreError(
                f"Valkey at {self.where} {verb} ({exc}): set VOICEMESH_VALKEY_PASSWORD "
                "(and VOICEMESH_VALKEY_USERNAME for an ACL user), or put them in VALKEY_URL"
            ) from None
        except valkey.ResponseError as exc:
            if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
                raise StoreError(
                    f"Valkey at {self.where} wants a login ({exc}): set "
                    "VOICEMESH_VALKEY_PASSWORD (and VOICEMESH_VALKEY_USERNAME)"
                ) from None
            raise
        except (valkey.ConnectionError, OSError) as exc:
            ssl_hint = (
                " (TLS: check VOICEMESH_VALKEY_TLS_CA, _CERT and _KEY)"
                if "ssl" in str(exc).lower() or "certificate" in str(exc).lower()
                else ""
            )
            raise StoreError(f"cannot reach Valkey at {self.where}: {exc}{ssl_hint}") from None

    async def close(self) -> None:
        await self.client.aclose()

    # --- leases and claims: handed out here so no caller needs the raw client or the key layout

    def leases(self, *, owner: str, ttl_ms: int) -> Leases:
        """Session leases held as `owner` (a streaming stage's instance)."""
        return Leases(self.client, owner=owner, ttl_ms=ttl_ms)

    def claims(self, *, owner: str, ttl_ms: int) -> Claims:
        """Claims on units of work, held (or watched) as `owner`."""
        return Claims(self.client, keys=self.keys, owner=owner, ttl_ms=ttl_ms)

    async def lease_holder(self, stage: str, session: str) -> str | None:
        """The instance whose lease owns the session's stream on `stage`; None once it lapsed
        (its holder died or let go), which is how a sender learns the stream needs a new owner."""
        holder = await self.client.get(self.keys.lease(stage, session))
        return holder.decode() if holder is not None else None

    def _ttl_ms(self, ttl_s: int | None) -> int:
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        return int(ttl * 1000)

    # --- sessions ----------------------------------------------------------------------------

    async def create_session(
        self,
        config: AgentConfig,
        *,
        ttl_s: int | None = None,
        agent: str | None = None,
        owner: str = ADMIN_TENANT,
    ) -> StoredConfig:
        ttl_ms, now = self._ttl_ms(ttl_s), _now_ms()
        while True:
            sid = new_session_id()
            await self._index(sid, now + ttl_ms)
            created = await self._create(
                keys=[self.keys.session(sid)],
                args=[config.to_json(), ttl_ms, agent or "", now, sid, owner],
            )
            if created:
                return StoredConfig(sid, config, 1, agent, ttl_ms, now, owner)

    async def store_config(
        self,
        session_id: str,
        config: AgentConfig,
        *,
        ttl_s: int | None = None,
        owner: str = ADMIN_TENANT,
    ) -> int:
        """Create or replace a session's config with a fresh TTL; returns the new version."""
        check_session_id(session_id)
        ttl_ms, now = self._ttl_ms(ttl_s), _now_ms()
        await self._index(session_id, now + ttl_ms)
        return int(
            await self._store(
                keys=[self.keys.session(session_id), self.keys.context(session_id)],
                args=[config.to_json(), ttl_ms, now, session_id, owner],
            )
        )

    async def _index(self, session_id: str, expires_ms: int) -> None:
        """List the session in its index shard until `expires_ms` (before the session itself is
        written or extended: see voicemesh.state.keys)."""
        await self.client.zadd(self.keys.sessions_of(session_id), {session_id: expires_ms})

    async def update_config(
        self,
        session_id: str,
        config: AgentConfig,
        *,
        expect_version: int | None = None,
        agent: str | None = None,
    ) -> int:
        """Replace a live session's config, keeping its TTL; returns the new version. With
        `expect_version`, raises Conflict if another writer got there first. With `agent`, the
        session now names that agent as where its config came from (in the same write)."""
        args: list[Any] = [config.to_json(), "" if expect_version is None else str(expect_version)]
        if agent is not None:
            args.append(agent)
        version = await self._update(keys=[self.keys.session(session_id)], args=args)
        if version == -1:
            raise Conflict(f"session {session_id} changed meanwhile")
        if not version:
            raise NotFound(f"session {session_id} not found or expired")
        return int(version)

    async def get_config(self, session_id: str) -> StoredConfig | None:
        key = self.keys.session(session_id)
        async with self._pipeline(atomic=True) as pipe:
            pipe.hgetall(key)
            pipe.pttl(key)
            raw, ttl = await pipe.execute()
        if not raw or b"config" not in raw:
            return None
        return StoredConfig(
            session_id=session_id,
            config=parse_agent_config(raw[b"config"]),
            version=int(raw[b"version"]),
            agent=raw.get(b"agent", b"").decode() or None,
            ttl_ms=int(ttl),
            created_ms=int(raw.get(b"created_ms", 0)),
            owner=raw.get(b"owner", b"").decode() or ADMIN_TENANT,
        )

    async def get_version(self, session_id: str) -> int | None:
        v = await awaited(self.client.hget(self.keys.session(session_id), "version"))
        return int(v) if v is not None else None

    async def get_owner(self, session_id: str) -> str | None:
        """The session's owner, None when it does not exist (one HMGET, no config parsed)."""
        version, owner = await awaited(
            self.client.hmget(self.keys.session(session_id), ["version", "owner"])
        )
        if version is None:
            return None
        return owner.decode() if owner else ADMIN_TENANT

    async def list_configs(self, *, owner: str | None = None) -> list[str]:
        """Live session ids, all or `owner`'s (lapsed index entries are removed on the way)."""
        await self.cleanup_expired_configs()
        now = _now_ms()
        async with self._pipeline(atomic=False) as pipe:
            for shard in self.keys.sessions_shards:
                pipe.zrangebyscore(shard, now, "+inf")
            shards = await pipe.execute()
        ids = [i.decode() for rows in shards for i in rows]
        if owner is None or not ids:
            return ids
        async with self._pipeline(atomic=False) as pipe:
            for i in ids:
                pipe.hmget(self.keys.session(i), ["version", "owner"])
            rows = await pipe.execute()
        return [
            i
            for i, (version, o) in zip(ids, rows, strict=True)
            if version is not None and (o.decode() if o else ADMIN_TENANT) == owner
        ]

    async def get_config_ttl(self, session_id: str) -> int | None:
        """Seconds left, or None when the session does not exist."""
        ttl = await self.client.pttl(self.keys.session(session_id))
        return None if ttl < 0 else max(1, round(ttl / 1000))

    async def extend_config_ttl(self, session_id: str, ttl_s: int) -> bool:
        ttl_ms = self._ttl_ms(ttl_s)
        if not await self.client.exists(self.keys.session(session_id)):
            return False  # no index entry for a session that is gone
        await self._index(session_id, _now_ms() + ttl_ms)
        return bool(
            await self._extend(
                keys=[self.keys.session(session_id), self.keys.context(session_id)],
                args=[ttl_ms],
            )
        )

    async def cleanup_expired_configs(self) -> int:
        """Drop index entries whose session lapsed (by score, and any whose key was deleted),
        shard by shard: each shard's commands go to the node holding it."""
        now = _now_ms()
        shards = self.keys.sessions_shards
        async with self._pipeline(atomic=False) as pipe:
            for shard in shards:
                pipe.zremrangebyscore(shard, "-inf", now - 1)
                pipe.zrange(shard, 0, -1)
            replies = await pipe.execute()
        removed = sum(int(n) for n in replies[0::2])
        listed = [(shard, i) for shard, ids in zip(shards, replies[1::2], strict=True) for i in ids]
        if listed:
            async with self._pipeline(atomic=False) as pipe:
                for _, i in listed:
                    pipe.exists(self.keys.session(i.decode()))
                alive = await pipe.execute()
            gone = [(shard, i) for (shard, i), a in zip(listed, alive, strict=True) if not a]
            if gone:
                async with self._pipeline(atomic=False) as pipe:
                    for shard, i in gone:
                        pipe.zrem(shard, i)
                    removed += sum(int(n) for n in await pipe.execute())
        return int(removed)

    async def delete_config(self, session_id: str) -> bool:
        # hash and context share the session's slot: one DEL, atomic on a cluster too
        deleted = await self.client.delete(
            self.keys.session(session_id), self.keys.context(session_id)
        )
        await self.client.zrem(self.keys.sessions_of(session_id), session_id)
        return bool(deleted)

    async def next_epoch(self, session_id: str, *, at_least: int = 0) -> int:
        epoch = await self._next_epoch(keys=[self.keys.session(session_id)], args=[at_least])
        if epoch < 0:
            raise NotFound(f"session {session_id} not found or expired")
        return int(epoch)

    # --- conversation context ----------------------------------------------------------------

    async def append_context(self, session_id: str, *messages: dict[str, Any]) -> int:
        n = await self._append(
            keys=[self.keys.context(session_id)],
            args=[self.keys.session(session_id), *(orjson.dumps(m) for m in messages)],
        )
        if n < 0:
            raise NotFound(f"session {session_id} not found or expired")
        return int(n)

    async def put_reply(
        self, session_id: str, epoch: int, entry: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Store turn `epoch`'s reply, replacing an earlier one of that turn. Without `force` (the
        LLM stage) a reply cut off by a barge-in is left as the transport wrote it: the context
        holds what the caller heard, not what was generated. False when it was left so."""
        result = await self._put_reply(
            keys=[self.keys.context(session_id)],
            args=[
                epoch,
                orjson.dumps({**entry, "epoch": epoch}),
                "1" if force else "0",
                self.keys.session(session_id),
            ],
        )
        if result < 0:
            raise NotFound(f"session {session_id} not found or expired")
        return bool(result)

    async def get_context(
        self, session_id: str, *, last: int | None = None
    ) -> list[dict[str, Any]]:
        start = -last if last else 0
        items = await awaited(self.client.lrange(self.keys.context(session_id), start, -1))
        return [orjson.loads(i) for i in items]

    # --- agents ------------------------------------------------------------------------------
    # `tenant` None is the global catalogue; a tenant's name, that tenant's own agents. Which
    # scope a caller may read or write, and how a name resolves across scopes, is the API's rule
    # (voicemesh/transport/api/agents.py): the store keeps each scope apart.

    async def _put(
        self,
        name: str,
        config: AgentConfig,
        description: str | None,
        mode: str,
        tenant: str | None,
    ) -> AgentRecord:
        check_agent_name(name)
        keys = self.keys
        if tenant is not None:
            # another slot than the tenant's scope, so not in the script; first, so a tenant
            # with agents is always listed (the set says "has or had" anyway)
            await awaited(self.client.sadd(keys.agent_tenants, tenant))
        result = await self._put_agent(
            keys=[keys.agent(name, tenant), keys.agent_names(tenant), keys.default_of(tenant)],
            args=[
                name,
                config.to_json(),
                _now_ms(),
                mode,
                description or "",
                "1" if description is None else "0",
                tenant or "",
            ],
        )
        if result == -1:
            raise Conflict(f"agent {name!r} already exists")
        if result == 0:
            raise NotFound(f"agent {name!r} not found")
        record = await self.get_agent(name, tenant=tenant)
        assert record is not None
        return record

    async def create_agent(
        self,
        name: str,
        config: AgentConfig,
        *,
        description: str = "",
        tenant: str | None = None,
    ) -> AgentRecord:
        """Create a named agent; the first global agent stored becomes the global default (a
        tenant's first agent does not: the global default serves it until it picks one)."""
        return await self._put(name, config, description, "create", tenant)

    async def update_agent(
        self,
        name: str,
        config: AgentConfig,
        *,
        description: str | None = None,
        tenant: str | None = None,
    ) -> AgentRecord:
        return await self._put(name, config, description, "update", tenant)

    async def get_agent(self, name: str, *, tenant: str | None = None) -> AgentRecord | None:
        raw = await awaited(self.client.hgetall(self.keys.agent(name, tenant)))
        return self._agent(name, raw, tenant) if raw else None

    async def list_agents(self, *, tenant: str | None = None) -> list[AgentRecord]:
        names = sorted(
            n.decode() for n in await awaited(self.client.smembers(self.keys.agent_names(tenant)))
        )
        async with self._pipeline(atomic=False) as pipe:
            for n in names:
                pipe.hgetall(self.keys.agent(n, tenant))
            rows = await pipe.execute()
        return [self._agent(n, r, tenant) for n, r in zip(names, rows, strict=True) if r]

    async def agent_tenants(self) -> list[str]:
        """Tenants that have (or had) agents of their own."""
        return sorted(
            t.decode() for t in await awaited(self.client.smembers(self.keys.agent_tenants))
        )

    async def delete_agent(self, name: str, *, tenant: str | None = None) -> bool:
        keys = self.keys
        return bool(
            await self._delete_agent(
                keys=[keys.agent(name, tenant), keys.agent_names(tenant), keys.default_of(tenant)],
                args=[name],
            )
        )

    async def set_default_agent(
        self, name: str, *, tenant: str | None = None, global_agent: bool = False
    ) -> None:
        """Make `name` the default of scope `tenant`, checking that it exists there (or among the
        global agents with `global_agent`: a tenant may choose a global agent as its default)."""
        where = None if global_agent else tenant
        if not await self._set_default(
            keys=[self.keys.agent(name, where), self.keys.default_of(tenant)], args=[name]
        ):
            raise NotFound(f"agent {name!r} not found")

    async def default_agent_name(self, *, tenant: str | None = None) -> str | None:
        """The name stored as scope `tenant`'s default (it may have been deleted since)."""
        name = await self.client.get(self.keys.default_of(tenant))
        return name.decode() if name else None

    async def ensure_default_agent(
        self, name: str, config: AgentConfig, *, description: str = ""
    ) -> tuple[AgentRecord, bool]:
        """The global default agent, creating `name` from `config` first if there is none; the
        bool says whether it was created now."""
        current = await self.get_default_agent()
        if current is not None:
            return current, False
        try:
            await self.create_agent(name, config, description=description)
        except Conflict:
            pass
        await self.set_default_agent(name)
        record = await self.get_agent(name)
        assert record is not None
        return record, True

    async def get_default_agent(self) -> AgentRecord | None:
        """The global default agent."""
        name = await self.client.get(self.keys.default_agent)
        return await self.get_agent(name.decode()) if name else None

    @staticmethod
    def _agent(name: str, raw: dict[bytes, bytes], tenant: str | None = None) -> AgentRecord:
        return AgentRecord(
            name=name,
            config=parse_agent_config(raw[b"config"]),
            version=int(raw[b"version"]),
            description=raw.get(b"description", b"").decode(),
            created_ms=int(raw[b"created_ms"]),
            updated_ms=int(raw[b"updated_ms"]),
            owner=tenant,
        )
