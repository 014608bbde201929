"""This transport process's own limit on calls at once (VOICEMESH_MAX_CALLS).

A transport near its capacity degrades every call it carries at once (Opus, resampling, VAD and
pacing share its event loop), so past the limit it refuses new calls cleanly and keeps the ones
it has: HTTP 503 with Retry-After, or an `error` event and WebSocket close 1013 ("try again
later"). `/readyz` answers 503 meanwhile, so a load balancer sends new calls elsewhere; calls
already up never notice. The tenants' limits (tenants.py) count across transports in Valkey;
this one is local and costs no round trip, so it is checked first.
"""

from __future__ import annotations

from fastapi.requests import HTTPConnection
from fastapi.responses import JSONResponse

from voicemesh.errors import VoicemeshError
from voicemesh.transport.api.security import retry_later

#: WebSocket close code 1013, "Try Again Later" (RFC 6455 registry)
WS_AT_CAPACITY = 1013
#: what a refused caller is told to wait: calls last minutes, but one ends every few seconds on
#: a full transport, and a load balancer will have sent the retry elsewhere anyway
RETRY_AFTER_S = 5


class AtCapacity(VoicemeshError):
    """This transport carries VOICEMESH_MAX_CALLS calls: 503 with Retry-After, or close 1013."""

    def __init__(self, limit: int):
        super().__init__(
            f"this transport is at capacity ({limit} calls at once); retry in {RETRY_AFTER_S} s"
        )
        self.detail = str(self)
        self.retry_after_s = RETRY_AFTER_S


class CallCapacity:
    """Calls this process carries now, against its limit (0: none). Counted in the event loop
    only, so no lock: `take` and `give` never await."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.refused = 0

    @property
    def ready(self) -> bool:
        return not self.limit or self.active < self.limit

    def take(self) -> None:
        if not self.ready:
            self.refused += 1
            raise AtCapacity(self.limit)
        self.active += 1

    def give(self) -> None:
        self.active = max(0, self.active - 1)


async def on_at_capacity(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    assert isinstance(exc, AtCapacity)
    return await retry_later(
        conn, exc.detail, exc.retry_after_s, status=503, ws_code=WS_AT_CAPACITY
    )
