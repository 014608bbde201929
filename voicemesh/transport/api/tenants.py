"""Tenants: whom an API key speaks for, and what each tenant may use at once.

Keys come from three places, merged at start:

- VOICEMESH_API_KEYS: admin keys, of the tenant "admin". A deployment with one operator keeps
  working unchanged: its keys see and do everything, as before tenants existed.
- VOICEMESH_TENANT_KEYS="acme:KEY,beta:KEY": keys of ordinary tenants.
- VOICEMESH_KEYS_FILE: a JSON file (KeysFile below) of tenants, each with raw keys and/or the
  SHA-256 digests of keys (so the file need not hold a secret), an admin flag and its own limits.

Only the SHA-256 digest of a key is kept in memory; a presented key is hashed once and compared
with every digest in constant time and without an early exit. No error names a key: a problem is
named by its tenant and its position.

The limits: the session creation rate (security.SessionRateLimit) and the calls a tenant runs at
once, counted in Valkey across every transport (CallSlots). A call holds a slot as a lease: its
transport renews it, and a transport that dies stops renewing, so its slots lapse by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from voicemesh.config.logging import add_secret_values
from voicemesh.config.settings import TENANT_NAME, Settings, parse_rate
from voicemesh.errors import VoicemeshError
from voicemesh.state import ConfigStore
from voicemesh.state.keys import ADMIN_TENANT
from voicemesh.state.store import UNREACHABLE

log = logging.getLogger(__name__)

MAX_KEYS = 1000


class AuthConfigError(VoicemeshError, ValueError):
    """The transport's auth settings cannot work (auth required and no key, a bad keys file)."""


class RateLimited(VoicemeshError):
    """Over a limit: HTTP 429 with Retry-After, WebSocket close 4429 after an `error` event."""

    def __init__(self, detail: str, retry_after_s: int):
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class CallLimited(RateLimited):
    """A tenant runs as many calls at once as it may."""


