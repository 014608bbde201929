"""A loopback Model Context Protocol server (streamable HTTP, built with the official `mcp`
package's MCPServer) with a few weather tools, for the mcp tool handler's tests.

Tools: get_weather (structured answer), get_time (plain text), broken (raises: an MCP tool
error), slow (answers after `delay_s`), and `forbidden` (never on a test's allow-list). `calls`
records (tool, arguments, idempotency key from the request's _meta) in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from starlette.applications import Starlette

from voicemesh.testing.loopback.base import LoopbackServer

IDEMPOTENCY_META = "io.voicemesh/idempotency_key"


class McpServer(LoopbackServer):
    name = "mcp"
    lifespan = "on"

    def __init__(self, delay_s: float = 2.0) -> None:
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.delay_s = delay_s
        super().__init__()

    async def stop(self) -> None:
        """Without force_exit: the lifespan (the session manager) must get its shutdown, or
        uvicorn logs its cancellation as an error."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    @property
    def endpoint(self) -> str:
        return f"{self.url}/mcp"

    def build(self) -> Starlette:
        server = MCPServer("weather")

        def key(ctx: Context) -> str | None:
            meta = ctx.request_context.meta or {}
            value = meta.get(IDEMPOTENCY_META) if isinstance(meta, dict) else None
            return str(value) if value is not None else None

        @server.tool()
        async def get_weather(city: str, ctx: Context) -> dict[str, Any]:
            """The weather in a city."""
            self.calls.append(("get_weather", {"city": city}, key(ctx)))
            return {"city": city, "forecast": "fog"}

        @server.tool()
        async def get_time(city: str, ctx: Context) -> str:
            """The time in a city."""
            self.calls.append(("get_time", {"city": city}, key(ctx)))
            return f"It is noon in {city}."

        @server.tool()
        async def broken(city: str, ctx: Context) -> str:
            """Always fails."""
            self.calls.append(("broken", {"city": city}, key(ctx)))
            raise ValueError("the station is down")

        @server.tool()
        async def slow(city: str, ctx: Context) -> str:
            """Answers late."""
            self.calls.append(("slow", {"city": city}, key(ctx)))
            await asyncio.sleep(self.delay_s)
            return "late"

        @server.tool()
        async def forbidden(city: str) -> str:
            """Not on any allow-list."""
            self.calls.append(("forbidden", {"city": city}, None))
            return "should never run"

        app = server.streamable_http_app()
        inner = app.build_middleware_stack()

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.requests += 1
            await inner(scope, receive, send)

        app.middleware_stack = counted
        return app
