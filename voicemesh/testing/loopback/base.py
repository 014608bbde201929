"""The shared part of every loopback provider server: an ASGI app served by uvicorn on a free
loopback port inside the caller's event loop, a request counter, and failure injection.

Failure modes (`server.fail(mode, ...)`):
- "error": answer at once with HTTP 500 and a provider-shaped error body (or close a websocket);
- "hang": accept the request and never answer (the client's attempt timeout must fire);
- "429" / "500" / "401": that HTTP status with the provider's error body (429 adds Retry-After);
- "die": stream `after` chunks normally, then cut the connection mid-stream.
`times` limits how many requests fail before the server heals by itself (None: until `heal()`).

Also home of what the servers share to fail: `hang` and `wait_for_disconnect` (never answer), and
`StreamCut` / `cut_on_purpose` (end a body early), which uvicorn is kept from logging as errors.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass
from typing import Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request

from voicemesh.servers import free_port

FailureMode = Literal["ok", "error", "hang", "429", "500", "401", "die"]


@dataclass
class Failure:
    mode: FailureMode = "ok"
    after: int = 0
    times: int | None = None


class LoopbackServer:
    """Subclasses build `self.app` (Starlette) and consult `self.take_failure()` per request."""

    name = "loopback"
    #: "on" for an app that starts work in its lifespan (the MCP server's session manager)
    lifespan: Literal["on", "off"] = "off"

    def __init__(self) -> None:
        self.failure = Failure()
        self.requests = 0
        self.failed = 0
        self.port = 0
        self.app = self.build()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def build(self) -> Starlette:
        raise NotImplementedError

    # --- failure injection -------------------------------------------------------------------

    def fail(self, mode: FailureMode, *, after: int = 0, times: int | None = None) -> None:
        self.failure = Failure(mode, after, times)

    def heal(self) -> None:
        self.failure = Failure()

    def take_failure(self) -> Failure:
        """Count a request and return the failure to apply to it (mode "ok" for none)."""
        self.requests += 1
        f = self.failure
        if f.mode == "ok":
            return f
        if f.times is not None:
            if f.times <= 0:
                self.heal()
                return self.failure
            f.times -= 1
        self.failed += 1
        return Failure(f.mode, f.after, None)

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> LoopbackServer:
        self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan=self.lifespan,
            ws="websockets-sansio",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.ensure_future(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # hung requests must not hold the shutdown
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def __aenter__(self) -> LoopbackServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- "hang": never answer --------------------------------------------------------------------


async def hang() -> None:
    """Never answer (until the server stops or the client goes away)."""
    await asyncio.Event().wait()


async def wait_for_disconnect(request: Request) -> None:
    """Never answer: wait until the client gives up (or the server stops). Read after the body,
    the next ASGI message is the disconnect, so a hung request ends with its client rather than
    with a cancellation at server shutdown."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- "die": a body cut on purpose, which uvicorn must not log as a server error ----------------


class StreamCut(Exception):
    """Raised inside a streaming body: the server closes the connection without ending it."""


# Set by `cut_on_purpose`, in the request task uvicorn logs from.
_cut_on_purpose = contextvars.ContextVar("loopback_cut_on_purpose", default=False)


def cut_on_purpose() -> None:
    """Mark the current response as left incomplete on purpose (an ASGI app returning before its
    body ends), so uvicorn's "returned without completing response" for it is not logged."""
    _cut_on_purpose.set(True)


def _raised_stream_cut(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, StreamCut):
            return True
        if isinstance(exc, BaseExceptionGroup) and any(
            isinstance(e, StreamCut) for e in exc.exceptions
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class _QuietCuts(logging.Filter):
    """Drops what uvicorn logs for an injected cut: "returned without completing response" after
    `cut_on_purpose()`, and "Exception in ASGI application" for a StreamCut."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _cut_on_purpose.get() and "without completing response" in record.getMessage():
            return False
        return not _raised_stream_cut(record)


logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
