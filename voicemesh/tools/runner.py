"""Running one tool call: arguments parsed and checked against the tool's schema, the handler
called under a timeout, and whatever happens turned into an `Outcome` the LLM can read. Nothing
here raises for a bad call: an unknown tool, arguments that are not JSON or do not match, a
handler that fails, answers non-JSON or runs out of time each become an error result, and the
turn goes on.

Handlers:
- nats: a request to the tool's subject (protocol.py); any process in any language answers it,
  scaled as a queue group;
- http: a request to the tool's URL through a client that follows no redirect and talks to that
  origin only (the same guard as the provider connectors), credentials resolved from this
  process's environment at call time.

The subject and URL were checked when the config was pushed and when this stage loaded it; they
are checked again here, against this process's own settings, before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import httpx
import orjson
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from voicemesh.config.hosts import current_policy, url_problem
from voicemesh.config.settings import Settings
from voicemesh.config.tools import (
    HTTP_TOOL,
    TOOL_STAGE,
    HttpHandler,
    NatsHandler,
    ToolSpec,
    parse_tool_subjects,
    resolve_header,
    subject_problem,
)
from voicemesh.connectors.base import ToolCall
from voicemesh.connectors.http import TIMEOUT, EgressGuard
from voicemesh.errors import VoicemeshError
from voicemesh.tools import metrics
from voicemesh.tools.protocol import idempotency_key

log = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout", "cancelled"]
TRUNCATED = "…[truncated: {kept} of {total} characters]"
#: the most bytes an http tool's answer may have before it is refused unread
HTTP_MAX_BYTES = 1 << 20
#: http clients kept, one per origin
CLIENTS_MAX = 32


class ToolFailed(VoicemeshError, RuntimeError):
    """A handler failed; `public` is the short reason the caller's event carries, the message
    (the detail) goes to the LLM and the log."""

    def __init__(self, public: str, detail: str | None = None):
        self.public = public
        super().__init__(detail or public)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    #: what the LLM gets: the result's JSON text (cut to the cap), or {"error": ...}
    content: str
    #: short public reason of a failure (for the caller's event and the metrics)
    error: str | None
    ms: float


def cap(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a marker that says so."""
    if len(text) <= limit:
        return text
    return text[:limit] + TRUNCATED.format(kept=limit, total=len(text))


@lru_cache(maxsize=256)
def _validator(schema_json: bytes) -> Any:
    import jsonschema_rs

    return jsonschema_rs.validator_for(orjson.loads(schema_json))