def check_tenant(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(
            f"tenant name {name[:40]!r} is not 1-32 of a-z 0-9 _ -, starting with a letter or digit"
        )
    return name


TenantName = Annotated[str, AfterValidator(check_tenant)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$", to_lower=True)]


class TenantSpec(BaseModel):
    """One tenant of the keys file."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    keys: list[SecretStr] = Field(default_factory=list, max_length=MAX_KEYS)
    key_sha256: list[Sha256] = Field(
        default_factory=list,
        max_length=MAX_KEYS,
        description="hex SHA-256 digests of keys: `printf %s KEY | sha256sum`",
    )
    admin: bool = Field(False, description="sees and may change every tenant's resources")
    max_calls: int | None = Field(
        None, ge=0, le=100_000, description="concurrent calls (0: no limit; unset: the setting)"
    )
    session_rate: str | None = Field(
        None, description="'N/SECONDS' or 'off' (unset: VOICEMESH_SESSION_RATE)"
    )

    @field_validator("keys")
    @classmethod
    def _no_empty_key(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for n, key in enumerate(keys):
            if not key.get_secret_value().strip():
                raise ValueError(f"key {n} is empty")
        return keys

    @field_validator("session_rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value


class KeysFile(BaseModel):
    """VOICEMESH_KEYS_FILE: {"tenants": {"acme": {"keys": ["..."], "max_calls": 5}, ...}}"""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    tenants: dict[TenantName, TenantSpec] = Field(max_length=10_000)

    @model_validator(mode="after")
    def _admin_name(self) -> KeysFile:
        spec = self.tenants.get(ADMIN_TENANT)
        if spec is not None and not spec.admin:
            raise ValueError(f"tenant {ADMIN_TENANT!r} is the admin tenant: give it admin: true")
        return self


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    admin: bool
    #: concurrent calls across every transport; 0: no limit
    max_calls: int
    #: (sessions, window s); None: no limit
    session_rate: tuple[int, float] | None

    @property
    def scope(self) -> str | None:
        """The agent scope it writes to: admins write the global catalogue."""
        return None if self.admin else self.name

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.name


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _Entry:
    admin: bool = False
    max_calls: int | None = None
    session_rate: str | None = None
    sources: str = ""


class Tenants:
    """Every configured key's digest and the tenant it belongs to."""

    def __init__(self, settings: Settings):
        self._default_calls = settings.tenant_max_calls
        self._default_rate = settings.session_rate_limit
        entries: dict[str, _Entry] = {}
        digests: list[tuple[bytes, str]] = []

        def entry(name: str, admin: bool, source: str) -> _Entry:
            found = entries.setdefault(name, _Entry(admin=admin))
            if found.admin != admin:
                raise AuthConfigError(
                    f"tenant {name!r} is an admin in one place and not in another ({source}): "
                    f"{ADMIN_TENANT!r} is the tenant of VOICEMESH_API_KEYS, always an admin"
                )
            found.sources += f" {source}"
            return found

        if settings.api_keys:
            entry(ADMIN_TENANT, True, "VOICEMESH_API_KEYS")
            digests += [(digest(k.get_secret_value()), ADMIN_TENANT) for k in settings.api_keys]
        for n, (name, key) in enumerate(settings.tenant_keys, 1):
            if name == ADMIN_TENANT:
                raise AuthConfigError(
                    f"VOICEMESH_TENANT_KEYS: entry {n} names tenant {ADMIN_TENANT!r}, the admin "
                    "tenant: put admin keys in VOICEMESH_API_KEYS"
                )
            entry(name, False, "VOICEMESH_TENANT_KEYS")
            digests.append((digest(key.get_secret_value()), name))
        if settings.keys_file:
            for name, spec in load_keys_file(Path(settings.keys_file)).tenants.items():
                found = entry(name, spec.admin, "VOICEMESH_KEYS_FILE")
                found.max_calls, found.session_rate = spec.max_calls, spec.session_rate
                digests += [(digest(k.get_secret_value()), name) for k in spec.keys]
                add_secret_values(k.get_secret_value() for k in spec.keys)  # never logged
                digests += [(bytes.fromhex(h), name) for h in spec.key_sha256]

        owner: dict[bytes, str] = {}
        for d, name in digests:
            if owner.setdefault(d, name) != name:
                raise AuthConfigError(
                    f"one key is configured for two tenants, {owner[d]!r} and {name!r}: "
                    "a key names exactly one tenant"
                )
        self._digests = digests
        self._tenants = {name: self._tenant(name, e) for name, e in entries.items()}
        # auth off, or sessions from before owners: the one admin tenant
        self.admin = self._tenants.get(ADMIN_TENANT) or self._tenant(ADMIN_TENANT, _Entry(True))

    def _tenant(self, name: str, e: _Entry) -> Tenant:
        rate = self._default_rate if e.session_rate is None else parse_rate(e.session_rate)
        calls = self._default_calls if e.max_calls is None else e.max_calls
        return Tenant(name=name, admin=e.admin, max_calls=calls, session_rate=rate)

    @property
    def key_count(self) -> int:
        return len(self._digests)

    @property
    def names(self) -> list[str]:
        return sorted(self._tenants)

    def identify(self, presented: str) -> Tenant | None:
        """The tenant of a presented key. Every digest is compared, in constant time each, even
        after a match: how long this takes says nothing about which key matched, or how many
        bytes of one did."""
        given = digest(presented)
        found: str | None = None
        for d, name in self._digests:
            if secrets.compare_digest(given, d):
                found = name
        return self._tenants[found] if found is not None else None


def load_keys_file(path: Path) -> KeysFile:
    """The keys file, or AuthConfigError naming each problem by its JSON path (never a key)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(
            f"VOICEMESH_KEYS_FILE {path}: cannot read it ({exc.strerror})"
        ) from None
    try:
        return KeysFile.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != '[key]') or '(file)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)[:10]
        )
        raise AuthConfigError(f"VOICEMESH_KEYS_FILE {path}: {problems}") from None


# --- concurrent calls ------------------------------------------------------------------------

# KEYS[1] the tenant's call set; ARGV lease_ms, max, member. Valkey's clock, not the transports':
# their clocks may differ, and every slot must lapse on the same one.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then return -n end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n + 1
"""

# KEYS[1] the call set; ARGV lease_ms, member. A slot that lapsed meanwhile (Valkey was away
# longer than a lease) is taken again: the call is live, so it counts.
_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

#: what Retry-After says when a tenant is at its call limit: a hint, as no one knows when a call
#: will end
CALL_RETRY_S = 5


class CallSlot:
    """One call's place in its tenant's count; `release()` (or leaving `async with`) gives it
    back. Holds nothing when the tenant has no limit."""

    def __init__(self, slots: CallSlots | None = None, tenant: str = "", member: str = ""):
        self._slots, self.tenant, self.member = slots, tenant, member
        #: run once when the slot is given back (the transport's own call count)
        self._then: list[Callable[[], None]] = []
        self._renewer: asyncio.Task[None] | None = None
        if slots is not None:
            self._renewer = asyncio.create_task(self._renew(slots), name=f"call-slot {tenant}")

    async def _renew(self, slots: CallSlots) -> None:
        while True:
            await asyncio.sleep(slots.lease_ms / 3000)
            try:
                await slots.renew(self)
            except Exception as exc:  # keep trying: the call is live, and a lapsed slot is retaken
                log.warning("call slot of %s not renewed: %s", self.tenant, exc)

    def also(self, release: Callable[[], None]) -> None:
        """Run `release` too when this slot is given back."""
        self._then.append(release)

    async def release(self) -> None:
        then, self._then = self._then, []
        for fn in then:
            fn()
        slots, self._slots = self._slots, None
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if slots is not None:
            try:
                await asyncio.shield(slots.release(self))
            except UNREACHABLE as exc:  # it lapses by itself within a lease
                log.warning(
                    "Valkey unreachable, call slot of %s left to lapse: %s", self.tenant, exc
                )

    async def __aenter__(self) -> CallSlot:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.release()


class CallSlots:
    """The calls each tenant runs at once, one sorted set per tenant in Valkey shared by every
    transport (member: this instance and a random id; score: when the slot lapses)."""

    def __init__(self, store: Callable[[], ConfigStore], *, instance: str, lease_s: float):
        self._store, self.instance = store, instance
        self.lease_ms = max(1000, round(lease_s * 1000))
        self._client: Any = None
        self._acquire: Any = None
        self._renew: Any = None

    @property
    def store(self) -> ConfigStore:
        return self._store()  # the service's, once it has started

    def _scripts(self) -> tuple[Any, Any]:
        client = self.store.client  # the store's connection, borrowed: it may be replaced
        if self._client is not client:
            self._client = client
            self._acquire = client.register_script(_ACQUIRE)
            self._renew = client.register_script(_RENEW)
        return self._acquire, self._renew

    async def acquire(self, tenant: Tenant) -> CallSlot:
        """A slot for one more call of `tenant`; CallLimited when it runs `max_calls` already."""
        if tenant.max_calls <= 0:
            return CallSlot()
        acquire, _ = self._scripts()
        member = f"{self.instance}:{uuid.uuid4().hex}"
        n = int(
            await acquire(
                keys=[self.store.keys.calls(tenant.name)],
                args=[self.lease_ms, tenant.max_calls, member],
            )
        )
        if n <= 0:
            log.warning("call limit of tenant %s reached (%d calls)", tenant.name, -n)
            raise CallLimited(
                f"too many concurrent calls: tenant {tenant.name} runs {-n} of at most "
                f"{tenant.max_calls}; retry when one ends",
                CALL_RETRY_S,
            )
        return CallSlot(self, tenant.name, member)

    async def renew(self, slot: CallSlot) -> None:
        _, renew = self._scripts()
        await renew(keys=[self.store.keys.calls(slot.tenant)], args=[self.lease_ms, slot.member])

    async def release(self, slot: CallSlot) -> None:
        await self.store.client.zrem(self.store.keys.calls(slot.tenant), slot.member)

    async def count(self, tenant: str) -> int:
        """Live calls of `tenant` (lapsed slots not counted)."""
        key = self.store.keys.calls(tenant)
        now_ms = int((await self.store.client.time())[0]) * 1000
        return int(await self.store.client.zcount(key, now_ms, "+inf"))
