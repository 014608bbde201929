"""OpenTelemetry traces of a turn (voicemesh/bus/tracing.py): with OTEL_EXPORTER_OTLP_ENDPOINT set,
one call's turn arrives at a loopback OTLP/HTTP receiver as one trace whose id is the one the
logs and the caller's `turn_metrics` carry, a root span from the transport and a span per phase
and per stage under it; with it unset, nothing is recorded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
import websockets

from tests.support import TransportApp, loopback_agent
from tests.test_bad_audio import CLEAN, Caller, clean_or_garbled
from voicemesh.bus import tracing
from voicemesh.config.models import parse_agent_config
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript

pytestmark = pytest.mark.usefixtures("private_egress")


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    return clean_or_garbled


class Receiver:
    """A loopback OTLP/HTTP collector: keeps every span posted to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == (
                    "application/json"
                )
                if ok:
                    receiver.bodies.append(body)
                    receiver.headers.append(dict(self.headers))
                    for rs in orjson.loads(body)["resourceSpans"]:
                        for ss in rs["scopeSpans"]:
                            receiver.spans.extend(ss["spans"])
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, trace: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["traceId"] == trace]


@pytest.fixture(autouse=True)
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """Before `settings` is made (autouse runs first): every role of the test exports here."""
    receiver = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=collector%20secret")
    yield receiver
    receiver.close()


@pytest.fixture
async def caller(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> AsyncIterator[tuple[Caller, str]]:
    data = loopback_agent(
        agent_json, transport="websocket", stt_url=transcriber.base_url, ms_per_word=20
    )
    sid = (await store.create_session(parse_agent_config(data))).session_id
    url = transport_app.ws("/ws/call")
    async with websockets.connect(f"{url}?session_id={sid}", max_size=None) as ws:
        c = Caller(ws)
        task = asyncio.ensure_future(c.receive())
        await c.wait_for(lambda e: e.get("type") == "session")
        try:
            yield c, sid
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def attr(span: dict[str, Any], key: str) -> Any:
    for a in span["attributes"]:
        if a["key"] == key:
            return next(iter(a["value"].values()))
    return None


async def test_one_turn_is_one_trace_with_a_span_per_phase_and_stage(
    caller: tuple[Caller, str], otlp: Receiver
) -> None:
    c, sid = caller
    assert tracing.enabled()
    started = await c.turn(limit_s=20)
    epoch = started["epoch"]
    metrics = await c.wait_for(lambda e: e.get("type") == "turn_metrics" and e["epoch"] == epoch)
    # the trace id is the one the logs and the caller see, padded to OTel's 128 bits
    trace = "0" * 16 + metrics["trace_id"]
    assert trace == tracing.otel_trace_id(sid, epoch)
    want = {"turn", "eou", "stt", "first_audio", "stt.transcribe", "llm.reply", "tts.sentence"}
    deadline = asyncio.get_running_loop().time() + 10
    while not want <= {s["name"] for s in otlp.of(trace)}:
        assert asyncio.get_running_loop().time() < deadline, [s["name"] for s in otlp.of(trace)]
        await asyncio.sleep(0.1)
    spans = otlp.of(trace)
    [root] = [s for s in spans if s["name"] == "turn"]
    assert "parentSpanId" not in root and root["spanId"] == tracing.root_span_id(sid, epoch)
    children = [s for s in spans if s is not root]
    # the whole tree: every other span of the turn hangs under the transport's root, from
    # whichever role made it, with no trace context on the wire
    assert all(s["parentSpanId"] == root["spanId"] for s in children)
    assert len({s["spanId"] for s in spans}) == len(spans)
    roles = {s["name"]: attr(s, "voicemesh.role") for s in spans}
    assert roles["turn"] == roles["eou"] == "transport"
    assert (roles["stt.transcribe"], roles["llm.reply"], roles["tts.sentence"]) == (
        "stt",
        "llm",
        "tts",
    )
    for s in spans:
        assert int(s["startTimeUnixNano"]) <= int(s["endTimeUnixNano"])
        assert attr(s, "voicemesh.trace_id") == metrics["trace_id"]
        assert s["status"]["code"] == 1  # ok
    by = {s["name"]: s for s in spans}
    # the phases sit inside the turn, in order (one process here: one clock)
    assert int(by["eou"]["endTimeUnixNano"]) <= int(by["stt"]["endTimeUnixNano"])
    assert int(by["first_audio"]["endTimeUnixNano"]) == int(root["endTimeUnixNano"])
    # what was said never leaves in a span; the collector's key goes in a header, decoded
    assert not any(CLEAN.encode() in b for b in otlp.bodies)
    assert otlp.headers[0].get("x-api-key") == "collector secret"


async def test_without_an_endpoint_nothing_is_recorded(
    monkeypatch: pytest.MonkeyPatch, otlp: Receiver
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    assert await tracing.start({}) is False
    assert not tracing.enabled()
    tracing.span("turn", "abcdefgh12", 1, 0, 1, root=True)  # a no-op: nothing to export to
    assert tracing.EXPORTER is None and otlp.spans == []


@pytest.mark.parametrize(
    "env, url",
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/x",
            },
            "https://t/x",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({}, None),
    ],
)
def test_the_endpoint_follows_the_otel_variables(env: dict[str, str], url: str | None) -> None:
    assert tracing.endpoint_from(env) == url


def test_an_endpoint_that_is_not_http_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from voicemesh.config.settings import Settings

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "file:///etc/passwd")
    with pytest.raises(ValueError):
        Settings()


async def test_a_tool_call_is_a_span_of_the_turn(
    services: Any, bus: Any, store: ConfigStore, subjects: Any, agent_json: dict, otlp: Receiver
) -> None:
    """Each tool call is its own span under the turn's root, named after the tool, with its
    status; its arguments (what the caller asked) stay out of it."""
    from tests.support import has_last, listen
    from tests.test_tools import Weather, agent, call, tool
    from voicemesh.bus import Frame
    from voicemesh.pipeline import LLMService
    from voicemesh.tools import serve

    weather = Weather()
    sub = await serve(bus.nc, "tools.weather", weather)
    try:
        config = agent(agent_json, [call(arguments={"city": "Reykjavik"})], [tool()])
        sid = (await store.create_session(config)).session_id
        tts = await listen(bus, subjects.data("tts", sid))
        await services.start(LLMService)
        assert tracing.enabled()
        await bus.publish(subjects.data("llm", sid), Frame.text("weather?", epoch=1))
        await tts.wait_for(has_last)
        trace = tracing.otel_trace_id(sid, 1)
        deadline = asyncio.get_running_loop().time() + 10
        while "tool.get_weather" not in {s["name"] for s in otlp.of(trace)}:
            assert asyncio.get_running_loop().time() < deadline, otlp.spans
            await asyncio.sleep(0.1)
        (span,) = [s for s in otlp.of(trace) if s["name"] == "tool.get_weather"]
        assert span["parentSpanId"] == tracing.root_span_id(sid, 1)
        assert attr(span, "voicemesh.tool.status") == "ok"
        assert not any(b"Reykjavik" in b for b in otlp.bodies)
    finally:
        await sub.unsubscribe()
