"""The mcp tool handler (issue 15) against a loopback MCP server built with the official `mcp`
package (MCPServer over streamable HTTP on 127.0.0.1): its tools are listed and offered to the
LLM, only those on the entry's allow-list; a call goes to the server with the idempotency key;
an MCP tool error is an error result; the URL and headers obey the tool_mcp egress and
credential rules."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.support import Services, has_last, listen
from tests.test_tools import events_of, issues_of, turn
from voicemesh.bus import Bus, Subjects
from voicemesh.config.models import parse_agent_config
from voicemesh.pipeline import LLMService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.mcp import McpServer
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer

CITY = '{"city": "Oslo"}'


def mcp_tool(url: str, allow: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    handler: dict[str, Any] = {"type": "mcp", "url": url, **kw}
    if allow is not None:
        handler["tools"] = allow
    return {"name": "weather_server", "description": "a weather MCP server", "handler": handler}


def with_tools(agent_json: dict, llm: dict[str, Any], tools: list[dict[str, Any]]) -> Any:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = llm
    data["connectors"]["tts"] = {"primary": "tone", "config": {"tone": {}}}
    data["tools"] = tools
    data["tool_filler"] = None
    return parse_agent_config(data)


def scripted(calls: list[dict[str, Any]], reply: str = "Result {result}") -> dict[str, Any]:
    rounds = [{"calls": calls}] if calls else []
    return {
        "primary": "scripted",
        "config": {"scripted": {"replies": [reply], "tool_rounds": rounds}},
    }


@pytest.fixture
async def mcp_server() -> AsyncIterator[McpServer]:
    async with McpServer() as server:
        assert isinstance(server, McpServer)
        yield server


# --- config ---------------------------------------------------------------------------------------


def test_an_mcp_url_must_pass_the_tool_mcp_egress_allow_list(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MCP URL is an egress endpoint of its own pseudo-connector: the metadata address, a
    loopback host, userinfo and a host allowed only for http tools are all refused."""
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "tool_http:mcp.example.com")
    urls = [
        "https://mcp.example.com/mcp",  # on tool_http's list, not tool_mcp's
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1:8080/mcp",
        "https://user:pw@mcp.example.com/mcp",
    ]
    tools = [{**mcp_tool(u), "name": f"m{i}"} for i, u in enumerate(urls)]
    found = issues_of(agent_json, tools)
    assert set(found) == {f"tools[{i}].handler.url" for i in range(4)}
    assert "'tool_mcp'" in found["tools[0].handler.url"]
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "tool_mcp:mcp.example.com")
    data = copy.deepcopy(agent_json)
    data["tools"] = [mcp_tool(urls[0], allow=["get_weather"])]
    parse_agent_config(data)


def test_mcp_credentials_only_as_references_declared_for_tool_mcp(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "tool_mcp:mcp.example.com")
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "tool_http:MCP_TOKEN")
    url = "https://mcp.example.com/mcp"
    tools = [
        {**mcp_tool(url, headers={"Authorization": "Bearer ${MCP_TOKEN}"}), "name": "a"},
        {**mcp_tool(url, headers={"Authorization": "Bearer sk-123"}), "name": "b"},
        {**mcp_tool(url, headers={"X-Key": "${OPENAI_API_KEY}"}), "name": "c"},
    ]
    found = issues_of(agent_json, tools)
    # allowed for http tools is not allowed for mcp tools
    assert "'tool_mcp'" in found["tools[0].handler.headers.Authorization"]
    assert "in clear" in found["tools[1].handler.headers.Authorization"]
    assert "tools[2].handler.headers.X-Key" in found
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "tool_mcp:MCP_TOKEN")
    data = copy.deepcopy(agent_json)
    data["tools"] = tools[:1]
    parse_agent_config(data)


# --- calls ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("private_egress")
async def test_mcp_tools_are_listed_filtered_and_offered_to_the_llm(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    mcp_server: McpServer,
) -> None:
    """The LLM's request carries the server's tools on the allow-list (with their schemas) and
    nothing else; its call goes to the server with the idempotency key in _meta; the reply has
    the structured answer; the context holds the call and the result."""
    rounds = [[{"name": "get_weather", "arguments": CITY, "say": "Let me look."}]]
    async with OpenAIChatServer(["Here: {result}"], tool_rounds=rounds) as chat:
        assert isinstance(chat, OpenAIChatServer)
        llm = {
            "primary": "openai",
            "config": {"openai": {"model": "gpt-x", "base_url": f"{chat.url}/v1"}},
        }
        allow = ["get_weather", "get_time", "broken"]
        config = with_tools(agent_json, llm, [mcp_tool(mcp_server.endpoint, allow)])
        sid = (await store.create_session(config)).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        await services.start(LLMService)
        await turn(bus, subjects, sid)
        frames = await tts.wait_for(has_last, limit_s=15)
        said = " ".join(f.as_text for f in frames)
        body = chat.last_request
        assert body is not None
        offered = {t["function"]["name"]: t["function"] for t in body["tools"]}
        assert sorted(offered) == sorted(allow)  # not slow, not forbidden
        assert offered["get_weather"]["parameters"]["required"] == ["city"]
        assert offered["get_weather"]["description"] == "The weather in a city."
    assert '"forecast":"fog"' in said
    assert mcp_server.requests > 0
    context = await store.get_context(sid)
    call_id = context[1]["calls"][0]["id"]
    assert mcp_server.calls == [("get_weather", {"city": "Oslo"}, f"{sid}:1:{call_id}")]
    assert [m["role"] for m in context] == ["user", "tool_calls", "tool_result", "assistant"]
    assert orjson.loads(context[2]["content"]) == {"city": "Oslo", "forecast": "fog"}


