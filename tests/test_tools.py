"""Tool calling in the LLM stage (issue 15), on real NATS and Valkey: the scripted LLM makes the
calls its config lists, tool services answer on NATS (voicemesh.tools.serve) or HTTP (a
loopback server), and the stage runs the loop. Every failure kind becomes an error result to the
LLM and an event to the caller, and the turn goes on."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.support import Services, has_last, listen
from voicemesh.bus import Bus, Frame, Kind, Subjects
from voicemesh.bus.events import Interrupt
from voicemesh.config.models import AgentConfig, ConfigValidationError, parse_agent_config
from voicemesh.pipeline import LLMService
from voicemesh.state import ConfigStore
from voicemesh.tools import current_call, serve
from voicemesh.tools.metrics import CALLS

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


def tool(name: str = "get_weather", subject: str = "tools.weather", **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": "The weather in a city",
        "parameters": WEATHER_SCHEMA,
        "handler": {"type": "nats", "subject": subject},
        **kw,
    }


def agent(
    agent_json: dict,
    rounds: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    *,
    replies: list[str] | None = None,
    **extra: Any,
) -> AgentConfig:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {
            "scripted": {
                "replies": replies or ["It says {result}."],
                "tool_rounds": rounds,
            }
        },
    }
    data["connectors"]["tts"] = {"primary": "tone", "config": {"tone": {}}}
    data["tools"] = tools
    data.update(extra)
    return parse_agent_config(data)


def call(name: str = "get_weather", arguments: Any = None, say: str = "") -> dict[str, Any]:
    return {"say": say, "calls": [{"name": name, "arguments": arguments or {"city": "Paris"}}]}


class Weather:
    """A NATS tool service that records what it was asked."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.calls: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.delay_s, self.fail = delay_s, fail
        self.started = asyncio.Event()
        self.on_call: Any = None

    async def __call__(self, city: str) -> dict[str, Any]:
        request = current_call()
        assert request is not None
        self.keys.append(request.idempotency_key)
        self.calls.append({"city": city})
        self.started.set()
        if self.on_call is not None:
            self.on_call()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the weather station is down")
        return {"city": city, "forecast": "sunny"}


async def events_of(inbox: Any, kind: str) -> list[dict[str, Any]]:
    return [f.as_event for f in inbox.frames if f.kind is Kind.EVENT and f.as_event["type"] == kind]


async def turn(
    bus: Bus, subjects: Subjects, sid: str, text: str = "weather in Paris?", epoch: int = 1
) -> None:
    await bus.publish(subjects.data("llm", sid), Frame.text(text, epoch=epoch))


# --- config -------------------------------------------------------------------------------------


def named(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**t, "name": f"t{i}"} for i, t in enumerate(tools)]


def issues_of(agent_json: dict, tools: list[dict[str, Any]]) -> dict[str, str]:
    data = copy.deepcopy(agent_json)
    data["tools"] = tools
    with pytest.raises(ConfigValidationError) as info:
        parse_agent_config(data)
    return {i.path: i.msg for i in info.value.issues}


def test_a_nats_tool_cannot_name_voicemesh_subjects_or_wildcards(agent_json: dict) -> None:
    """A config naming vm.config.get.<sid> (another session's config), vm.ctl.* or a wildcard
    is refused with its path: tool subjects live under the operator's prefixes only."""
    found = issues_of(
        agent_json,
        [
            tool("a", "vm.config.get.abc"),
            tool("b", "vm.ctl.abc"),
            tool("c", "tools.>"),
            tool("d", "tools.*.x"),
            tool("e", "_INBOX.llm.x"),
            tool("f", "tools"),
            tool("g", "tools..x"),
        ],
    )
    assert set(found) == {f"tools[{i}].handler.subject" for i in range(7)}
    assert "allowed prefix" in found["tools[0].handler.subject"]


