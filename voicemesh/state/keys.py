"""Valkey key names, in one place so every role agrees on them (the bus's subjects are in
voicemesh.bus.subjects).

The layout runs unchanged on one Valkey and on a Valkey Cluster. A cluster maps each key to one
of 16384 slots by the part of its name inside the first `{...}` (its hash tag), and refuses a
script or transaction whose keys span slots (CROSSSLOT). So:

- everything of one session (hash, context, leases, claims, progress) carries the session id as
  its tag, `vm:session:{SID}`: every script on a session touches one slot, and sessions spread
  over the whole cluster;
- the session index is sharded (SESSION_INDEX_SHARDS sorted sets, each its own tag): a create
  writes one shard, picked from the session id, so no single key is every create's hot spot, and
  a listing reads all shards in one pipeline. It is written outside the session's script (another
  slot), index first, so an index entry may outlive a failed write but no live session lacks one;
  listing and cleanup check each entry against its key, as before;
- an agent scope (the global catalogue, or one tenant's) is one tag, so creating an agent, its
  name set and the default stay one atomic script; agents are few and cached by every reader;
- single-key state (rate-limit windows, call slots, connector health marks) needs no tag.

LegacyKeys below has the names before this layout, for `voicemesh migrate` (state/migrate.py).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

# Session ids become NATS subject tokens and key parts: no dots, spaces or wildcards.
# Use with .fullmatch(): `$` would also match before a trailing newline.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the owner of what admin keys (VOICEMESH_API_KEYS) create, of everything when auth is off, and
#: of sessions stored before sessions had owners
ADMIN_TENANT = "admin"
#: how many sorted sets the session index is split into. Fixed: a different number would hide the
#: sessions indexed under the old one (`voicemesh migrate` rebuilds the index from the hashes).
SESSION_INDEX_SHARDS = 16


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "vm"

    def session(self, session: str) -> str:
        return f"{self.prefix}:session:{{{session}}}"

    def session_shard(self, session: str) -> int:
        return zlib.crc32(session.encode()) % SESSION_INDEX_SHARDS

    def sessions_shard(self, shard: int) -> str:
        """One shard of the session index: a sorted set of session ids scored by expiry (ms)."""
        return f"{self.prefix}:sessions:{{{self.prefix}:sessions:{shard}}}"

    def sessions_of(self, session: str) -> str:
        """The index shard that lists `session`."""
        return self.sessions_shard(self.session_shard(session))

    @property
    def sessions_shards(self) -> list[str]:
        return [self.sessions_shard(i) for i in range(SESSION_INDEX_SHARDS)]

    def context(self, session: str) -> str:
        return f"{self.prefix}:ctx:{{{session}}}"

    def lease(self, stage: str, session: str) -> str:
        return f"{self.prefix}:lease:{stage}:{{{session}}}"

    def claim(self, stage: str, session: str, epoch: int, index: int) -> str:
        """Who works on (or finished) one unit: an LLM turn (index 0) or a TTS sentence."""
        return f"{self.prefix}:claim:{stage}:{{{session}}}:{epoch}:{index}"

    def progress(self, session: str, epoch: int) -> str:
        """The sentences an LLM turn has sent so far (a redelivered turn resumes after them)."""
        return f"{self.prefix}:progress:{{{session}}}:{epoch}"

    # Agents are global (tenant None: the operator's catalogue) or a tenant's own, under the
    # tenant's name (tenant names hold no ':' and no braces). Each scope is one hash tag.

    @staticmethod
    def _scope_tag(tenant: str | None) -> str:
        return "{agents}" if tenant is None else f"{{agents:{tenant}}}"

    def _agents(self, tenant: str | None) -> str:
        tag = self._scope_tag(tenant)
        return (
            f"{self.prefix}:agents:{tag}"
            if tenant is None
            else f"{self.prefix}:tenant:{tenant}:agents:{tag}"
        )

    def agent(self, name: str, tenant: str | None = None) -> str:
        tag = self._scope_tag(tenant)
        if tenant is None:
            return f"{self.prefix}:agent:{tag}:{name}"
        return f"{self.prefix}:tenant:{tenant}:agent:{tag}:{name}"

    def agent_names(self, tenant: str | None = None) -> str:
        """Set of agent names (global, or one tenant's)."""
        return self._agents(tenant)

    @property
    def agents(self) -> str:
        """Set of global agent names."""
        return self._agents(None)

    def default_of(self, tenant: str | None = None) -> str:
        """The default agent's name (global, or one tenant's own choice)."""
        return f"{self._agents(tenant)}:default"

    @property
    def default_agent(self) -> str:
        return self.default_of(None)

    @property
    def agent_tenants(self) -> str:
        """Set of tenants that have agents of their own (an admin's listing walks it)."""
        return f"{self._agents(None)}:tenants"

    def calls(self, tenant: str) -> str:
        """Sorted set of a tenant's live calls, scored by when each one's slot lapses (ms)."""
        return f"{self.prefix}:calls:{tenant}"


@dataclass(frozen=True, slots=True)
class LegacyKeys:
    """The names before hash tags (before Valkey Cluster support), read by `voicemesh migrate`
    only."""

    prefix: str = "vm"

    def session(self, session: str) -> str:
        return f"{self.prefix}:session:{session}"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def context(self, session: str) -> str:
        return f"{self.prefix}:ctx:{session}"

    def progress_pattern(self) -> str:
        return f"{self.prefix}:progress:*"

    def claim_pattern(self) -> str:
        return f"{self.prefix}:claim:*"

    def _agents(self, tenant: str | None) -> str:
        return (
            f"{self.prefix}:agents" if tenant is None else f"{self.prefix}:tenant:{tenant}:agents"
        )

    def agent(self, name: str, tenant: str | None = None) -> str:
        if tenant is None:
            return f"{self.prefix}:agent:{name}"
        return f"{self.prefix}:tenant:{tenant}:agent:{name}"

    def agent_names(self, tenant: str | None = None) -> str:
        return self._agents(tenant)

    def default_of(self, tenant: str | None = None) -> str:
        return f"{self._agents(tenant)}:default"

    @property
    def agent_tenants(self) -> str:
        return f"{self.prefix}:agents:tenants"
