"""NATS subject and Valkey key names, in one place so every role agrees on them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Session ids become NATS subject tokens and key parts: no dots, spaces or wildcards.
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def trace_id(session: str, epoch: int) -> str:
    """One turn's trace id, derived (not carried): every role computes the same one from the
    session and the turn epoch that every frame carries."""
    return hashlib.blake2s(f"{session}:{epoch}".encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Subjects:
    prefix: str = "vm"

    def data(self, stage: str, session: str) -> str:
        return f"{self.prefix}.{stage}.{session}"

    def data_all(self, stage: str) -> str:
        return f"{self.prefix}.{stage}.*"

    def ctl(self, session: str) -> str:
        return f"{self.prefix}.ctl.{session}"

    @property
    def ctl_all(self) -> str:
        return f"{self.prefix}.ctl.*"

    def config_get(self, session: str) -> str:
        return f"{self.prefix}.config.get.{session}"

    @property
    def config_get_all(self) -> str:
        return f"{self.prefix}.config.get.*"

    @property
    def config_update(self) -> str:
        return f"{self.prefix}.config.update"

    def assign(self, stage: str) -> str:
        """Queue-group request handing a session's stream to one instance of a streaming stage."""
        return f"{self.prefix}.assign.{stage}"

    @property
    def connector_health(self) -> str:
        """Broadcast: a connector was marked down or up (HealthBoard)."""
        return f"{self.prefix}.connector.health"

    def health(self, role: str) -> str:
        return f"{self.prefix}.health.{role}"

    @staticmethod
    def session_of(subject: str) -> str:
        return subject.rpartition(".")[2]


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