def test_the_operator_can_allow_other_prefixes_but_never_voicemesh_own(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICEMESH_TOOL_SUBJECTS", "acme.tools, vm")
    data = copy.deepcopy(agent_json)
    data["tools"] = [tool("a", "acme.tools.weather")]
    parse_agent_config(data)
    found = issues_of(agent_json, [tool("a", "tools.weather"), tool("b", "vm.config.update")])
    assert "allowed prefix" in found["tools[0].handler.subject"]
    assert "voicemesh's own subjects" in found["tools[1].handler.subject"]


def test_an_http_tool_url_must_pass_the_egress_allow_list(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def http(url: str, **headers: str) -> dict[str, Any]:
        return tool(handler={"type": "http", "url": url, "headers": headers})

    found = issues_of(
        agent_json,
        named(
            [
                http("https://api.weather.example/v1"),
                http("http://169.254.169.254/latest/meta-data"),
                http("https://user:pw@api.weather.example/"),
                http("http://127.0.0.1:8080/x"),
                http("https://api.weather.example/v1?key=1"),
            ]
        ),
    )
    assert set(found) == {f"tools[{i}].handler.url" for i in range(5)}
    assert "egress allow-list" in found["tools[0].handler.url"]
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "tool_http:api.weather.example")
    data = copy.deepcopy(agent_json)
    data["tools"] = [http("https://api.weather.example/v1")]
    parse_agent_config(data)
    # another connector's allow-list does not extend the tools'
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "llm.openai:api.weather.example")
    assert "tools[0].handler.url" in issues_of(agent_json, data["tools"])


