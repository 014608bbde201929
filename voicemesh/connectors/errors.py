"""Connector failures, classified: each has a code, a kind, and whether a retry can help.

Every failure a connector raises, whatever its SDK, is turned into a ConnectorError here, so the
fallback chain decides on one vocabulary: what kind of failure, whether retrying the same provider
later can help, and which HTTP status (if any) the provider answered.

Also home of the helpers every connector shares to build one: Retry-After parsing, OpenAI/Anthropic
style error bodies, and the mapping of HTTP-client transport failures. No SDK is imported here:
SDK and httpx exceptions are recognised by their class names.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import re
import time
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Any

from voicemesh.errors import VoicemeshError


class FailureKind(StrEnum):
    TIMEOUT = "timeout"  # no first result within attempt_timeout_ms
    RATE_LIMIT = "rate_limit"  # HTTP 429
    SERVER = "server"  # HTTP 5xx
    PERMANENT = "permanent"  # 400/401/403/404/422, bad config, missing secret: retrying won't help
    STREAM = "stream"  # the stream died after its first result
    NETWORK = "network"  # connection refused/reset, DNS, TLS
    ERROR = "error"  # anything else the connector raised


CODES: dict[FailureKind, str] = {
    FailureKind.TIMEOUT: "CONNECTOR_TIMEOUT_3001",
    FailureKind.RATE_LIMIT: "CONNECTOR_RATE_LIMIT_3002",
    FailureKind.SERVER: "CONNECTOR_SERVER_3003",
    FailureKind.PERMANENT: "CONNECTOR_PERMANENT_3004",
    FailureKind.STREAM: "CONNECTOR_STREAM_3005",
    FailureKind.NETWORK: "CONNECTOR_NETWORK_3006",
    FailureKind.ERROR: "CONNECTOR_ERROR_3000",
}


#: Longest provider detail kept in a ConnectorError's message (which goes to logs only).
DETAIL_MAX = 300
# Credentials as they appear in SDK error texts, echoed headers and URLs: the value is cut.
_CREDENTIAL_TEXT = re.compile(
    r"(?i)((?:authorization|x-api-key|xi-api-key|api-key|ocp-apim-subscription-key|"
    r"proxy-authorization|cookie)['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+|token\s+|basic\s+)?"
    r"[^\s'\",;}]+"
    r"|\b(bearer|token|basic)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|([?&](?:api_?key|key|token|access_token|secret|password|sig|signature)=)[^&\s'\"]+"
    r"|\b(sk-(?:ant-)?)[A-Za-z0-9_-]{8,}",
)


def _cut(m: re.Match[str]) -> str:
    return next((g for g in m.groups() if g), "") + "***"


def scrub(text: str, secrets: Iterable[str] = (), limit: int = DETAIL_MAX) -> str:
    """A failure's detail fit for a log line: the given secret values and anything shaped like a
    credential (Authorization headers, key= parameters, sk-... keys) replaced with ***, and cut
    to `limit` characters."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _CREDENTIAL_TEXT.sub(_cut, text)
    return text if len(text) <= limit else text[:limit] + "..."


