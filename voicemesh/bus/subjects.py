"""NATS subject names, in one place so every role agrees on them.

The Valkey key names are their twin in voicemesh.state.keys: a subject is the bus's business, a
key the store's, and neither package needs the other's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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

    def connector_health(self, stage: str) -> str:
        """Broadcast among a stage's instances: one of its connectors was marked down or up
        (HealthBoard). The stage is in the subject so NATS permissions can let each stage announce
        only its own connectors' health (voicemesh.bus.permissions)."""
        return f"{self.prefix}.connector.health.{stage}"

    def watch(self, session: str) -> str:
        """A copy of every event a call sends its caller, for watchers (the console's live view,
        voicemesh.transport.api.watch): the call's own client is not the only one who may look."""
        return f"{self.prefix}.watch.{session}"

    @property
    def watch_all(self) -> str:
        return f"{self.prefix}.watch.*"

    def health(self, role: str) -> str:
        return f"{self.prefix}.health.{role}"

    @staticmethod
    def session_of(subject: str) -> str:
        return subject.rpartition(".")[2]
