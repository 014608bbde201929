"""Size limits on what reaches the transport's HTTP app, applied below every route so no route
can forget one: a request body cap (VOICEMESH_MAX_BODY_BYTES) as pure ASGI middleware, and the
uvicorn settings the transport is served with, WebSocket message cap included
(VOICEMESH_WS_MAX_BYTES).

Why ASGI middleware and not a check in the routes: FastAPI reads and parses the whole body before
a route runs, so a route-level check comes after the memory is spent (a 20 MB config was once
stored whole). Here a body is refused on its Content-Length before any of it is read, and a body
without one (chunked) is counted as it streams in and refused at the first chunk past the limit;
nothing past it is ever handed to the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import uvicorn

    from voicemesh.config.settings import Settings


class BodyLimit:
    """Refuses an HTTP request whose body is over `max_bytes` with 413 and a JSON `detail`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1  # h11 and httptools refuse these before we see them
                if declared > self.max_bytes:
                    await self._refuse(send, f"{declared} bytes")
                    return
                break
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app with its body counted as it arrives: the first chunk past the limit is not
        passed on; the 413 is sent and the app sees the client gone (its own answer, if it
        tries one, is dropped)."""
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, f"more than {self.max_bytes} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send, size: str) -> None:
        body = orjson.dumps(
            {
                "detail": f"request body of {size} is over the limit of {self.max_bytes} bytes "
                "(VOICEMESH_MAX_BODY_BYTES)"
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),  # the rest of the body is not read
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn Config the transport is served with, by `voicemesh serve` and the tests alike,
    so both run under the same limits.

    `ws_max_size` is VOICEMESH_WS_MAX_BYTES (uvicorn's own default is 16 MiB): the WebSocket layer
    reads a frame's length before its payload and closes with 1009 ("message too big") when it is
    over, on every WebSocket route, before any app code runs. `log_config=None`: uvicorn's
    loggers propagate to the root handler that setup_logging installs, so its tracebacks are
    formatted (and scrubbed of secrets) like every other line instead of by a handler of its
    own."""
    import uvicorn

    options: dict[str, Any] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "ws": "websockets-sansio",
        "ws_max_size": settings.ws_max_bytes,
        "log_config": None,
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