class ConnectorError(VoicemeshError):
    """A classified connector failure.

    Two texts: `str()` is the detail for the logs (the provider's own words, scrubbed and cut to
    DETAIL_MAX), and `public` is all a caller ever sees: the kind and the HTTP status. A
    provider's body can carry anything its host chose to answer (an internal service's page, an
    echo of the request), so it never reaches an error event, the stored context or the bus."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(scrub(message))
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def code(self) -> str:
        return CODES[self.kind]

    @property
    def retryable(self) -> bool:
        """Whether the same provider may succeed later without a config change."""
        return self.kind is not FailureKind.PERMANENT

    @property
    def public(self) -> str:
        """The short generic text a caller may see, e.g. "permanent, http 401"."""
        return f"{self.kind}, http {self.status}" if self.status else str(self.kind)

    def scrubbed(self, secrets: Iterable[str]) -> ConnectorError:
        """The same failure with these secret values cut from its detail."""
        detail = scrub(self.args[0], secrets)
        if detail == self.args[0]:
            return self
        err = ConnectorError(
            self.kind, detail, status=self.status, retry_after_s=self.retry_after_s
        )
        err.__cause__ = self.__cause__
        return err

    def to_dict(self) -> dict[str, object]:
        """What the health board publishes (NATS, Valkey): the public text, not the detail."""
        return {
            "code": self.code,
            "kind": str(self.kind),
            "status": self.status,
            "retryable": self.retryable,
            "message": self.public,
        }

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status else ""
        return f"{self.kind}{status}: {self.args[0]}"


def from_status(status: int, message: str, *, retry_after_s: float | None = None) -> ConnectorError:
    if status == 429:
        kind = FailureKind.RATE_LIMIT
    elif status >= 500:
        kind = FailureKind.SERVER
    elif status == 408:
        kind = FailureKind.TIMEOUT
    else:
        kind = FailureKind.PERMANENT
    return ConnectorError(kind, message, status=status, retry_after_s=retry_after_s)


def _status_of(exc: BaseException) -> int | None:
    """An HTTP error status carried by an SDK exception; a 2xx (an error event inside a 200
    stream, as Anthropic's SDK reports it) is not one."""
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 400 <= value < 600:
            return value
    value = getattr(getattr(exc, "response", None), "status_code", None)
    return value if isinstance(value, int) and 400 <= value < 600 else None


def _header(headers: Any, name: str) -> Any:
    """A header's value from any mapping (httpx.Headers, a plain dict), name case-insensitive."""
    if not headers:
        return None
    return next((v for k, v in dict(headers).items() if k.lower() == name), None)


def retry_after_s(headers: Any, *, delta_seconds_only: bool = False) -> float | None:
    """Seconds the provider asks to wait, from response headers: retry-after-ms, else retry-after
    (seconds or HTTP date), never negative; None when absent or unreadable.

    `delta_seconds_only` reads only retry-after in its seconds form, as given: how the HTTP TTS
    connectors and `classify` have always read it (they ignore retry-after-ms and HTTP dates)."""
    try:
        if delta_seconds_only:
            value = _header(headers, "retry-after")
            return float(value) if value is not None else None
        if ms := _header(headers, "retry-after-ms"):
            return max(0.0, float(ms) / 1000)
        value = _header(headers, "retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def error_detail(
    body: object, kind_keys: tuple[str, ...] = ("type",)
) -> tuple[str | None, str | None]:
    """(kind, message) of an error body shaped {"error": {...}} (OpenAI, Anthropic) or of that
    inner dict itself; the kind is the first of `kind_keys` the error sets."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            kind = next((inner.get(k) for k in kind_keys if inner.get(k)), None)
            message = inner.get("message")
            return (str(kind) if kind else None, str(message) if message else None)
    return None, None


def transport_kind(exc: BaseException) -> FailureKind:
    """Kind of an HTTP client error (httpx or httpx2 alike, told apart by class name)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "TimeoutException" in names:
        return FailureKind.TIMEOUT
    if names & {"TransportError", "RequestError", "ConnectionError"}:
        return FailureKind.NETWORK
    return FailureKind.ERROR


def transport_error(exc: BaseException) -> ConnectorError | None:
    """A ConnectorError for an httpx (or httpx2, openai's fork) transport failure: connection
    refused/reset, or a body cut mid-stream (RemoteProtocolError). None for anything else."""
    if "TransportError" not in {c.__name__ for c in type(exc).__mro__}:
        return None
    return ConnectorError(transport_kind(exc), f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def map_transport_errors() -> Iterator[None]:
    """Raise a transport failure inside the block as its ConnectorError (`transport_error`); any
    other exception leaves as it is."""
    try:
        yield
    except Exception as exc:
        if (err := transport_error(exc)) is not None:
            raise err from exc
        raise


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return retry_after_s(headers, delta_seconds_only=True)


def connector_cause(exc: BaseException) -> ConnectorError | None:
    """A ConnectorError that `exc` is, or was raised from (an SDK wraps what its HTTP client's
    hooks raise)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ConnectorError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__  # `raise ... from err`, as the SDKs wrap; not any handled context
    return None


def classify(exc: BaseException, *, started: bool = False) -> ConnectorError:
    """Map any exception to a ConnectorError; `started` marks a failure after the first result."""
    lineage = " ".join(c.__name__.lower() for c in type(exc).__mro__)  # SDKs name their classes
    if (cause := connector_cause(exc)) is not None:
        exc = cause  # raised inside an SDK (an egress hook) and wrapped by it
    if isinstance(exc, ConnectorError):
        err = exc
    elif isinstance(exc, TimeoutError | asyncio.TimeoutError) or "timeout" in lineage:
        err = ConnectorError(FailureKind.TIMEOUT, str(exc) or "timed out")
    elif "transporterror" in lineage:  # httpx/httpx2: refused, reset, a body cut mid-stream
        err = ConnectorError(FailureKind.NETWORK, f"{type(exc).__name__}: {exc}")
    elif (status := _status_of(exc)) is not None:
        err = from_status(status, str(exc) or type(exc).__name__, retry_after_s=_retry_after(exc))
    elif isinstance(exc, LookupError | ValueError | TypeError | ImportError):
        # a missing ${ENV} secret, invalid options, a missing SDK: a config problem
        err = ConnectorError(FailureKind.PERMANENT, f"{type(exc).__name__}: {exc}")
    elif isinstance(exc, ConnectionError | OSError) or "connect" in lineage:
        err = ConnectorError(FailureKind.NETWORK, f"{type(exc).__name__}: {exc}")
    else:
        err = ConnectorError(FailureKind.ERROR, f"{type(exc).__name__}: {exc}")
    if started and err.kind is not FailureKind.PERMANENT:
        return ConnectorError(
            FailureKind.STREAM,
            f"died after its first result: {err}",
            status=err.status,
            retry_after_s=err.retry_after_s,
        )
    return err
