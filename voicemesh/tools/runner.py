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
  process's environment at call time;
- mcp: `tools/call` on a Model Context Protocol server over streamable HTTP (the official `mcp`
  package), through the same guard; its tools are listed by `offered` (cached for
  VOICEMESH_TOOL_MCP_LIST_TTL_S) and offered under their own names. Each call opens its own MCP
  session: no session outlives the call, so nothing of one tenant's calls is kept open between
  turns (it costs the session's handshake and its closing DELETE: ~33 ms a call against a
  loopback MCPServer on 2 shared, busy cores, p50 of 14);
- end_call and set_config: built-ins; the LLM stage hangs up after an end_call, and set_config
  is voicemesh/tools/builtins.py, given to the runner by the stage.

The subject and URL were checked when the config was pushed and when this stage loaded it; they
are checked again here, against this process's own settings, before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
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
    DESCRIPTION_MAX_CHARS,
    HTTP_TOOL,
    MCP_TOOL,
    TOOL_NAME,
    TOOL_STAGE,
    TOOLS_MAX,
    EndCallHandler,
    HttpHandler,
    McpHandler,
    NatsHandler,
    SetConfigHandler,
    ToolSpec,
    parse_tool_subjects,
    resolve_header,
    schema_problem,
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
#: tools offered to the LLM in one turn, mcp servers' included (each server's list is cut)
OFFERED_MAX = 4 * TOOLS_MAX
#: mcp listings kept, one per (url, headers)
LISTINGS_MAX = 64
MCP_LIST_FAILED = "mcp_list_failed"
_NAME = re.compile(TOOL_NAME)