def test_http_tool_credentials_only_as_declared_references(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header may carry a secret only as "${NAME}" (or "Bearer ${NAME}") with NAME allowed for
    tool_http by the operator: not the stage's OPENAI_API_KEY, not a secret in clear, and
    "${...}" nowhere else in a tool."""
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "tool_http:api.weather.example")

    def http(**headers: str) -> dict[str, Any]:
        h = {"type": "http", "url": "https://api.weather.example/v1", "headers": headers}
        return tool(handler=h)

    found = issues_of(
        agent_json,
        named(
            [
                http(Authorization="Bearer ${OPENAI_API_KEY}"),
                http(Authorization="Bearer sk-live-123"),
                http(**{"X-Api-Key": "abc123"}),
                http(**{"X-Note": "pre ${WEATHER_KEY}"}),
                tool(description="${OPENAI_API_KEY}"),
                http(**{"Idempotency-Key": "mine"}),
            ]
        ),
    )
    assert (
        "not allowed for the llm connector 'tool_http'"
        in found["tools[0].handler.headers.Authorization"]
    )
    assert "in clear" in found["tools[1].handler.headers.Authorization"]
    assert "in clear" in found["tools[2].handler.headers.X-Api-Key"]
    assert "tools[3].handler.headers.X-Note" in found
    assert "tools[4].description" in found
    assert "tools[5].handler.headers.Idempotency-Key" in found
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "tool_http:WEATHER_KEY")
    data = copy.deepcopy(agent_json)
    data["tools"] = [http(Authorization="Bearer ${WEATHER_KEY}", Accept="application/json")]
    parse_agent_config(data)


def test_parameters_must_be_an_object_schema_of_bounded_size(agent_json: dict) -> None:
    found = issues_of(
        agent_json,
        [
            tool(parameters={"type": "string"}),
            tool("b", parameters={"type": "object", "properties": {"a": {"type": 12}}}),
            tool("c", parameters={"type": "object", "description": "x" * 20_000}),
            tool("get_weather"),
        ],
    )
    assert set(found) == {
        "tools[0].parameters",
        "tools[1].parameters",
        "tools[2].parameters",
        "tools[3].name",  # the first tool has the same name
    }


def test_a_config_without_tools_is_stored_as_before(agent_json: dict) -> None:
    config = parse_agent_config(agent_json)
    assert config.tools == []
    assert orjson.loads(config.to_json()) == agent_json


# --- the loop -------------------------------------------------------------------------------------


@pytest.fixture
async def weather(bus: Bus) -> AsyncIterator[Weather]:
    service = Weather()
    sub = await serve(bus.nc, "tools.weather", service)
    await bus.settle()
    yield service
    await sub.unsubscribe()


async def test_a_nats_tool_call_answers_the_turn_and_is_stored_in_order(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    weather: Weather,
) -> None:
    """The scripted LLM says a sentence, calls the tool; that sentence reaches TTS before the
    tool answers; the tool gets its arguments and the idempotency key session:epoch:call_id; the
    reply has the result; the context holds user, call, result, reply in that order; the
    caller gets tool_call and tool_result events."""
    config = agent(
        agent_json, [call(say="Let me check.")], [tool()], replies=["Paris is {result}."]
    )
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    spoken_before_call: list[list[str]] = []
    weather.on_call = lambda: spoken_before_call.append([f.as_text for f in tts.frames])
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    frames = await tts.wait_for(has_last)
    texts = [f.as_text for f in frames]
    assert texts[0] == "Let me check."
    assert spoken_before_call == [["Let me check."]]
    assert '"forecast":"sunny"' in " ".join(texts)
    assert weather.keys == [f"{sid}:1:call_0_0"]
    assert weather.calls == [{"city": "Paris"}]

    context = await store.get_context(sid)
    assert [m["role"] for m in context] == ["user", "tool_calls", "tool_result", "assistant"]
    assert context[1]["calls"] == [
        {"id": "call_0_0", "name": "get_weather", "arguments": '{"city":"Paris"}'}
    ]
    assert context[1]["content"] == "Let me check."
    assert context[2]["status"] == "ok" and orjson.loads(context[2]["content"])["city"] == "Paris"
    assert context[3]["content"].startswith("Let me check. Paris is {")

    await transport.wait_for(lambda fs: any(f.as_event["type"] == "tool_result" for f in fs))
    (shown,) = await events_of(transport, "tool_call")
    assert shown == {
        "type": "tool_call",
        "epoch": 1,
        "call_id": "call_0_0",
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    }
    (result,) = await events_of(transport, "tool_result")
    assert result["status"] == "ok" and result["duration_ms"] >= 0 and "error" not in result


@pytest.mark.parametrize(
    ("rounds", "tools", "status", "error", "llm_sees"),
    [
        ([call("book_flight")], [tool()], "error", "unknown tool", "no tool named"),
        ([call(arguments={"town": "Paris"})], [tool()], "error", "bad arguments", "schema"),
        ([call(arguments="{not json")], [tool()], "error", "bad arguments", "not valid JSON"),
        ([call()], [tool(subject="tools.down")], "error", "handler error", "station is down"),
        ([call()], [tool(subject="tools.garbage")], "error", "non-JSON output", "not JSON"),
        ([call()], [tool(subject="tools.slow", timeout_ms=200)], "timeout", "timeout", "200 ms"),
        ([call()], [tool(subject="tools.nobody")], "error", "no service", "no tool service"),
    ],
    ids=["unknown", "schema", "non-json-args", "handler-error", "non-json-out", "timeout", "none"],
)
async def test_each_failure_is_an_error_result_and_the_turn_goes_on(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    rounds: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    status: str,
    error: str,
    llm_sees: str,
) -> None:
    subs = [
        await serve(bus.nc, "tools.down", Weather(fail=True)),
        await serve(bus.nc, "tools.slow", Weather(delay_s=2.0)),
    ]

    async def garbage(msg: Any) -> None:
        await msg.respond(b"<html>oops</html>")

    subs.append(await bus.nc.subscribe("tools.garbage", cb=garbage))
    await bus.settle()
    config = agent(agent_json, rounds, tools, replies=["Sorry: {result}"], tool_filler=None)
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    frames = await tts.wait_for(has_last, limit_s=8)
    assert "Sorry:" in " ".join(f.as_text for f in frames)  # the turn went on
    (result,) = await events_of(transport, "tool_result")
    assert (result["status"], result["error"]) == (status, error)
    context = await store.get_context(sid)
    stored = [m for m in context if m["role"] == "tool_result"]
    assert len(stored) == 1 and stored[0]["status"] == status
    assert llm_sees in orjson.loads(stored[0]["content"])["error"]
    assert not await events_of(transport, "error")
    for sub in subs:
        await sub.unsubscribe()


async def test_parallel_calls_run_at_once_and_results_keep_their_ids(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    slow = Weather(delay_s=0.4)
    sub = await serve(bus.nc, "tools.weather", slow)
    await bus.settle()
    both = {
        "calls": [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": {"city": "Rome"}},
        ]
    }
    sid = (
        await store.create_session(agent(agent_json, [both], [tool()], tool_filler=None))
    ).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    await services.start(LLMService)
    t0 = time.perf_counter()
    await turn(bus, subjects, sid)
    await tts.wait_for(has_last)
    assert time.perf_counter() - t0 < 0.75  # two 0.4 s calls side by side, not one after another
    context = await store.get_context(sid)
    results = {
        m["call_id"]: orjson.loads(m["content"])["city"]
        for m in context
        if m["role"] == "tool_result"
    }
    assert results == {"call_0_0": "Paris", "call_0_1": "Rome"}
    await sub.unsubscribe()


async def test_rounds_stop_at_the_limit_with_a_warning(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    weather: Weather,
) -> None:
    config = agent(
        agent_json, [call(), call(), call()], [tool()], replies=["Done."], tool_filler=None
    )
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService, tool_max_rounds=2)
    await turn(bus, subjects, sid)
    await tts.wait_for(has_last)
    assert len(weather.calls) == 2
    warnings = await events_of(transport, "warning")
    assert [w["code"] for w in warnings] == ["tool_round_limit"]


async def test_a_long_result_is_cut_with_a_marker(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    async def big(city: str) -> str:
        return "x" * 5000

    sub = await serve(bus.nc, "tools.weather", big)
    await bus.settle()
    config = agent(agent_json, [call()], [tool()], replies=["Ok."], tool_filler=None)
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    await services.start(LLMService, tool_result_max_chars=300)
    await turn(bus, subjects, sid)
    await tts.wait_for(has_last)
    (stored,) = [m for m in await store.get_context(sid) if m["role"] == "tool_result"]
    assert stored["content"].startswith('"xxx')
    assert stored["content"].endswith("…[truncated: 300 of 5002 characters]")
    await sub.unsubscribe()


async def test_a_slow_tool_gets_the_filler_and_a_fast_one_does_not(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    sub = await serve(bus.nc, "tools.weather", Weather(delay_s=0.5))
    await bus.settle()
    await services.start(LLMService)
    filler = {"text": "Hold on.", "after_ms": 150}
    said = {}
    for name, options in (("slow", filler), ("fast", {**filler, "after_ms": 3000}), ("off", None)):
        config = agent(agent_json, [call()], [tool()], replies=["Ok."], tool_filler=options)
        sid = (await store.create_session(config)).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        await turn(bus, subjects, sid)
        said[name] = [f.as_text for f in await tts.wait_for(has_last)]
    assert said["slow"] == ["Hold on.", "Ok.", ""]
    assert said["fast"] == said["off"] == ["Ok.", ""]
    await sub.unsubscribe()


async def test_a_barge_in_during_a_tool_cancels_the_turn_and_records_the_call_as_cancelled(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """The interrupt cancels the turn while the tool runs: the stage stops waiting (the service
    may still finish: its answer is ignored), no further round runs, nothing more reaches TTS,
    and the context says the call was cancelled."""
    slow = Weather(delay_s=1.5)
    sub = await serve(bus.nc, "tools.weather", slow)
    await bus.settle()
    config = agent(agent_json, [call()], [tool()], replies=["Too late."], tool_filler=None)
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    await asyncio.wait_for(slow.started.wait(), 5)
    await bus.publish(subjects.ctl(sid), Frame.event(Interrupt(epoch=2, interrupted=1), epoch=1))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        context = await store.get_context(sid)
        if any(m["role"] == "tool_result" for m in context):
            break
        await asyncio.sleep(0.05)
    assert [(m["role"], m.get("status")) for m in context] == [
        ("user", None),
        ("tool_calls", None),
        ("tool_result", "cancelled"),
    ]
    await asyncio.sleep(1.8)  # past the service's answer
    assert not any(f.as_text == "Too late." for f in tts.frames)
    assert [m["role"] for m in await store.get_context(sid)] == [
        "user",
        "tool_calls",
        "tool_result",
    ]
    assert CALLS.labels("get_weather", "nats", "cancelled")._value.get() >= 1
    await sub.unsubscribe()


def test_tool_metric_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tool names come from configs: past MAX_NAMES distinct ones, metrics say "other"."""
    from voicemesh.tools import metrics

    monkeypatch.setattr(metrics, "_seen", set())
    monkeypatch.setattr(metrics, "MAX_NAMES", 3)
    assert [metrics.label(f"t{i}") for i in range(5)] == ["t0", "t1", "t2", "other", "other"]
    assert metrics.label("t1") == "t1"


async def test_the_operator_caps_a_configs_tool_timeout(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """A config's timeout_ms of 60 s is cut to VOICEMESH_TOOL_TIMEOUT_MAX_MS (here 300 ms)."""
    sub = await serve(bus.nc, "tools.weather", Weather(delay_s=3))
    await bus.settle()
    config = agent(
        agent_json, [call()], [tool(timeout_ms=60_000)], replies=["Ok."], tool_filler=None
    )
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService, tool_timeout_max_ms=300)
    t0 = time.perf_counter()
    await turn(bus, subjects, sid)
    await tts.wait_for(has_last)
    assert time.perf_counter() - t0 < 2
    (result,) = await events_of(transport, "tool_result")
    assert result["status"] == "timeout"
    await sub.unsubscribe()


async def test_the_default_filler_delay_is_the_operators(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """An agent's filler with no after_ms waits VOICEMESH_TOOL_FILLER_AFTER_MS."""
    sub = await serve(bus.nc, "tools.weather", Weather(delay_s=0.5))
    await bus.settle()
    config = agent(agent_json, [call()], [tool()], replies=["Ok."], tool_filler={"text": "Wait."})
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    await services.start(LLMService, tool_filler_after_ms=100)
    await turn(bus, subjects, sid)
    assert [f.as_text for f in await tts.wait_for(has_last)] == ["Wait.", "Ok.", ""]
    await sub.unsubscribe()


def test_the_tool_subjects_setting_is_checked() -> None:
    from voicemesh.config.settings import Settings

    assert Settings(tool_subjects=" tools, acme.tools ").tool_subjects == "tools,acme.tools"
    with pytest.raises(ValueError, match="not a subject prefix"):
        Settings(tool_subjects="tools.>")


async def test_a_speculative_reply_calls_no_tool_before_its_turn_ends(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    weather: Weather,
) -> None:
    """A reply started on a transcript made at the caller's pause (SPECULATE) may speak, but a
    tool acts in the world: its call waits until the transport confirms the turn ended there
    (turn_ended on vm.ctl), and nothing of the turn is stored before then."""
    from voicemesh.bus import Flag
    from voicemesh.bus.events import TurnEnded

    config = agent(
        agent_json, [call(say="Let me check.")], [tool()], replies=["Paris is {result}."]
    )
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    await services.start(LLMService)
    flags = Flag.START | Flag.END | Flag.LAST | Flag.SPECULATE
    await bus.publish(
        subjects.data("llm", sid), Frame.text("weather in Paris?", epoch=1, flags=flags)
    )
    await tts.wait_for(lambda fs: any(f.as_text == "Let me check." for f in fs))
    await asyncio.sleep(0.5)
    assert weather.calls == [] and await store.get_context(sid) == []
    ended = Frame.event(TurnEnded(epoch=1), epoch=1)
    await bus.publish(subjects.ctl(sid), ended)
    await tts.wait_for(has_last)
    assert weather.calls == [{"city": "Paris"}]
    context = await store.get_context(sid)
    assert [m["role"] for m in context] == ["user", "tool_calls", "tool_result", "assistant"]
