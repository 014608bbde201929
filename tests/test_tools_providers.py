"""Tool calls through the provider connectors on loopback servers that speak each provider's
streaming tool-call format, fallback mid-tool-turn, and the http handler against a loopback
HTTP tool (issue 15)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.support import Services, has_last, listen
from tests.test_tools import WEATHER_SCHEMA, Weather, events_of, tool, turn
from voicemesh.bus import Bus, Subjects
from voicemesh.config.models import parse_agent_config
from voicemesh.pipeline import LLMService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.anthropic import AnthropicServer
from voicemesh.testing.loopback.base import LoopbackServer
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer
from voicemesh.tools import serve

pytestmark = pytest.mark.usefixtures("private_egress")

PARIS = '{"city": "Paris"}'


def with_llm(agent_json: dict, llm: dict[str, Any], tools: list[dict[str, Any]]) -> Any:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = llm
    data["connectors"]["tts"] = {"primary": "tone", "config": {"tone": {}}}
    data["tools"] = tools
    data["tool_filler"] = None
    return parse_agent_config(data)


@pytest.fixture
async def weather(bus: Bus) -> AsyncIterator[Weather]:
    service = Weather()
    sub = await serve(bus.nc, "tools.weather", service)
    await bus.settle()
    yield service
    await sub.unsubscribe()


async def test_openai_streamed_parallel_tool_calls(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    weather: Weather,
) -> None:
    """Two calls streamed as OpenAI streams them (id and name first, arguments in pieces, by
    index) are put together and both made; the next request carries the tools, the assistant
    message with both tool_calls and a tool message per call id; the reply has the results."""
    rounds = [
        [
            {"name": "get_weather", "arguments": PARIS, "say": "Checking."},
            {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        ]
    ]
    async with OpenAIChatServer(["Here: {result}"], tool_rounds=rounds) as chat:
        assert isinstance(chat, OpenAIChatServer)
        llm = {
            "primary": "openai",
            "config": {"openai": {"model": "gpt-x", "base_url": f"{chat.url}/v1"}},
        }
        sid = (await store.create_session(with_llm(agent_json, llm, [tool()]))).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        await services.start(LLMService)
        await turn(bus, subjects, sid)
        frames = await tts.wait_for(has_last, limit_s=10)
        said = " ".join(f.as_text for f in frames)
        assert said.startswith("Checking.")
        assert '"city":"Paris"' in said and '"city":"Rome"' in said
        assert sorted(c["city"] for c in weather.calls) == ["Paris", "Rome"]
        body = chat.last_request
        assert body is not None
        assert body["tools"][0]["function"]["name"] == "get_weather"
        assert body["tools"][0]["function"]["parameters"] == WEATHER_SCHEMA
        asked = [m for m in body["messages"] if m.get("tool_calls")]
        assert len(asked) == 1 and asked[0]["content"] == "Checking."
        ids = [c["id"] for c in asked[0]["tool_calls"]]
        answers = [m["tool_call_id"] for m in body["messages"] if m["role"] == "tool"]
        assert answers == ids and len(set(ids)) == 2
        assert sorted(weather.keys) == sorted(f"{sid}:1:{i}" for i in ids)


async def test_fallback_mid_tool_turn_calls_the_tool_exactly_once(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """The primary asks for the tool, then fails (500) when asked again with the result; the
    fallback continues from the stored result: the tool ran once, the reply has its answer."""
    rounds = [[{"name": "get_weather", "arguments": PARIS}]]
    async with OpenAIChatServer(["Primary: {result}"], tool_rounds=rounds) as chat:
        assert isinstance(chat, OpenAIChatServer)
        weather = Weather()
        weather.on_call = lambda: chat.fail("500")  # the round after the call fails
        sub = await serve(bus.nc, "tools.weather", weather)
        await bus.settle()
        llm = {
            "primary": "openai",
            "fallback": ["scripted"],
            "config": {
                "openai": {"model": "gpt-x", "base_url": f"{chat.url}/v1"},
                "scripted": {"replies": ["Fallback says {result}."]},
            },
        }
        sid = (await store.create_session(with_llm(agent_json, llm, [tool()]))).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        await services.start(LLMService)
        await turn(bus, subjects, sid)
        frames = await tts.wait_for(has_last, limit_s=10)
        said = " ".join(f.as_text for f in frames)
        assert said.startswith("Fallback says") and '"forecast":"sunny"' in said
        assert len(weather.calls) == 1
        assert chat.failed == 1
        context = await store.get_context(sid)
        assert [m["role"] for m in context] == ["user", "tool_calls", "tool_result", "assistant"]
        assert context[-1]["connector"] == "scripted"
        await sub.unsubscribe()


async def test_anthropic_tool_use_and_tool_result_blocks(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    weather: Weather,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k-test")
    rounds = [[{"name": "get_weather", "arguments": PARIS, "say": "Let me see."}]]
    async with AnthropicServer(["Claude: {result}"], tool_rounds=rounds) as claude:
        assert isinstance(claude, AnthropicServer)
        llm = {
            "primary": "anthropic",
            "config": {
                "anthropic": {
                    "model": "claude-x",
                    "api_key": "${ANTHROPIC_API_KEY}",
                    "base_url": claude.url,
                }
            },
        }
        sid = (await store.create_session(with_llm(agent_json, llm, [tool()]))).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        await services.start(LLMService)
        await turn(bus, subjects, sid)
        frames = await tts.wait_for(has_last, limit_s=10)
        said = " ".join(f.as_text for f in frames)
        assert said.startswith("Let me see.") and '"forecast":"sunny"' in said
        assert weather.calls == [{"city": "Paris"}]
        body = claude.last_request
        assert body is not None
        assert body["tools"][0] == {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER_SCHEMA,
        }
        assistant, user = body["messages"][-2:]
        use = [b for b in assistant["content"] if b["type"] == "tool_use"]
        assert use[0]["input"] == {"city": "Paris"}
        assert assistant["content"][0] == {"type": "text", "text": "Let me see."}
        (result,) = user["content"]
        assert result["type"] == "tool_result" and result["tool_use_id"] == use[0]["id"]


# --- http tools -------------------------------------------------------------------------------


class HttpTool(LoopbackServer):
    name = "http-tool"

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], Any]] = []
        super().__init__()

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/weather", self.weather, methods=["GET", "POST"]),
                Route("/moved", self.moved, methods=["POST"]),
                Route("/text", self.text, methods=["POST"]),
                Route("/fail", self.fail_, methods=["POST"]),
            ]
        )

    async def weather(self, request: Request) -> Response:
        body = orjson.loads(await request.body()) if request.method == "POST" else None
        args = body if body is not None else dict(request.query_params)
        self.seen.append((request.method, dict(request.headers), args))
        return JSONResponse({"city": args["city"], "forecast": "rain"})

    async def moved(self, request: Request) -> Response:
        return RedirectResponse("http://169.254.169.254/latest/meta-data", status_code=307)

    async def text(self, request: Request) -> Response:
        return Response("sunny", media_type="text/plain")

    async def fail_(self, request: Request) -> Response:
        return JSONResponse({"detail": "internal"}, status_code=500)


@pytest.mark.parametrize(
    ("path", "method", "status", "error"),
    [
        ("/weather", "POST", "ok", None),
        ("/weather", "GET", "ok", None),
        ("/moved", "POST", "error", "handler error"),
        ("/text", "POST", "error", "non-JSON output"),
        ("/fail", "POST", "error", "handler error"),
    ],
)
async def test_an_http_tool(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    method: str,
    status: str,
    error: str | None,
) -> None:
    """POST sends the arguments as JSON, GET as a query; the declared credential is resolved
    in the stage and sent; every call carries Idempotency-Key; a redirect (here to the metadata
    address) is not followed; a non-JSON or non-2xx answer is an error result."""
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "tool_http:WEATHER_KEY")
    monkeypatch.setenv("WEATHER_KEY", "w-secret-1")
    async with HttpTool() as server:
        assert isinstance(server, HttpTool)
        handler = {
            "type": "http",
            "method": method,
            "url": f"{server.url}{path}",
            "headers": {"Authorization": "Bearer ${WEATHER_KEY}", "Accept": "application/json"},
        }
        data = copy.deepcopy(agent_json)
        data["connectors"]["llm"] = {
            "primary": "scripted",
            "config": {
                "scripted": {
                    "replies": ["Result {result}"],
                    "tool_rounds": [
                        {"calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
                    ],
                }
            },
        }
        data["connectors"]["tts"] = {"primary": "tone"}
        data["tools"] = [tool(handler=handler)]
        data["tool_filler"] = None
        sid = (await store.create_session(parse_agent_config(data))).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        transport = await listen(bus, subjects.data("transport", sid))
        await services.start(LLMService)
        await turn(bus, subjects, sid)
        frames = await tts.wait_for(has_last, limit_s=10)
        (result,) = await events_of(transport, "tool_result")
        assert (result["status"], result.get("error")) == (status, error)
        if status == "ok":
            ((seen_method, headers, args),) = server.seen
            assert (seen_method, args) == (method, {"city": "Oslo"})
            assert headers["authorization"] == "Bearer w-secret-1"
            assert headers["idempotency-key"] == f"{sid}:1:call_0_0"
            assert '"forecast":"rain"' in " ".join(f.as_text for f in frames)
        # the secret never reaches the context or the caller
        assert "w-secret-1" not in orjson.dumps(await store.get_context(sid)).decode()
        assert all(b"w-secret-1" not in f.payload for f in transport.frames)
