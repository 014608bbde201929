"""This transport process's own limit on calls at once (VOICEMESH_MAX_CALLS).

A transport near its capacity degrades every call it carries at once (Opus, resampling, VAD and
pacing share its event loop), so past the limit it refuses new calls cleanly and keeps the ones
it has: HTTP 503 with Retry-After, or an `error` event and WebSocket close 1013 ("try again
later"). `/readyz` answers 503 meanwhile, so a load balancer sends new calls elsewhere; calls
already up never notice. The tenants' limits (tenants.py) count across transports in Valkey;
this one is local and costs no round trip, so it is checked first.

A WebRTC offer is refused by `RefuseOffersWhenFull`, below the routes: the route parses the offer's
SDP before it asks for a call (a 100 000-character offer takes ~4 ms of this process's loop to
parse), so a flood of offers at a full transport would take that time from the calls it carries
(benchmarks/bench_overload.py).
"""

from __future__ import annotations

import re

import orjson
from fastapi.requests import HTTPConnection
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

    def check(self) -> None:
        """AtCapacity (counted as a refusal) if a new call would be past the limit."""
        if not self.ready:
            self.refused += 1
            raise AtCapacity(self.limit)

    def take(self) -> None:
        self.check()
        self.active += 1

    def give(self) -> None:
        self.active = max(0, self.active - 1)


async def on_at_capacity(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    assert isinstance(exc, AtCapacity)
    return await retry_later(
        conn, exc.detail, exc.retry_after_s, status=503, ws_code=WS_AT_CAPACITY
    )


#: the routes that start a WebRTC call: pipecat's SmallWebRTC offer, and the offer for a session
#: that `POST /start` made
OFFER_PATH = re.compile(r"^(?:/sessions/[^/]+)?/api/offer$")


class RefuseOffersWhenFull:
    """ASGI middleware: at capacity, a WebRTC offer for a new call gets its 503 here, before the
    route validates the body and parses its SDP. An offer that renegotiates a live call (it names
    its `pc_id`) goes on to the route: the calls a full transport carries are the ones that
    renegotiate. Sits inside BodyLimit, so the body it reads is already capped."""

    def __init__(self, app: ASGIApp, capacity: CallCapacity) -> None:
        self.app = app
        self.capacity = capacity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.capacity.ready
            or scope["method"] != "POST"
            or not OFFER_PATH.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left (or BodyLimit refused the body and answered it)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not renegotiates(body):
            try:
                self.capacity.check()
            except AtCapacity as exc:
                headers = {"Retry-After": str(exc.retry_after_s)}
                await JSONResponse({"detail": exc.detail}, 503, headers)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def renegotiates(body: bytes) -> bool:
    """The offer names a peer connection (or is not an offer at all: the route says what is
    wrong with it)."""
    try:
        offer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(offer, dict) or offer.get("pc_id") is not None
