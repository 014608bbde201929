"""`serve`: a few lines turn an async function into a NATS tool service.

    import voicemesh.tools

    async def get_weather(city: str) -> dict:
        return {"city": city, "forecast": "sunny", "celsius": 21}

    await voicemesh.tools.serve(nc, "tools.weather", get_weather)

The function gets the call's arguments as keyword arguments and returns any JSON value (the
result); an exception it raises is answered as {"error": ...} with the exception's type and
text, which the LLM reads. `current_call()` inside it gives the call's idempotency key, session
and epoch: a handler with side effects (a booking) should do its work once per key, because a
turn redelivered after an LLM instance died, or a barge-in racing a reply, can repeat a call.
Every instance of a service joins one queue group, so each call goes to one of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from voicemesh.tools.protocol import ToolRequest

log = logging.getLogger(__name__)

ToolFunction = Callable[..., Awaitable[Any]]
DEFAULT_QUEUE = "voicemesh-tools"

_call: contextvars.ContextVar[ToolRequest | None] = contextvars.ContextVar(
    "tool_call", default=None
)


def current_call() -> ToolRequest | None:
    """The request being answered (call id, idempotency key, session, epoch), inside a tool."""
    return _call.get()


async def answer(fn: ToolFunction, data: bytes) -> bytes:
    """The reply to one request's bytes (what `serve` sends back)."""
    try:
        request = ToolRequest.model_validate_json(data)
    except ValidationError as exc:
        return orjson.dumps({"error": f"bad request: {exc.errors()[0]['msg']}"})
    token = _call.set(request)
    try:
        result = await fn(**request.arguments)
        return orjson.dumps({"result": result})
    except Exception as exc:
        log.warning("tool %s failed: %s", request.name, exc)
        return orjson.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]})
    finally:
        _call.reset(token)


async def serve(
    nc: Client, subject: str, fn: ToolFunction, *, queue: str = DEFAULT_QUEUE
) -> Subscription:
    """Answer tool calls on `subject` with `fn` until the subscription is drained or the
    connection closed. Each call runs in its own task: nats-py hands a subscription's messages
    over one at a time, and a slow call must not hold up the next (parallel calls of one turn
    come together)."""
    running: set[asyncio.Task[None]] = set()

    async def reply(msg: Msg) -> None:
        await msg.respond(await answer(fn, msg.data))

    async def on_msg(msg: Msg) -> None:
        if msg.reply:
            task = asyncio.create_task(reply(msg))
            running.add(task)
            task.add_done_callback(running.discard)

    return await nc.subscribe(subject, queue=queue, cb=on_msg)


def tool(subject: str, *, queue: str = DEFAULT_QUEUE) -> Callable[[ToolFunction], ToolFunction]:
    """Decorator form: `@tool("tools.weather")` marks a function; `serve_all(nc)` serves every
    marked one."""

    def mark(fn: ToolFunction) -> ToolFunction:
        REGISTERED.append((subject, queue, fn))
        return fn

    return mark


REGISTERED: list[tuple[str, str, ToolFunction]] = []


async def serve_all(nc: Client) -> list[Subscription]:
    return [await serve(nc, s, fn, queue=q) for s, q, fn in REGISTERED]
