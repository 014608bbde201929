"""Process settings from the environment (pydantic-settings).

NATS_URL and VALKEY_URL keep their conventional names; everything else is VOICEMESH_*. Secrets
(API keys, NATS and Valkey passwords) are SecretStr: they print as '**********', and validation
errors never echo an input value.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from voicemesh.config.hosts import HOSTS_FORMAT, parse_egress_hosts
from voicemesh.config.secrets import credential_connectors
from voicemesh.config.tools import parse_tool_subjects

_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*")
#: a tenant's name: a Valkey key part and a log field, so no ':' , spaces or upper case
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
TENANT_KEYS_FORMAT = "TENANT:KEY[,TENANT:KEY...], e.g. acme:k-3f9...,beta:k-77a..."
_SECRET_ENV_KEY = re.compile(r"(?:(?:transport|stt|llm|tts)\.)?[a-z][a-z0-9_-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_ENV_FORMAT = (
    "[STAGE.]CONNECTOR:VAR[,VAR...][;...], e.g. llm.openai:GROQ_API_KEY;deepgram:DG_KEY"
)


def parse_secret_env(value: str) -> dict[str, tuple[str, ...]]:
    """'llm.openai:A,B;deepgram:C' to {'llm.openai': ('A', 'B'), 'deepgram': ('C',)}."""
    out: dict[str, tuple[str, ...]] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        key, sep, names = part.partition(":")
        key = key.strip().lower()
        listed = tuple(n.strip() for n in names.split(",") if n.strip())
        if not sep or not _SECRET_ENV_KEY.fullmatch(key) or not listed:
            raise ValueError(f"VOICEMESH_SECRET_ENV: {part.strip()!r} is not {SECRET_ENV_FORMAT}")
        for name in listed:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"VOICEMESH_SECRET_ENV: {name!r} is not an environment name")
        # a misspelt connector would allow nothing, silently: the operator hears of it at start
        stage, dot, connector = key.rpartition(".")
        known = credential_connectors()
        if connector not in known or (dot and stage not in known[connector]):
            names = ", ".join(f"{n} ({'/'.join(sorted(s))})" for n, s in sorted(known.items()))
            raise ValueError(
                f"VOICEMESH_SECRET_ENV: {key!r} is not a connector with credentials; known: {names}"
            )
        out[key] = tuple(dict.fromkeys((*out.get(key, ()), *listed)))
    return out


def parse_rate(value: object) -> tuple[int, float] | None:
    """'30/60' to (30, 60.0); None, '' or 'off' to None (no limit)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    m = _RATE.fullmatch(str(value))
    if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
        raise ValueError("expected COUNT/SECONDS, e.g. 30/60 (30 sessions per 60 s), or off")
    return int(m.group(1)), float(m.group(2))


def parse_tenant_keys(value: str) -> tuple[tuple[str, SecretStr], ...]:
    """'acme:KEY,beta:KEY' to ((acme, KEY), (beta, KEY)). Errors name the entry by position and
    its tenant, never its key."""
    out = []
    for n, part in enumerate((p for p in value.split(",") if p.strip()), 1):
        tenant, sep, key = part.strip().partition(":")
        if not sep or not key.strip():
            raise ValueError(f"VOICEMESH_TENANT_KEYS: entry {n} is not {TENANT_KEYS_FORMAT}")
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(
                f"VOICEMESH_TENANT_KEYS: entry {n}: tenant {tenant[:40]!r} is not 1-32 of "
                "a-z 0-9 _ -, starting with a letter or digit"
            )
        out.append((tenant, SecretStr(key.strip())))
    return tuple(out)