@pytest.mark.usefixtures("private_egress")
@pytest.mark.parametrize(
    ("name", "status", "error", "llm_sees"),
    [
        ("get_time", "ok", None, "It is noon in Oslo."),
        ("broken", "error", "handler error", "the tool failed"),
        ("forbidden", "error", "unknown tool", "no tool named"),
        ("slow", "timeout", "timeout", "did not answer"),
    ],
)
async def test_an_mcp_call_and_its_failures(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    mcp_server: McpServer,
    name: str,
    status: str,
    error: str | None,
    llm_sees: str,
) -> None:
    """A text answer is the result as it is; an MCP tool error (isError) is an error result; a
    tool the server lists but the allow-list leaves out is unknown to the stage and never
    reaches the server; a slow one times out. The turn goes on each time."""
    allow = ["get_time", "broken", "slow"]
    tool = mcp_tool(mcp_server.endpoint, allow)
    tool["timeout_ms"] = 500
    config = with_tools(
        agent_json, scripted([{"name": name, "arguments": {"city": "Oslo"}}]), [tool]
    )
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    frames = await tts.wait_for(has_last, limit_s=15)
    assert any(f.as_text.startswith("Result") for f in frames)  # the turn went on
    (result,) = await events_of(transport, "tool_result")
    assert (result["status"], result.get("error")) == (status, error)
    (stored,) = [m for m in await store.get_context(sid) if m["role"] == "tool_result"]
    assert llm_sees in stored["content"]
    if name == "forbidden":
        assert mcp_server.calls == []
    else:
        assert [c[0] for c in mcp_server.calls] == [name]


@pytest.mark.usefixtures("private_egress")
async def test_an_mcp_server_that_cannot_be_listed_is_a_warning_and_the_turn_goes_on(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    from voicemesh.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/mcp"  # nobody listens
    config = with_tools(agent_json, scripted([], reply="Still here."), [mcp_tool(url)])
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    frames = await tts.wait_for(has_last, limit_s=15)
    assert [f.as_text for f in frames] == ["Still here.", ""]
    warnings = await events_of(transport, "warning")
    assert [w["code"] for w in warnings] == ["mcp_list_failed"]


async def test_an_mcp_url_is_checked_again_where_the_call_is_made(
    bus: Bus, settings: Any, mcp_server: McpServer
) -> None:
    """A stage whose operator does not allow private hosts refuses to list or call a loopback
    MCP server whatever reached it (the config's own checks ran elsewhere, under other
    settings): nothing is sent to the server."""
    from voicemesh.config.tools import ToolSpec
    from voicemesh.connectors.base import ToolCall
    from voicemesh.tools.runner import ToolRunner

    spec = ToolSpec.model_validate(mcp_tool(mcp_server.endpoint))
    runner = ToolRunner(bus.nc, settings)
    assert await runner.offered([spec]) == ([], ["weather_server"])
    listed = spec.model_copy(update={"name": "get_weather"})
    call = ToolCall(id="c1", name="get_weather", arguments=CITY)
    outcome = await runner.run([listed], call, session="s", epoch=1)
    assert (outcome.status, outcome.error) == ("error", "refused")
    assert mcp_server.requests == 0
    await runner.aclose()


@pytest.mark.usefixtures("private_egress")
async def test_the_listing_is_reused_for_the_ttl(
    bus: Bus, settings: Any, mcp_server: McpServer
) -> None:
    """VOICEMESH_TOOL_MCP_LIST_TTL_S: a second turn within it asks the server nothing; with 0,
    every turn lists again."""
    from voicemesh.config.tools import ToolSpec
    from voicemesh.tools.runner import ToolRunner

    spec = ToolSpec.model_validate(mcp_tool(mcp_server.endpoint, ["get_weather"]))
    for ttl_s, again in ((60.0, False), (0.0, True)):
        runner = ToolRunner(bus.nc, settings.model_copy(update={"tool_mcp_list_ttl_s": ttl_s}))
        first, _ = await runner.offered([spec])
        before = mcp_server.requests
        second, _ = await runner.offered([spec])
        assert [t.name for t in first] == [t.name for t in second] == ["get_weather"]
        assert (mcp_server.requests > before) is again
        await runner.aclose()
