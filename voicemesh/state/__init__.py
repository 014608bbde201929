"""The Valkey side of voicemesh: session configs, agents and context, leases, claims, key names.

Kept apart from the bus so the two infrastructure rooms never import each other; it depends on
config alone. Callers go through ConfigStore and the leases and claims it hands out rather than
its Valkey client, so the key layout and the scripts that keep it consistent stay in here.
"""

from voicemesh.state.claims import Claims
from voicemesh.state.keys import Keys
from voicemesh.state.lease import Leases
from voicemesh.state.store import (
    AgentRecord,
    ConfigStore,
    Conflict,
    NotFound,
    StoredConfig,
    StoreError,
)

__all__ = [
    "AgentRecord",
    "Claims",
    "ConfigStore",
    "Conflict",
    "Keys",
    "Leases",
    "NotFound",
    "StoreError",
    "StoredConfig",
]