#: the built-in set_config, given to the runner by the stage: (session, handler, arguments) ->
#: the result
Builtin = Callable[[str, SetConfigHandler, dict[str, Any]], Awaitable[Any]]


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

    def __init__(self, nc: Client, settings: Settings, set_config: Builtin | None = None):
        self.nc, self.settings = nc, settings
        self.set_config = set_config
        self.prefixes = parse_tool_subjects(settings.tool_subjects)
        self._clients: OrderedDict[tuple[str, str, int], httpx.AsyncClient] = OrderedDict()
        self._closing: set[asyncio.Future[None]] = set()
        #: (url, headers) -> (when listed, the server's tools as specs)
        self._listings: OrderedDict[tuple[str, bytes], tuple[float, list[ToolSpec]]] = OrderedDict()

    async def offered(self, tools: list[ToolSpec]) -> tuple[list[ToolSpec], list[str]]:
        """The functions the LLM sees this turn: the config's tools, each mcp entry replaced by
        the tools its server lists (those on its allow-list), set_config's schema made from its
        lists. Also the names of the mcp entries whose server could not be listed (their tools
        are left out; the turn goes on)."""
        out: list[ToolSpec] = []
        failed: list[str] = []
        names = {t.name for t in tools if not isinstance(t.handler, McpHandler)}
        for spec in tools:
            handler = spec.handler
            if isinstance(handler, McpHandler):
                try:
                    listed = await self._mcp_list(spec, handler)
                except Exception as exc:  # the server is down, refused, answers nonsense
                    log.warning("mcp tool %s: listing failed: %s", spec.name, exc)
                    failed.append(spec.name)
                    continue
                for one in listed:
                    if one.name not in names:  # a config's own tool wins over a server's
                        names.add(one.name)
                        out.append(one)
            elif isinstance(handler, SetConfigHandler):
                out.append(spec.model_copy(update={"parameters": set_config_schema(handler)}))
            else:
                out.append(spec)
        return out[:OFFERED_MAX], failed

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
        if isinstance(handler, HttpHandler):
            return await self._http(handler, args, key)
        if isinstance(handler, McpHandler):
            return await self._mcp_call(handler, call.name, args, key, limit_s)
        if isinstance(handler, EndCallHandler):
            # the stage hangs up after this turn's reply (LLMService._generate)
            return {"ok": True, "note": "the call ends after the rest of your reply"}
        if self.set_config is None:
            raise ToolFailed("refused", "set_config is not available here")
        return await self.set_config(session, handler, args)

    # --- mcp -----------------------------------------------------------------------------------

    def _mcp_client(self, handler: McpHandler) -> Any:
        """An httpx2 client (the mcp package's) with the egress guard's hooks: one origin, no
        redirect, the declared headers resolved now."""
        if problem := url_problem(handler.url, TOOL_STAGE, MCP_TOOL, ("https",), current_policy()):
            raise ToolFailed("refused", f"the tool's URL is refused: {problem}")
        try:
            headers = {
                name: resolve_header(value, connector=MCP_TOOL)
                for name, value in handler.headers.items()
            }
        except VoicemeshError as exc:
            raise ToolFailed("handler error", str(exc)) from None
        import httpx2

        guard = EgressGuard("mcp tool", handler.url)
        return httpx2.AsyncClient(
            follow_redirects=False,
            event_hooks=guard.hooks(),
            headers=headers,
            timeout=httpx2.Timeout(30.0, connect=5.0),
        )

    async def _mcp_session(self, handler: McpHandler, work: Callable[[Any], Awaitable[Any]]) -> Any:
        from mcp import Client as McpClient
        from mcp.client.streamable_http import streamable_http_client

        async with self._mcp_client(handler) as http:
            transport = streamable_http_client(handler.url, http_client=http)
            async with McpClient(transport, cache=None) as client:
                return await work(client)

    async def _mcp_list(self, spec: ToolSpec, handler: McpHandler) -> list[ToolSpec]:
        key = (handler.url, orjson.dumps(handler.headers, option=orjson.OPT_SORT_KEYS))
        now = time.monotonic()
        cached = self._listings.get(key)
        if cached is not None and now - cached[0] < self.settings.tool_mcp_list_ttl_s:
            return [t.model_copy(update={"timeout_ms": spec.timeout_ms}) for t in cached[1]]

        async def walk(client: Any) -> list[Any]:
            found: list[Any] = []
            cursor: str | None = None
            for _ in range(10):  # pages: a server that pages forever cannot hold a turn
                page = await client.list_tools(cursor=cursor)
                found += page.tools
                cursor = page.next_cursor
                if not cursor or len(found) >= OFFERED_MAX:
                    break
            return found

        limit_s = min(spec.timeout_ms, self.settings.tool_timeout_max_ms) / 1000
        async with asyncio.timeout(limit_s):
            listed = await self._mcp_session(handler, walk)
        allowed = set(handler.tools) if handler.tools is not None else None
        specs: list[ToolSpec] = []
        for tool in listed:
            name = str(tool.name)
            if allowed is not None and name not in allowed:
                continue
            if not _NAME.fullmatch(name):
                log.info("mcp tool %s: %r is not a usable function name; left out", spec.name, name)
                continue
            schema = dict(tool.input_schema or {"type": "object", "properties": {}})
            if problem := schema_problem(schema):
                log.info("mcp tool %s: %s's schema %s; left out", spec.name, name, problem)
                continue
            specs.append(
                ToolSpec(
                    name=name,
                    description=(tool.description or "")[:DESCRIPTION_MAX_CHARS],
                    parameters=schema,
                    handler=handler,
                    timeout_ms=spec.timeout_ms,
                )
            )
            if len(specs) >= OFFERED_MAX:
                break
        self._listings[key] = (now, specs)
        self._listings.move_to_end(key)
        while len(self._listings) > LISTINGS_MAX:
            self._listings.popitem(last=False)
        return specs

    async def _mcp_call(
        self, handler: McpHandler, name: str, args: dict[str, Any], key: str, limit_s: float
    ) -> Any:
        if handler.tools is not None and name not in handler.tools:
            raise ToolFailed("refused", f"{name!r} is not on the mcp tool's allow-list")

        async def call(client: Any) -> Any:
            return await client.call_tool(
                name,
                args,
                read_timeout_seconds=limit_s,
                meta={"io.voicemesh/idempotency_key": key},
            )

        try:
            result = await self._mcp_session(handler, call)
        except ToolFailed:
            raise
        except VoicemeshError as exc:  # the guard: a redirect, another origin
            raise ToolFailed("handler error", str(exc)) from None
        except Exception as exc:  # the transport or the protocol failed
            raise ToolFailed(
                "handler error", f"the mcp request failed ({type(exc).__name__})"
            ) from None
        texts = [str(getattr(c, "text", "")) for c in result.content if c.type == "text"]
        if result.is_error:
            detail = " ".join(texts)[:500] or "no detail"
            raise ToolFailed("handler error", f"the tool failed: {detail}")
        if result.structured_content is not None:
            return result.structured_content
        text = "\n".join(texts)
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text  # MCP tools answer text: it is the result as it is

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


def set_config_schema(handler: SetConfigHandler) -> dict[str, Any]:
    """The arguments set_config takes, made from what its config allows: the LLM sees the
    choices as enums, and a choice outside them fails the schema check before anything runs."""
    properties: dict[str, Any] = {}
    if handler.connectors:
        properties["stage"] = {"type": "string", "enum": sorted(handler.connectors)}
        names = sorted({n for ns in handler.connectors.values() for n in ns})
        properties["connector"] = {"type": "string", "enum": names}
    if handler.prompts:
        properties["prompt"] = {"type": "string", "enum": sorted(handler.prompts)}
    return {"type": "object", "properties": properties, "additionalProperties": False}


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