def _instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ConnectionSettings(BaseSettings):
    """How every role authenticates to NATS and Valkey, and their TLS. Credentials inside
    NATS_URL / VALKEY_URL work too (and win over these for Valkey)."""

    model_config = SettingsConfigDict(
        env_prefix="VOICEMESH_", extra="ignore", hide_input_in_errors=True
    )

    nats_user: str | None = Field(None, description="NATS user (with nats_password)")
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = Field(None, description="NATS token (instead of user/password)")
    nats_creds: str | None = Field(None, description="NATS .creds file (JWT + NKey seed)")
    nats_inbox_prefix: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="subject prefix of this role's request inboxes; unset: _INBOX.<nats_user> "
        "with a user (so NATS permissions can keep each role's replies its own), else _INBOX",
    )
    nats_tls_ca: str | None = Field(None, description="CA bundle that signed the NATS server cert")
    nats_tls_cert: str | None = Field(None, description="client certificate (mutual TLS)")
    nats_tls_key: str | None = Field(None, description="client certificate's private key")
    valkey_username: str | None = Field(None, description="Valkey ACL user (default: 'default')")
    valkey_password: SecretStr | None = None
    valkey_tls_ca: str | None = Field(None, description="needs a valkeys:// or rediss:// URL")
    valkey_tls_cert: str | None = None
    valkey_tls_key: str | None = None
    valkey_cluster: bool = Field(
        False,
        description="VALKEY_URL names a Valkey Cluster seed (same as a valkey+cluster:// URL): "
        "the client follows the cluster's slot map and its failovers",
    )
    valkey_failover_wait_ms: int = Field(
        5000,
        ge=0,
        le=60_000,
        description="on a Valkey Cluster, how long a command that meets a dead master is retried "
        "while its replica is promoted (then it fails as an unreachable Valkey does)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ConnectionSettings:
        if self.nats_token is not None and (self.nats_user or self.nats_password is not None):
            raise ValueError("set VOICEMESH_NATS_TOKEN or VOICEMESH_NATS_USER/PASSWORD, not both")
        if (self.nats_password is not None) and not self.nats_user:
            raise ValueError("VOICEMESH_NATS_PASSWORD needs VOICEMESH_NATS_USER")
        for side in ("nats", "valkey"):
            cert, key = getattr(self, f"{side}_tls_cert"), getattr(self, f"{side}_tls_key")
            if bool(cert) != bool(key):
                up = side.upper()
                raise ValueError(f"set both VOICEMESH_{up}_TLS_CERT and VOICEMESH_{up}_TLS_KEY")
        return self


class SecretEnvSettings(BaseSettings):
    """Environment names a config's credential fields may reference, beyond each connector's
    conventional ones (voicemesh.config.secrets)."""

    model_config = SettingsConfigDict(
        env_prefix="VOICEMESH_", extra="ignore", hide_input_in_errors=True
    )

    secret_env: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=dict,
        description="extra names per connector, " + SECRET_ENV_FORMAT,
    )

    @field_validator("secret_env", mode="before")
    @classmethod
    def _parse_secret_env(cls, value: object) -> object:
        return parse_secret_env(value) if isinstance(value, str) else value


class EgressSettings(BaseSettings):
    """Where configs may point connectors (voicemesh.config.hosts): hosts beyond each provider's
    official ones, and whether loopback/private hosts are reachable at all."""

    model_config = SettingsConfigDict(
        env_prefix="VOICEMESH_", extra="ignore", hide_input_in_errors=True
    )

    egress_hosts: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=dict,
        description="extra hosts per connector, " + HOSTS_FORMAT,
    )
    egress_private: bool = Field(
        False,
        description="let configs reach loopback and private hosts (plain http allowed there): "
        "local development and tests only; link-local/metadata addresses stay refused",
    )

    @field_validator("egress_hosts", mode="before")
    @classmethod
    def _parse_egress_hosts(cls, value: object) -> object:
        return parse_egress_hosts(value) if isinstance(value, str) else value


