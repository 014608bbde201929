"""The typed events (voicemesh/bus/events.py): each model gives exactly the JSON the code sent
before it existed, bad events are refused with a message naming the problem, receivers drop them
with a warning, and docs/wire-protocol.md's examples are events of their channel."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from voicemesh.bus import Frame
from voicemesh.bus.events import (
    CHANNELS,
    BotDone,
    BotStarted,
    CallEnd,
    End,
    ErrorEvent,
    Event,
    EventError,
    HangUp,
    Hop,
    Interrupt,
    Interrupted,
    Session,
    ToolCallEvent,
    ToolResultEvent,
    Transcript,
    Turn,
    TurnEnded,
    TurnMetrics,
    TurnStarted,
    UserStopped,
    WarningEvent,
    parse_caller_control,
    parse_caller_event,
    parse_ctl_event,
    parse_side_event,
)
from voicemesh.config.stages import STAGES, Stage
from voicemesh.pipeline.base import StageService
from voicemesh.transport.call.trace import TurnTrace

ROOT = Path(__file__).resolve().parents[1]

# Each model beside the dict literal its producer built before the models (same keys, same order).
WIRE: list[tuple[Event, dict[str, Any]]] = [
    (
        Session(session_id="Ka1OD9cF3nfRToHywZBJVQ", version=3),
        {"type": "session", "session_id": "Ka1OD9cF3nfRToHywZBJVQ", "version": 3},
    ),
    (TurnStarted(epoch=3), {"type": "turn", "epoch": 3}),
    (TurnStarted(epoch=4, continues=3), {"type": "turn", "epoch": 4, "continues": 3}),
    (UserStopped(epoch=3), {"type": "user_stopped", "epoch": 3}),
    (  # stt: an interim transcript
        Transcript(role="user", text="What", epoch=3, final=False, connector="deepgram"),
        {
            "type": "transcript",
            "role": "user",
            "text": "What",
            "epoch": 3,
            "final": False,
            "connector": "deepgram",
        },
    ),
    (  # stt: the final transcript (connector "" when every connector failed)
        Transcript(role="user", text="", epoch=3, final=True, connector="", stt_ms=352.4),
        {
            "type": "transcript",
            "role": "user",
            "text": "",
            "epoch": 3,
            "final": True,
            "connector": "",
            "stt_ms": 352.4,
        },
    ),
    (  # llm: the first sentence carries ttft_ms...
        Transcript(
            role="assistant", text="Paris.", epoch=3, index=0, connector="smollm2", ttft_ms=96.2
        ),
        {
            "type": "transcript",
            "role": "assistant",
            "text": "Paris.",
            "epoch": 3,
            "index": 0,
            "connector": "smollm2",
            "ttft_ms": 96.2,
        },
    ),
    (  # ...the others do not
        Transcript(role="assistant", text="Yes.", epoch=3, index=1, connector="smollm2"),
        {
            "type": "transcript",
            "role": "assistant",
            "text": "Yes.",
            "epoch": 3,
            "index": 1,
            "connector": "smollm2",
        },
    ),
    (
        Hop(stage=Stage.TTS, epoch=3, ttfb_ms=131.0),
        {"type": "hop", "stage": "tts", "epoch": 3, "ttfb_ms": 131.0},
    ),
    (BotStarted(epoch=3, latency_ms=None), {"type": "bot_started", "epoch": 3, "latency_ms": None}),
    (
        TurnMetrics(
            epoch=3,
            trace_id="5c0f54d3a0e1b2c4",
            eou_ms=301.2,
            stt_ms=352.4,
            llm_ttft_ms=96.2,
            tts_ttfb_ms=None,
            first_audio_ms=611.3,
            v2v_ms=912.5,
        ),
        {
            "type": "turn_metrics",
            "epoch": 3,
            "trace_id": "5c0f54d3a0e1b2c4",
            "eou_ms": 301.2,
            "stt_ms": 352.4,
            "llm_ttft_ms": 96.2,
            "tts_ttfb_ms": None,
            "first_audio_ms": 611.3,
            "v2v_ms": 912.5,
        },
    ),
    (BotDone(epoch=3), {"type": "bot_done", "epoch": 3}),
    (
        Interrupted(epoch=3, heard="The capital"),
        {"type": "interrupted", "epoch": 3, "heard": "The capital"},
    ),
    (ErrorEvent(error="boom", epoch=3), {"type": "error", "error": "boom", "epoch": 3}),
    (ErrorEvent(error="the call failed: x"), {"type": "error", "error": "the call failed: x"}),
    (
        ErrorEvent(error="no llm instance is running", stage=Stage.LLM, epoch=3),
        {"type": "error", "error": "no llm instance is running", "stage": "llm", "epoch": 3},
    ),
    (
        ErrorEvent(error="too many", retry_after_s=12),
        {"type": "error", "error": "too many", "retry_after_s": 12},
    ),
    (  # llm: a reply cut at VOICEMESH_MAX_REPLY_CHARS; the turn ends normally
        WarningEvent(code="reply_truncated", message="cut", stage=Stage.LLM, epoch=3),
        {
            "type": "warning",
            "code": "reply_truncated",
            "message": "cut",
            "stage": "llm",
            "epoch": 3,
        },
    ),
    (  # llm: a tool call of turn 3 (issue 15)
        ToolCallEvent(
            epoch=3, call_id="call_0_0", name="get_weather", arguments='{"city":"Paris"}'
        ),
        {
            "type": "tool_call",
            "epoch": 3,
            "call_id": "call_0_0",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
    ),
    (
        ToolResultEvent(
            epoch=3,
            call_id="call_0_0",
            name="get_weather",
            status="timeout",
            duration_ms=5000.4,
            error="timeout",
        ),
        {
            "type": "tool_result",
            "epoch": 3,
            "call_id": "call_0_0",
            "name": "get_weather",
            "status": "timeout",
            "duration_ms": 5000.4,
            "error": "timeout",
        },
    ),
    (  # llm: end_call was called in turn 3 (issue 15)
        HangUp(epoch=3),
        {"type": "hang_up", "epoch": 3},
    ),
    (  # a turn with tool time (issue 15): tool_ms only when a tool ran
        TurnMetrics(
            epoch=3,
            trace_id="5c0f54d3a0e1b2c4",
            eou_ms=301.2,
            stt_ms=352.4,
            llm_ttft_ms=1496.2,
            tts_ttfb_ms=131.0,
            first_audio_ms=2011.3,
            v2v_ms=2312.5,
            tool_ms=1380.2,
        ),
        {
            "type": "turn_metrics",
            "epoch": 3,
            "trace_id": "5c0f54d3a0e1b2c4",
            "eou_ms": 301.2,
            "stt_ms": 352.4,
            "llm_ttft_ms": 1496.2,
            "tts_ttfb_ms": 131.0,
            "first_audio_ms": 2011.3,
            "v2v_ms": 2312.5,
            "tool_ms": 1380.2,
        },
    ),
    (Turn(epoch=4), {"type": "turn", "epoch": 4}),
    (Interrupt(epoch=4, interrupted=3), {"type": "interrupt", "epoch": 4, "interrupted": 3}),
    (TurnEnded(epoch=4), {"type": "turn_ended", "epoch": 4}),
    (End(), {"type": "end"}),
    (CallEnd(), {"type": "call_end"}),
]

PARSERS: dict[str, Callable[[Any], Event]] = {
    "caller": parse_caller_event,
    "caller control": parse_caller_control,
    "side": parse_side_event,
    "ctl": parse_ctl_event,
}


def channels_of(model: type[Event]) -> list[str]:
    return [name for name, models in CHANNELS.items() if model in models]


@pytest.mark.parametrize(("event", "body"), WIRE, ids=lambda v: getattr(v, "type", ""))
def test_each_model_gives_exactly_the_json_sent_before(event: Event, body: dict[str, Any]) -> None:
    assert event.wire_json() == orjson.dumps(body)  # same keys, same order, same values
    assert list(event.wire().items()) == list(body.items())
    assert orjson.dumps(Frame.event(event).as_event) == orjson.dumps(body)
    for channel in channels_of(type(event)):
        parse = PARSERS[channel]
        assert parse(body) == event
        assert parse(orjson.dumps(body)) == event
        assert parse(orjson.dumps(body).decode()).wire_json() == orjson.dumps(body)


def test_every_model_is_covered_and_on_a_channel() -> None:
    models = {m for ms in CHANNELS.values() for m in ms}
    assert {type(e) for e, _ in WIRE} == models
    assert all(channels_of(m) for m in models)


def test_turn_metrics_from_the_trace_keep_their_nulls() -> None:
    trace = TurnTrace("abcdefgh12", 5)
    trace.voiced()
    body = trace.summary()
    # every phase is sent, null when unknown; speculative STT's two fields only when it was at work
    optional = {"stt_speculative", "stt_discarded", "tool_ms", "connectors"}
    assert list(body) == [f for f in TurnMetrics.model_fields if f not in optional]
    assert body["type"] == "turn_metrics" and body["v2v_ms"] is None
    assert trace.metrics().wire_json() == orjson.dumps(body)


def test_turn_metrics_name_the_connector_that_served_each_stage() -> None:
    """The console's "serving" column: the final user transcript's, the first reply sentence's
    and the TTS hop's connector, a fallback included; interim transcripts do not count."""
    trace = TurnTrace("abcdefgh12", 5)
    trace.on_event({"type": "transcript", "role": "user", "text": "hi", "final": False,
                    "connector": "deepgram"})  # fmt: skip
    assert "connectors" not in trace.summary()  # none served yet: the field is left out
    trace.on_event({"type": "transcript", "role": "user", "text": "hi", "final": True,
                    "connector": "whisper"})  # fmt: skip
    trace.on_event({"type": "transcript", "role": "assistant", "text": "Hello.", "index": 0,
                    "connector": "scripted", "ttft_ms": 3.0})  # fmt: skip
    trace.on_event({"type": "hop", "stage": "tts", "ttfb_ms": 9.0, "connector": "tone"})
    assert trace.summary()["connectors"] == {"stt": "whisper", "llm": "scripted", "tts": "tone"}


