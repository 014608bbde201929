"""Structured logging: JSON lines (or plain text) carrying the session, turn and role of work.

Context comes from contextvars: a handler sets `log_context(session=..., turn=...)` once and every
log line below it, in any module, carries those fields.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
            "msg": record.getMessage(),
            **_fields(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = {**_fields(), **(getattr(record, "fields", None) or {})}
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return line


_QUERY_KEY = re.compile(r"(api_key=)[^&\s\"']+", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\w://[^:/@\s]*:)[^@\s/]+@")


def scrub(text: str) -> str:
    """Mask an `api_key=` query value and a password inside a URL."""
    if "api_key=" in text.lower():
        text = _QUERY_KEY.sub(r"\1***", text)
    if "://" in text and "@" in text:
        text = _URL_PASSWORD.sub(r"\1***@", text)
    return text


class RedactSecrets(logging.Filter):
    """Masks secrets a library may put in a line: uvicorn logs a WebSocket's path with its query
    string (browsers send `?api_key=` there), a driver may log its URL with the password."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = scrub(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(scrub(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: scrub(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def redact_logger(name: str) -> None:
    """Put RedactSecrets on a logger (records logged on it directly, whatever its handlers)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())


def setup_logging(level: str = "INFO", fmt: str = "text", *, role: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
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
