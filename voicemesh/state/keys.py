"""Valkey key names, in one place so every role agrees on them (the bus's subjects are in
voicemesh.bus.subjects)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Session ids become NATS subject tokens and key parts: no dots, spaces or wildcards.
# Use with .fullmatch(): `$` would also match before a trailing newline.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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

    def agent(self, name: str) -> str:
        return f"{self.prefix}:agent:{name}"

    @property
    def agents(self) -> str:
        """Set of agent names."""
        return f"{self.prefix}:agents"

    @property
    def default_agent(self) -> str:
        return f"{self.prefix}:agents:default"
