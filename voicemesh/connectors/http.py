"""What the connectors that drive an HTTP client share (kept out of `errors`, which imports no
HTTP client or SDK): the timeout, and the guard every provider client carries.

The guard exists because the hosts a config may name are checked at push time, but an HTTP client
would still follow a redirect wherever the provider (or whoever answers at that host) sends it,
with the provider's key in a custom header (x-api-key, xi-api-key, Ocp-Apim-Subscription-Key are
not stripped on a cross-origin redirect the way Authorization is) and the request body (a 307
replays it). So every client is built with follow_redirects=False and two event hooks:

- before each request: it must go to the origin (scheme, host, port) the connector was built
  for; a request anywhere else is refused before it is sent;
- on each response: a redirect is a failure (permanent: the config points at the wrong place),
  and a TTS answer that is not audio (an internal service's HTML page served with a 200) is
  refused rather than played to the caller.

The hooks are duck-typed, so they fit both httpx and httpx2 (openai's and anthropic's fork).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from voicemesh.connectors.errors import ConnectorError, FailureKind

#: Timeout of the httpx clients the connectors build (30 s per operation, 5 s to connect).
TIMEOUT = httpx.Timeout(30.0, connect=5.0)

_DEFAULT_PORT = {"https": 443, "wss": 443, "http": 80, "ws": 80}
#: Content types a TTS provider's audio may carry (raw PCM is labelled differently by each).
AUDIO_TYPES = ("audio/", "application/octet-stream", "binary/octet-stream")

Origin = tuple[str, str, int]


def origin(url: object) -> Origin:
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORT.get(scheme, 0)


def is_audio(content_type: str | None) -> bool:
    value = (content_type or "").split(";", 1)[0].strip().lower()
    return value.startswith(AUDIO_TYPES)


def require_audio(provider: str, content_type: str | None) -> None:
    """Refuse a 200 whose body is not audio: played as PCM it would read another service's
    page out to the caller."""
    if not is_audio(content_type):
        label = (content_type or "none").split(";", 1)[0].strip()[:60]
        raise ConnectorError(
            FailureKind.PERMANENT, f"{provider}: the answer is not audio (content type {label})"
        )


class EgressGuard:
    """The event hooks of one connector's HTTP client (see the module docstring)."""

    def __init__(self, provider: str, base_url: str | None = None, *, audio_path: str = ""):
        self.provider = provider
        self.origin: Origin | None = origin(base_url) if base_url else None
        self.audio_path = audio_path

    def pin(self, base_url: object) -> None:
        """The origin every request must go to (for an SDK, its resolved base URL)."""
        self.origin = origin(base_url)

    async def on_request(self, request: Any) -> None:
        if self.origin is None or origin(request.url) != self.origin:
            raise ConnectorError(
                FailureKind.PERMANENT,
                f"{self.provider}: a request to another origin than the configured one was refused",
            )

    async def on_response(self, response: Any) -> None:
        status = int(response.status_code)
        if 300 <= status < 400:
            raise ConnectorError(
                FailureKind.PERMANENT,
                f"{self.provider}: the provider answered a redirect; redirects are not followed",
                status=status,
            )
        # every POST of a TTS connector is a synthesis: its answer must be audio whatever the
        # path says (a path a config could bend elsewhere on the provider's API must not turn
        # a JSON answer into "audio" the caller hears)
        if (
            self.audio_path
            and 200 <= status < 300
            and (
                response.request.method == "POST"
                or self.audio_path in str(response.request.url.path)
            )
        ):
            require_audio(self.provider, response.headers.get("content-type"))

    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self.on_request], "response": [self.on_response]}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client that never follows a redirect, with these hooks."""
        return httpx.AsyncClient(follow_redirects=False, event_hooks=self.hooks(), **kwargs)


def sdk_http_client(sdk: Any, guard: EgressGuard, **kwargs: Any) -> Any:
    """An httpx2 client for the openai or anthropic SDK (`sdk` is the module): the SDK's own
    defaults (limits, timeout), no redirects, and the guard's hooks."""
    return sdk.DefaultAsyncHttpxClient(follow_redirects=False, event_hooks=guard.hooks(), **kwargs)