def test_tool_time_is_a_phase_of_the_trace_with_parallel_calls_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each tool_result is a span ending on arrival and lasting its duration_ms: two parallel
    calls (400 ms and 300 ms, overlapping) and a later one (100 ms) make 500 ms of tool time,
    not 800; the LLM's time between the rounds is not in it; the histogram gets a tool phase."""
    import voicemesh.transport.call.trace as trace_mod

    clock = iter([10.4, 10.4, 11.0])
    monkeypatch.setattr(trace_mod.time, "perf_counter", lambda: next(clock))
    trace = TurnTrace("abcdefgh12", 5)
    assert trace.metrics().tool_ms is None and "tool_ms" not in trace.summary()
    for ms in (400.0, 300.0, 100.0):
        trace.on_event(ToolResultEvent(epoch=5, call_id="c", name="t", status="ok", duration_ms=ms))
    assert trace.metrics().tool_ms == 500.0
    before = trace_mod.TURN_PHASE.labels("tool")._sum.get()
    trace.record()
    assert trace_mod.TURN_PHASE.labels("tool")._sum.get() - before == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("parse", "data", "says"),
    [
        (parse_ctl_event, b'{"type": "hangup"}', "unknown type 'hangup'; ctl events are 'turn'"),
        (parse_side_event, {"type": "session"}, "unknown type 'session'; side events are"),
        (parse_caller_event, {"type": "interrupt"}, "unknown type 'interrupt'"),
        (parse_caller_control, '{"type": "stop"}', "type must be 'end'"),
        (parse_ctl_event, b'{"epoch": 3}', "no 'type' field"),
        (parse_caller_control, {"kind": "end"}, "no 'type' field"),
        (parse_caller_control, b"[1]", "not a JSON object"),
        (parse_caller_control, b"end", "not JSON"),
        (parse_ctl_event, b"[1, 2]", "not a JSON object"),
        (parse_ctl_event, b"{oops", "not JSON"),
        (parse_ctl_event, {"type": "turn", "epoch": "x"}, "turn event: epoch: Input should be"),
        (parse_side_event, {"type": "transcript", "role": "user"}, "transcript event: text:"),
        (parse_side_event, {"type": "transcript", "role": "bot", "text": "hi"}, "role:"),
        (
            parse_side_event,
            {"type": "hop", "stage": "camera", "ttfb_ms": 1.0},
            "hop event: stage: Input should be 'transport', 'stt', 'llm' or 'tts'",
        ),
        (parse_caller_event, {"type": "bot_done"}, "bot_done event: epoch: Field required"),
        (parse_caller_event, {"type": "error", "epoch": 2}, "error event: error: Field required"),
    ],
)
def test_bad_events_are_refused_with_what_is_wrong(
    parse: Callable[[Any], Event], data: Any, says: str
) -> None:
    with pytest.raises(EventError) as caught:
        parse(data)
    assert says in str(caught.value)
    assert str(caught.value).startswith("bad ")


