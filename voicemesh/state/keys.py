"""Valkey key names, in one place so every role agrees on them (the bus's subjects are in
voicemesh.bus.subjects)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Session ids become NATS subject tokens and key parts: no dots, spaces or wildcards.
# Use with .fullmatch(): `$` would also match before a trailing newline.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the owner of what admin keys (VOICEMESH_API_KEYS) create, of everything when auth is off, and
#: of sessions stored before sessions had owners
ADMIN_TENANT = "admin"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "vm"

    def session(self, session: str) -> str:
        return f"{self.prefix}:session:{session}"

    @property
    def sessions(self) -> str:
        """Sorted set: session id scored by its expiry time (ms), so listing skips lapsed ids."""
        return f"{self.prefix}:sessions"

    def context(self, session: str) -> str:
        return f"{self.prefix}:ctx:{session}"

    def lease(self, stage: str, session: str) -> str:
        return f"{self.prefix}:lease:{stage}:{session}"

    def claim(self, stage: str, session: str, epoch: int, index: int) -> str:
        """Who works on (or finished) one unit: an LLM turn (index 0) or a TTS sentence."""
        return f"{self.prefix}:claim:{stage}:{session}:{epoch}:{index}"

    def progress(self, session: str, epoch: int) -> str:
        """The sentences an LLM turn has sent so far (a redelivered turn resumes after them)."""
        return f"{self.prefix}:progress:{session}:{epoch}"

    # Agents are global (tenant None: the operator's catalogue, the keys they always had) or a
    # tenant's own, under the tenant's name (tenant names hold no ':').

    def _agents(self, tenant: str | None) -> str:
        return (
            f"{self.prefix}:agents" if tenant is None else f"{self.prefix}:tenant:{tenant}:agents"
        )

    def agent(self, name: str, tenant: str | None = None) -> str:
        if tenant is None:
            return f"{self.prefix}:agent:{name}"
        return f"{self.prefix}:tenant:{tenant}:agent:{name}"

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
        return f"{self.prefix}:agents:tenants"

    def calls(self, tenant: str) -> str:
        """Sorted set of a tenant's live calls, scored by when each one's slot lapses (ms)."""
        return f"{self.prefix}:calls:{tenant}"