class Settings(ConnectionSettings, SecretEnvSettings, EgressSettings):
    model_config = SettingsConfigDict(
        env_prefix="VOICEMESH_", extra="ignore", hide_input_in_errors=True
    )

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
    stage_wait_ms: int = Field(
        5000,
        ge=500,
        le=120_000,
        description="how long a turn waits for an instance of its next stage to take its work "
        "(resent meanwhile) before the caller gets an error naming the stage",
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT"),
        pattern=r"^https?://[^\s]+$",
        description="OpenTelemetry collector (OTLP/HTTP): set, every role exports one trace per "
        "turn to <it>/v1/traces; unset, tracing costs nothing (voicemesh/bus/tracing.py)",
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        pattern=r"^https?://[^\s]+$",
        description="the full URL for traces, instead of OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces",
    )
    otel_exporter_otlp_headers: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_HEADERS"),
        description="headers of every export, k=v,k2=v2 (a collector's API key: a secret)",
    )
    otel_service_name: str = Field(
        "voicemesh",
        validation_alias=AliasChoices("OTEL_SERVICE_NAME"),
        max_length=100,
        description="service.name of the exported spans (each span also names its role)",
    )
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
    speculative_stt: bool = Field(
        True,
        description="stt: transcribe at the pauses the transport marks (agents with "
        "speculative_stt), when the engine is idle; false ignores the marks (less CPU, and "
        "every turn waits for its transcription after its end)",
    )
    default_agent_file: str | None = Field(
        None,
        description="agent-config.json the transport stores as agent 'local' when Valkey "
        "has no default agent yet",
    )
    auth: Literal["required", "off"] = Field(
        "required",
        description="API keys on /api and /ws/call; 'off' only for local use (`voicemesh up`)",
    )
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated keys the transport accepts (secrets)"
    )
    webrtc_loopback: bool = Field(
        False,
        description="offer 127.0.0.1 as a WebRTC host candidate too (aioice skips it): for a "
        "caller on the same host with no other interface, as in a network namespace",
    )
    daily_join_timeout_s: float = Field(
        10.0, gt=0, le=120, description="how long a Daily bot waits to join its room"
    )
    playout_max_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="transport: seconds of bot audio a call may hold unplayed; past that the "
        "rest of the reply is dropped, with one warning per reply",
    )
    max_reply_chars: int = Field(
        4000,
        ge=100,
        le=1_000_000,
        description="llm: characters one reply may have; past that the rest is not generated, "
        "the turn ends normally with the cut text, and the caller gets a 'warning' event "
        "(reply_truncated)",
    )
    first_unit_words: int = Field(
        5,
        ge=0,
        le=100,
        description="llm: a reply's first TTS unit ends at its first clause boundary (comma, "
        "semicolon, colon, dash) or after this many words, whichever comes first, so the first "
        "audio does not wait for a whole sentence; later units are sentences; 0: the first unit "
        "is a sentence too",
    )
    # --- tools (voicemesh/tools/, docs/wire-protocol.md "Tools") ---
    tool_subjects: str = Field(
        "tools",
        description="llm: NATS subject prefixes a config's nats tools may send requests under, "
        "comma-separated (a tool subject must be PREFIX.something); a subject elsewhere is a 422",
    )
    tool_max_rounds: int = Field(
        4,
        ge=1,
        le=20,
        description="llm: rounds of tool calls in one turn; after the last, the LLM is asked "
        "once more without tools and any call it still makes is dropped with a 'warning' event "
        "(tool_round_limit)",
    )
    tool_timeout_max_ms: int = Field(
        30_000,
        ge=50,
        le=600_000,
        description="llm: the longest a tool call may run, whatever the config's timeout_ms; a "
        "call past its timeout is answered to the LLM with an error result",
    )
    tool_result_max_chars: int = Field(
        4000,
        ge=100,
        le=1_000_000,
        description="llm: characters of one tool result given to the LLM and stored in the "
        "context; a longer one is cut and ends with a truncation marker",
    )
    tool_filler_after_ms: int = Field(
        1500,
        ge=0,
        le=60_000,
        description="llm: how long tools run, with nothing said in the turn yet, before the "
        "agent's tool_filler is spoken (an agent may set its own after_ms); 0: at once",
    )
    tool_mcp_list_ttl_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="llm: how long the tool list of an mcp tool's server is reused before it "
        "is asked again (a turn asks only when it is older); 0: listed on every turn",
    )
    piper_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="tts: onnxruntime threads of the Piper voice in this process, at most its "
        "cores; 0: one per core (onnxruntime's default). Its threads never spin-wait, which made "
        "Piper's first audio 14-40% sooner on 2 busy cores, 10% later on idle ones "
        "(benchmarks/bench_tts_first_audio.py)",
    )
    connector_pool_size: int = Field(
        64,
        ge=1,
        le=10_000,
        description="stages: live connectors (one per distinct stage, name and options) a process "
        "keeps; the least recently used beyond it is closed and its health probe stopped",
    )
    # --- transport-side limits on what a caller sends (issue 12) ---
    max_body_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="transport: the largest HTTP request body; a larger one gets 413 before "
        "it is read past the limit",
    )
    ws_max_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="transport: the largest WebSocket message; a larger one closes the socket "
        "with 1009 before its payload is read",
    )
    max_utterance_s: float = Field(
        30.0,
        ge=1,
        le=600,
        description="transport: a turn still voiced after this long is cut and transcribed; "
        "stt: the most audio of one turn it buffers (plus a 2 s margin)",
    )
    caller_audio_max_rate: float = Field(
        1.5,
        gt=1,
        le=100,
        description="transport: caller audio faster than this many times real time (beyond "
        "the burst) ends the call with an error event (WebSocket close 4429)",
    )
    caller_audio_burst_s: float = Field(
        2.0,
        ge=0.2,
        le=60,
        description="transport: seconds of caller audio that may arrive ahead of the rate "
        "(network jitter, a stalled connection catching up)",
    )
    webrtc_connect_timeout_s: float = Field(
        10.0,
        gt=0,
        le=120,
        description="transport: a WebRTC peer not connected (ICE and DTLS) this long after "
        "its offer was answered is closed and its call ended",
    )
    rtvi_max_text_chars: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="transport: characters one RTVI send-text or append-to-context message may "
        "carry; a longer one is refused with an RTVI error-response and the call goes on",
    )
    rtvi_message_rate: float = Field(
        20.0,
        gt=0,
        le=10_000,
        description="transport: RTVI messages a call's client may send per second (bursts of as "
        "many); past it each message is refused with an RTVI error-response",
    )
    session_rate: str | None = Field(
        "60/60",
        description="new sessions allowed per tenant (per address with auth off), 'N/SECONDS' "
        "(e.g. 30/60), or 'off'; a tenant in the keys file may set its own",
    )
    # --- tenants (voicemesh/transport/api/tenants.py) ---
    tenant_keys: Annotated[tuple[tuple[str, SecretStr], ...], NoDecode] = Field(
        (), description="tenant API keys, " + TENANT_KEYS_FORMAT + " (secrets)"
    )
    keys_file: str | None = Field(
        None, description="JSON file of tenants, their keys (or SHA-256 digests) and limits"
    )
    max_calls: int = Field(
        30,
        ge=0,
        le=100_000,
        description="transport: calls this process carries at once; past it new calls get 503 "
        "with Retry-After (WebSocket: close 1013) and /readyz answers 503 (0: no limit). From "
        "bench_transport_capacity on one core: 40 WebRTC calls held with webrtcvad (0.74 of the "
        "core) and with Silero (0.99: at the edge); 30 Silero calls used 0.79, the headroom the "
        "default agent's smart-turn needs. WebSocket calls cost less (no Opus)",
    )
    tenant_max_calls: int = Field(
        20,
        ge=0,
        le=100_000,
        description="concurrent calls per tenant across every transport (0: no limit); a "
        "tenant in the keys file may set its own",
    )
    call_lease_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="a call's slot in its tenant's count lapses this long after its transport "
        "last renewed it (renewed every third of it), so a crashed transport frees its slots",
    )
    # --- the console's live streams (voicemesh/transport/api/console.py) ---
    console_max_streams: int = Field(
        64,
        ge=1,
        le=10_000,
        description="live console streams (SSE: /api/events, /api/sessions/{id}/events) one "
        "transport serves at once; one more is refused with 429",
    )
    console_refresh_s: float = Field(
        2.0,
        ge=1.0,
        le=60.0,
        description="how often a console stream resends its snapshot (sessions, health marks; "
        "a session's version and TTL): nothing refreshes faster than once a second",
    )
    # --- Daily rooms made for POST /start {createDailyRoom} (voicemesh/transport/carriers/daily.py)
    daily_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("DAILY_API_KEY", "VOICEMESH_DAILY_API_KEY"),
        description="Daily REST API key: POST /start with createDailyRoom makes a room and its "
        "tokens with it; unset: such a /start is refused (422)",
    )
    daily_api_url: str = Field(
        "https://api.daily.co/v1",
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Daily's REST API base URL (operator only: no config or caller names it)",
    )
    # --- Twilio Media Streams (voicemesh/transport/carriers/twilio.py) ---
    twilio_auth_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("TWILIO_AUTH_TOKEN", "VOICEMESH_TWILIO_AUTH_TOKEN"),
        description="the Twilio account's auth token: /ws/twilio checks X-Twilio-Signature with "
        "it; required on /ws/twilio when auth is required",
    )
    twilio_public_url: str | None = Field(
        None,
        pattern=r"^wss?://[^\s/?#]+(/[^\s?#]*)?$",
        description="the base URL Twilio connects to (wss://host[/prefix]) when a proxy in "
        "front changes scheme, host or path: signatures are over the URL Twilio requested",
    )
    twilio_start_timeout_s: float = Field(
        5.0, gt=0, le=60, description="a Twilio stream that sends no `start` by then is closed"
    )
    twilio_max_message_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="a Twilio message larger than this closes the stream (Twilio's are < 1 KiB)",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # Never raise here with the raw value: it is a secret.
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        if isinstance(value, list | tuple):
            return tuple(
                k for k in value if (k.get_secret_value() if isinstance(k, SecretStr) else k)
            )
        return value

    @field_validator("tool_subjects")
    @classmethod
    def _tool_subjects(cls, value: str) -> str:
        return ",".join(parse_tool_subjects(value))

    @field_validator("session_rate", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        limit = parse_rate(value)
        return None if limit is None else f"{limit[0]}/{limit[1]:g}"

    @field_validator("tenant_keys", mode="before")
    @classmethod
    def _split_tenant_keys(cls, value: object) -> object:
        return parse_tenant_keys(value) if isinstance(value, str) else value

    @property
    def session_rate_limit(self) -> tuple[int, float] | None:
        """(sessions, window in seconds), or None for no limit."""
        return parse_rate(self.session_rate)

    @property
    def has_keys(self) -> bool:
        """Whether any API key is configured (admin keys, tenant keys or a keys file)."""
        return bool(self.api_keys or self.tenant_keys or self.keys_file)


def get_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def otel_env(settings: Settings) -> dict[str, str]:
    """The OTEL_* settings as the environment voicemesh.bus.tracing reads."""
    env = {"OTEL_SERVICE_NAME": settings.otel_service_name}
    if settings.otel_exporter_otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = settings.otel_exporter_otlp_endpoint
    if settings.otel_exporter_otlp_traces_endpoint:
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = settings.otel_exporter_otlp_traces_endpoint
    if settings.otel_exporter_otlp_headers is not None:
        env["OTEL_EXPORTER_OTLP_HEADERS"] = settings.otel_exporter_otlp_headers.get_secret_value()
    return env