def test_receivers_are_lenient_where_they_always_were() -> None:
    # unknown fields are ignored; the body's epoch of a ctl turn may be missing (frame's is used)
    assert parse_ctl_event({"type": "turn", "future": 1}) == Turn()
    assert parse_caller_control({"type": "end", "reason": "bye"}) == End()
    # a transcript without epoch or connector (the frame header carries the turn)
    event = parse_side_event({"type": "transcript", "role": "user", "text": "hi"})
    assert event.wire() == {"type": "transcript", "role": "user", "text": "hi"}


class _Stage:
    """Just what StageService._on_ctl touches."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.ended: list[str] = []

    def current(self, session: str, epoch: int) -> bool:
        self.seen.append((session, epoch))
        return True

    async def session_ended(self, session: str) -> None:
        self.ended.append(session)


async def test_a_stage_drops_a_bad_ctl_event_with_a_warning(caplog: Any) -> None:
    stage = _Stage()
    subject = "vm.ctl.abcdefgh12"
    on_ctl = StageService._on_ctl
    with caplog.at_level(logging.WARNING, logger="voicemesh.pipeline.base"):
        await on_ctl(stage, subject, Frame.event({"type": "turn", "epoch": "soon"}))  # type: ignore[arg-type]
        await on_ctl(stage, subject, Frame.event({"type": "reboot"}))  # type: ignore[arg-type]
    assert stage.seen == [] and stage.ended == []
    assert "epoch" in caplog.text and "unknown type 'reboot'" in caplog.text
    await on_ctl(stage, subject, Frame.event(Turn(), epoch=7))  # type: ignore[arg-type]
    await on_ctl(stage, subject, Frame.event(Interrupt(epoch=9, interrupted=8), epoch=8))  # type: ignore[arg-type]
    await on_ctl(stage, subject, Frame.event(CallEnd()))  # type: ignore[arg-type]
    assert stage.seen == [("abcdefgh12", 7), ("abcdefgh12", 9)]
    assert stage.ended == ["abcdefgh12"]


def test_stage_names_compare_and_format_as_the_bare_names() -> None:
    assert Stage.STT == "stt" and f"vm.{Stage.LLM}.x" == "vm.llm.x"
    assert ", ".join(STAGES) == "transport, stt, llm, tts"
    assert orjson.dumps({"s": Stage.TTS}) == b'{"s":"tts"}'


# --- docs/wire-protocol.md and the README say the same -------------------------------------

DOC_SECTIONS = {
    "### Transcript events beside the flow": "side",
    "## Events to the caller": "caller",
    "### From the caller": "caller control",
    "## Control events: `vm.ctl.<sid>`": "ctl",
}


def doc_examples() -> dict[str, list[dict[str, Any]]]:
    """The JSON objects of each event section's ```json blocks, by channel."""
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in DOC_SECTIONS.values()}
    channel = None
    in_block = False
    block: list[str] = []
    for line in (ROOT / "docs" / "wire-protocol.md").read_text().splitlines():
        if line.startswith("#") and not in_block:
            channel = DOC_SECTIONS.get(line.strip())
        elif line.startswith("```"):
            if in_block and channel is not None:
                text, decoder, at = "\n".join(block), json.JSONDecoder(), 0
                while (at := len(text) - len(text[at:].lstrip())) < len(text):
                    obj, at = decoder.raw_decode(text, at)
                    found[channel].append(obj)
            in_block, block = line.strip() == "```json" and not in_block, []
        elif in_block:
            block.append(line)
    return found


def test_every_json_example_in_the_doc_is_an_event_of_its_channel() -> None:
    examples = doc_examples()
    for channel, objects in examples.items():
        assert objects, f"no JSON examples for the {channel} channel in docs/wire-protocol.md"
        for obj in objects:
            event = PARSERS[channel](obj)
            # exactly what a producer sends: no field the model would drop or add
            assert list(event.wire().items()) == list(obj.items()), obj


def test_every_event_model_is_in_the_doc_and_the_readme() -> None:
    examples = doc_examples()
    readme = (ROOT / "README.md").read_text()
    for channel, models in CHANNELS.items():
        shown = {obj["type"] for obj in examples[channel]}
        for model in models:
            kind = model.model_fields["type"].default
            assert kind in shown, f"{channel} event {kind!r} has no example in the doc"
            if channel == "caller":
                assert re.search(rf"^\| `{kind}` \|", readme, re.M), f"{kind!r} not in README"