def check_arguments(spec: ToolSpec, text: str) -> dict[str, Any]:
    """The call's arguments, parsed and valid against the tool's schema; ToolFailed if not."""
    try:
        args = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        raise ToolFailed("bad arguments", "the arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise ToolFailed("bad arguments", "the arguments must be a JSON object")
    validator = _validator(orjson.dumps(spec.parameters, option=orjson.OPT_SORT_KEYS))
    errors = [e for _, e in zip(range(3), validator.iter_errors(args), strict=False)]
    if errors:
        detail = "; ".join(
            f"{'/'.join(map(str, e.instance_path)) or '<root>'}: {e.message}"[:200] for e in errors
        )
        raise ToolFailed("bad arguments", f"the arguments do not match the schema: {detail}")
    return args


class ToolRunner:
    """Runs tool calls for one stage process (one per LLM stage: its http clients are shared)."""

    def __init__(self, nc: Client, settings: Settings):
        self.nc, self.settings = nc, settings
        self.prefixes = parse_tool_subjects(settings.tool_subjects)
        self._clients: OrderedDict[tuple[str, str, int], httpx.AsyncClient] = OrderedDict()
        self._closing: set[asyncio.Future[None]] = set()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), OrderedDict()
        for client in clients:
            await client.aclose()

    async def run(
        self, tools: list[ToolSpec], call: ToolCall, *, session: str, epoch: int
    ) -> Outcome:
        """One call, start to result, never raising (but for a cancellation: a barge-in)."""
        t0 = time.perf_counter()
        spec = next((t for t in tools if t.name == call.name), None)
        kind = spec.handler.type if spec is not None else "none"
        status: Status = "ok"
        public: str | None = None
        try:
            if spec is None:
                raise ToolFailed("unknown tool", f"there is no tool named {call.name[:64]!r}")
            args = check_arguments(spec, call.arguments)
            limit_s = min(spec.timeout_ms, self.settings.tool_timeout_max_ms) / 1000
            key = idempotency_key(session, epoch, call.id)
            try:
                async with asyncio.timeout(limit_s):
                    result = await self._handle(spec, args, call, key, session, epoch, limit_s)
            except TimeoutError:
                status, public = "timeout", "timeout"
                content = _error(f"the tool did not answer within {limit_s * 1000:.0f} ms")
            else:
                content = cap(orjson.dumps(result).decode(), self.settings.tool_result_max_chars)
        except asyncio.CancelledError:
            metrics.observe(call.name, kind, "cancelled", time.perf_counter() - t0)
            raise
        except ToolFailed as exc:
            status, public = "error", exc.public
            content = _error(cap(str(exc), self.settings.tool_result_max_chars))
        except Exception as exc:  # a bug or a library's surprise: the turn still goes on
            log.exception("tool %s failed", call.name)
            status, public = "error", "handler error"
            content = _error(f"the tool failed ({type(exc).__name__})")
        seconds = time.perf_counter() - t0
        metrics.observe(call.name, kind, status, seconds)
        if status != "ok":
            log.info("tool %s: %s: %s", call.name, status, content[:300])
        return Outcome(status, content, public, round(seconds * 1000, 2))

    async def _handle(
        self,
        spec: ToolSpec,
        args: dict[str, Any],
        call: ToolCall,
        key: str,
        session: str,
        epoch: int,
        limit_s: float,
    ) -> Any:
        handler = spec.handler
        if isinstance(handler, NatsHandler):
            return await self._nats(handler, args, call, key, session, epoch, limit_s)
        return await self._http(handler, args, key)

    # --- nats ----------------------------------------------------------------------------------

    async def _nats(
        self,
        handler: NatsHandler,
        args: dict[str, Any],
        call: ToolCall,
        key: str,
        session: str,
        epoch: int,
        limit_s: float,
    ) -> Any:
        if problem := subject_problem(handler.subject, self.prefixes, self.settings.subject_prefix):
            raise ToolFailed("refused", f"the tool's subject is refused: {problem}")
        body = orjson.dumps(
            {
                "name": call.name,
                "arguments": args,
                "call_id": call.id,
                "idempotency_key": key,
                "session_id": session,
                "epoch": epoch,
            }
        )
        try:
            # nats' own timeout a little later than ours: ours says "timeout" either way
            msg = await self.nc.request(handler.subject, body, timeout=limit_s + 1)
        except NoRespondersError:
            raise ToolFailed("no service", "no tool service is listening") from None
        except NatsTimeout:
            raise TimeoutError from None
        return _reply(msg.data)

    # --- http ----------------------------------------------------------------------------------

    def _client(self, url: str) -> httpx.AsyncClient:
        guard = EgressGuard("tool", url)
        assert guard.origin is not None
        client = self._clients.get(guard.origin)
        if client is None:
            client = guard.client(timeout=TIMEOUT)
            self._clients[guard.origin] = client
            while len(self._clients) > CLIENTS_MAX:
                _, old = self._clients.popitem(last=False)
                closing = asyncio.ensure_future(old.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        else:
            self._clients.move_to_end(guard.origin)
        return client

    async def _http(self, handler: HttpHandler, args: dict[str, Any], key: str) -> Any:
        if problem := url_problem(handler.url, TOOL_STAGE, HTTP_TOOL, ("https",), current_policy()):
            raise ToolFailed("refused", f"the tool's URL is refused: {problem}")
        try:
            headers = {name: resolve_header(value) for name, value in handler.headers.items()}
        except VoicemeshError as exc:
            raise ToolFailed("handler error", str(exc)) from None
        headers["Idempotency-Key"] = key
        request: dict[str, Any] = {"headers": headers}
        if handler.method in ("GET", "DELETE"):
            request["params"] = {
                k: v if isinstance(v, str | int | float | bool) else orjson.dumps(v).decode()
                for k, v in args.items()
            }
        else:
            request["content"] = orjson.dumps(args)
            headers["Content-Type"] = "application/json"
        client = self._client(handler.url)
        try:
            async with client.stream(handler.method, handler.url, **request) as response:
                if not 200 <= response.status_code < 300:
                    raise ToolFailed(
                        "handler error", f"the tool answered http {response.status_code}"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > HTTP_MAX_BYTES:
                        raise ToolFailed(
                            "handler error", f"the answer is larger than {HTTP_MAX_BYTES} bytes"
                        )
        except ToolFailed:
            raise
        except httpx.HTTPError as exc:
            raise ToolFailed(
                "handler error", f"the request failed ({type(exc).__name__})"
            ) from None
        except VoicemeshError as exc:  # the guard: a redirect, another origin
            raise ToolFailed("handler error", str(exc)) from None
        try:
            return orjson.loads(bytes(body))
        except orjson.JSONDecodeError:
            raise ToolFailed(
                "non-JSON output", "the tool answered something that is not JSON"
            ) from None


def _error(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


def _reply(data: bytes) -> Any:
    """A NATS tool service's reply: {"result": ...} or {"error": "..."}."""
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ToolFailed(
            "non-JSON output", "the tool answered something that is not JSON"
        ) from None
    if isinstance(reply, dict) and "error" in reply:
        raise ToolFailed("handler error", f"the tool failed: {str(reply['error'])[:500]}")
    if not isinstance(reply, dict) or "result" not in reply:
        raise ToolFailed("non-JSON output", 'the reply has neither "result" nor "error"')
    return reply["result"]
