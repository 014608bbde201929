"""NATS bus and wire codec, Valkey config store and leases, the ServiceRouter (next hop)."""

from voicemesh.router.bus import Bus, BusError
from voicemesh.router.codec import Flag, Frame, FrameError, Kind, decode, encode
from voicemesh.router.lease import Leases
from voicemesh.router.service_router import NoRoute, ServiceRouter, publish_config_update
from voicemesh.router.store import (
    AgentRecord,
    ConfigStore,
    Conflict,
    NotFound,
    StoredConfig,
    StoreError,
)
from voicemesh.router.subjects import Keys, Subjects

__all__ = [
    "AgentRecord",
    "Bus",
    "BusError",
    "ConfigStore",
    "Conflict",
    "Flag",
    "Frame",
    "FrameError",
    "Keys",
    "Kind",
    "Leases",
    "NoRoute",
    "NotFound",
    "ServiceRouter",
    "StoreError",
    "StoredConfig",
    "Subjects",
    "decode",
    "encode",
    "publish_config_update",
]
