"""What the call engine needs from the process that hosts its calls, stated here so the engine
imports nothing from the API room above it: the TransportService (api/service.py) is one host, a
test may build another. The engine reads the bus, the store, the router and the settings, and asks
the host to find the owner of a streaming stage (it keeps who owns what across a session's calls).
"""

from __future__ import annotations

from typing import Protocol

from voicemesh.bus import Bus, Frame, Subjects
from voicemesh.config.settings import Settings
from voicemesh.errors import VoicemeshError
from voicemesh.router import ServiceRouter
from voicemesh.state import ConfigStore


class NoInstance(VoicemeshError, RuntimeError):
    """No instance of a stage answered the assignment request."""


class CallHost(Protocol):
    settings: Settings
    subjects: Subjects
    bus: Bus
    store: ConfigStore
    router: ServiceRouter

    async def ensure_owner(
        self, stage: str, session: str, *, replay: list[Frame] | None = None
    ) -> bool:
        """Make sure one instance of a streaming stage owns the session (NoInstance if none
        answers); True if the owner changed and `replay` was resent to it."""
        ...
