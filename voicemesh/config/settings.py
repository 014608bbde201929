"""Process settings from the environment (pydantic-settings).

NATS_URL and VALKEY_URL keep their conventional names; everything else is VOICEMESH_*.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOICEMESH_", extra="ignore")

    nats_url: str | None = Field(
        None,
        validation_alias=AliasChoices("NATS_URL", "VOICEMESH_NATS_URL"),
        description="nats://host:port; unset means `voicemesh up` starts an embedded server",
    )
    valkey_url: str | None = Field(
        None,
        validation_alias=AliasChoices("VALKEY_URL", "VOICEMESH_VALKEY_URL"),
        description="valkey://host:port/db (redis:// works too); unset means embedded",
    )
    subject_prefix: str = Field("vm", pattern=r"^[A-Za-z0-9_-]+$")
    key_prefix: str = Field("vm", pattern=r"^[A-Za-z0-9_:-]+$")
    session_ttl_s: int = Field(3600, ge=10, le=30 * 86400)
    lease_ttl_ms: int = Field(3000, ge=300, le=120_000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "text"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    instance_id: str = Field(default_factory=_instance_id)
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="stages serve Prometheus /metrics on http_host:this port (unset: off); "
        "the transport serves /metrics on its own HTTP port",
    )
    preload: bool = Field(True, description="load the default agent's engines at stage start")
    default_agent_file: str | None = Field(
        None,
        description="agent-config.json the transport stores as agent 'local' when Valkey "
        "has no default agent yet",
    )


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
