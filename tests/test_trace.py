"""Per-turn tracing at the transport: phases from the transport's own clock and the hop timings
the stages report beside the flow; Prometheus histograms; derived trace ids."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from voicemesh.bus.subjects import trace_id
from voicemesh.transport.call.trace import TurnTrace


def count(phase: str) -> float:
    return REGISTRY.get_sample_value("voicemesh_turn_phase_seconds_count", {"phase": phase}) or 0


def test_trace_ids_are_derived_the_same_everywhere_and_differ_per_turn() -> None:
    assert trace_id("abcdefgh12", 3) == trace_id("abcdefgh12", 3)
    assert trace_id("abcdefgh12", 3) != trace_id("abcdefgh12", 4)
    assert len(trace_id("abcdefgh12", 3)) == 16


def test_turn_phases_come_from_the_transport_clock_and_the_hop_reports() -> None:
    trace = TurnTrace("abcdefgh12", 7)
    trace.voiced()
    time.sleep(0.03)
    trace.ended()
    time.sleep(0.02)
    trace.on_event({"type": "transcript", "role": "user", "text": "hi", "final": False})
    assert trace.transcript_at is None  # an interim is not the final transcript
    trace.on_event({"type": "transcript", "role": "user", "text": "hi", "final": True})
    trace.on_event({"type": "transcript", "role": "assistant", "text": "Yo.", "ttft_ms": 42.0})
    trace.on_event({"type": "hop", "stage": "tts", "ttfb_ms": 77.5})
    time.sleep(0.01)
    before = {p: count(p) for p in ("eou", "stt", "llm_ttft", "tts_ttfb", "first_audio", "v2v")}
    assert trace.audio_out() and not trace.audio_out()  # only the first audio counts
    s = trace.observe()
    assert s["type"] == "turn_metrics" and s["epoch"] == 7
    assert s["trace_id"] == trace_id("abcdefgh12", 7)
    assert 25 <= s["eou_ms"] < 100
    assert 15 <= s["stt_ms"] < 100
    assert s["llm_ttft_ms"] == 42.0 and s["tts_ttfb_ms"] == 77.5
    assert s["v2v_ms"] >= s["eou_ms"] + s["stt_ms"]
    assert s["first_audio_ms"] < s["v2v_ms"]
    for phase, n in before.items():
        assert count(phase) == n + 1, phase


def test_a_turn_without_a_reply_leaves_the_missing_phases_empty() -> None:
    trace = TurnTrace("abcdefgh12", 8)
    trace.voiced()
    trace.ended()
    s = trace.summary()
    assert s["stt_ms"] is None and s["v2v_ms"] is None and s["eou_ms"] is not None
