"""Structured logging: JSON lines (or plain text) carrying the session, turn and role of work.

Context comes from contextvars: a handler sets `log_context(session=..., turn=...)` once and every
log line below it, in any module, carries those fields.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import orjson

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "vm_log", default=None
)


def _fields() -> dict[str, Any]:
    return _context.get() or {}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    token = _context.set({**_fields(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current task's context (tasks copy it when they are created)."""
    _context.set({**_fields(), **fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
            **_fields(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = scrub(self.formatStack(record.stack_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = {**_fields(), **(getattr(record, "fields", None) or {})}
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return scrub(line)  # the message, the traceback and the fields alike


# --- secret scrubbing ------------------------------------------------------------------------
#
# Every line our handler writes passes through `scrub`, exception text included: a traceback
# quotes the exception's message, and a library's message may quote a header, a URL with its
# password, or the value of a variable it was handed. Two nets: patterns for where credentials
# sit by shape (an Authorization header, `api_key=`, a URL's userinfo), and the values
# themselves (those of the environment variables credential fields may name, of variables named
# like secrets, of the API keys and the NATS/Valkey passwords in the settings), wherever they
# appear.

#: a value shorter than this is not scrubbed by value: masking every "admin" or "1234" would make
#: logs unreadable, and a secret that short is guessed faster than it is read from a log
MIN_SECRET_LEN = 6
MASK = "***"

_AUTH_HEADER = re.compile(
    r"""(\bauthorization["']?\s*[:=]\s*["']?)(?:(bearer|token|basic|key)\s+)?[^\s"',;}\]]+""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(bearer)\s+[^\s\"',;}\]]+", re.IGNORECASE)
# key=value, key: value, "key": "value": query strings, headers, dict and JSON reprs. `token` only
# as a whole word, so max_tokens or prompt_tokens stay readable.
_NAMED = re.compile(
    r"""(\b[\w-]*?(?:api[_-]?key|apim-subscription-key|subscription[_-]?key|access[_-]?token"""
    r"""|auth[_-]?token|refresh[_-]?token|client[_-]?secret|password|passwd|secret|\btoken|[_-]token)"""
    r"""["']?\s*[:=]\s*["']?)(?!\*\*\*)[^\s"'&,;}\]]+""",
    re.IGNORECASE,
)
# OpenAI's and Anthropic's key shapes, in case one arrives from outside the environment
_KEY_SHAPE = re.compile(r"\bsk-[A-Za-z0-9_-]{12,}")
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^/?#@\s]+)@", re.IGNORECASE)

_secret_values: re.Pattern[str] | None = None


def _userinfo(m: re.Match[str]) -> str:
    user, sep, _ = m.group(2).partition(":")
    # nats://TOKEN@host carries the token where a user name would be
    return f"{m.group(1)}{user}:{MASK}@" if sep else f"{m.group(1)}{MASK}@"


def _auth(m: re.Match[str]) -> str:
    return f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{MASK}"


def scrub(text: str) -> str:
    """The text with credentials masked: secret values known to this process, Authorization
    and API-key headers, `api_key=` / `password=`-style pairs, and a URL's userinfo."""
    if _secret_values is not None:
        text = _secret_values.sub(MASK, text)
    text = _AUTH_HEADER.sub(_auth, text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    text = _NAMED.sub(rf"\1{MASK}", text)
    text = _KEY_SHAPE.sub(MASK, text)
    if "://" in text:
        text = _USERINFO.sub(_userinfo, text)
    return text


_known: set[str] = set()


def set_secret_values(values: Iterable[str]) -> None:
    """The values `scrub` masks wherever they appear (shorter than MIN_SECRET_LEN: ignored)."""
    global _secret_values
    _known.clear()
    _known.update(v for v in values if len(v) >= MIN_SECRET_LEN)
    kept = sorted(_known, key=len, reverse=True)
    _secret_values = re.compile("|".join(map(re.escape, kept))) if kept else None


def add_secret_values(values: Iterable[str]) -> None:
    """More values to mask, learnt after logging was set up (the raw keys of a keys file, read
    when the transport starts)."""
    set_secret_values([*_known, *values])


def secret_values(settings: Any = None, env: Mapping[str, str] | None = None) -> set[str]:
    """What this process must never log: the values of the environment variables a config's
    credential fields may reference (each connector's conventional names and the operator's
    VOICEMESH_SECRET_ENV), of every variable named like a secret (…_API_KEY, …_TOKEN,
    …_PASSWORD), and, from `settings`, the API keys and the NATS and Valkey credentials."""
    from voicemesh.config.connectors import CONNECTOR_OPTIONS
    from voicemesh.config.secrets import allowed_env, credential_fields, is_secret_key

    env = os.environ if env is None else env
    names = {name for name in env if is_secret_key(name)}
    for stage, connectors in CONNECTOR_OPTIONS.items():
        for connector, model in connectors.items():
            for spec in credential_fields(model).values():
                if spec.clear:
                    continue  # a room URL may be written in clear: it is not a secret
                try:
                    names.update(allowed_env(stage, connector, spec))
                except ValueError:  # a malformed VOICEMESH_SECRET_ENV: the defaults still count
                    names.update(spec.env)
    values = {env[name] for name in names if env.get(name)}
    if settings is not None:
        for key in getattr(settings, "api_keys", ()):
            values.add(key.get_secret_value())
        for _tenant, key in getattr(settings, "tenant_keys", ()):
            values.add(key.get_secret_value())
        token = getattr(settings, "twilio_auth_token", None)
        if token is not None:
            values.add(token.get_secret_value())
        for field in ("nats_password", "nats_token", "valkey_password"):
            secret = getattr(settings, field, None)
            if secret is not None:
                values.add(secret.get_secret_value())
        for field in ("nats_url", "valkey_url"):
            url = getattr(settings, field, None) or ""
            try:
                parts = urlsplit(url)
                if parts.password:
                    values.add(parts.password)
                elif parts.username:
                    values.add(parts.username)  # nats://TOKEN@host
            except ValueError:
                pass
    return values


class RedactSecrets(logging.Filter):
    """Scrubs a record's message as it is logged (on a logger, whatever its handlers: uvicorn
    logs a WebSocket's path with its query string, where browsers send `?api_key=`). With
    arguments, only they are scrubbed: the format string is code's, and masking inside it could
    break its %-formatting, and a formatter may read the arguments themselves (uvicorn's access
    formatter does). Exception text is scrubbed by our formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(scrub(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, Mapping) and record.args:
            record.args = {k: scrub(v) if isinstance(v, str) else v for k, v in record.args.items()}
        elif isinstance(record.msg, str):
            record.msg = scrub(record.msg)
        return True


def redact_logger(name: str) -> None:
    """Put RedactSecrets on a logger (records logged on it directly, whatever its handlers)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def setup_logging(
    level: str = "INFO", fmt: str = "text", *, role: str | None = None, settings: Any = None
) -> None:
    """One handler on the root logger, on stderr, whose every line is scrubbed of secrets: those
    `secret_values` finds now (in the environment and in `settings`) and those shaped like one."""
    set_secret_values(secret_values(settings))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in UVICORN_LOGGERS:  # a uvicorn configured with its own handlers writes past ours
        own = logging.getLogger(name)
        own.handlers.clear()
        own.propagate = True
    for noisy in ("nats", "uvicorn.access", "httpx", "faster_whisper", "piper", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    if role:
        bind(role=role)
    route_loguru()


def route_loguru() -> None:
    """pipecat logs through loguru, straight to stderr, banner included: send its warnings and
    errors through our handlers (format, secret redaction) instead, and drop its chatter."""
    try:
        from loguru import logger
    except ImportError:
        return

    def forward(message: Any) -> None:
        record = message.record
        logging.getLogger(record["name"] or "pipecat").log(
            record["level"].no,
            record["message"],
            exc_info=tuple(exc) if (exc := record["exception"]) else None,
        )

    logger.remove()
    logger.add(forward, level="WARNING", format="{message}")
