"""One turn's latency, as the transport sees it: each phase from the caller's last voiced frame
to the first bot audio sent back, built from what the transport observes itself and the hop
timings the stages report beside the flow (STT's final transcript, the LLM's time to first token
on its first sentence, TTS's time to first byte of the reply, and each tool call's duration).

Tool time is its own phase: each `tool_result` is a span ending when it arrives and lasting its
`duration_ms`; the phase is the union of the spans (parallel calls count once), so the LLM's
time between rounds is not in it. A tool turn's `llm_ttft_ms` (from the LLM stage's start to
its first sentence) contains the tool time when the first words come after the tools.

It is measured in the call because the call is the one place both ends of a turn pass: the
caller's speech going in and the bot's audio going out.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram

from voicemesh.bus import tracing
from voicemesh.bus.events import (
    Event,
    Hop,
    SideEvent,
    ToolResultEvent,
    Transcript,
    TurnMetrics,
    parse_side_event,
)
from voicemesh.bus.subjects import trace_id
from voicemesh.config.stages import Stage

TURN_PHASE = Histogram(
    "voicemesh_turn_phase_seconds",
    "Per-turn latency by phase, measured at the transport: eou (last voiced frame → end of turn "
    "decided), stt (end of turn → final transcript), llm_ttft, tts_ttfb, first_audio (end of turn "
    "→ first bot audio sent), v2v (last voiced frame → first bot audio sent), tool (time in tool "
    "calls before the first bot audio, parallel calls once)",
    ["phase"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.2, 1.5, 2, 3, 5, 10),
)


def _ms(a: float | None, b: float | None) -> float | None:
    return round((b - a) * 1000, 1) if a is not None and b is not None else None


@dataclass
class TurnTrace:
    session: str
    epoch: int
    trace_id: str = ""
    last_voiced: float | None = None
    end_sent: float | None = None
    transcript_at: float | None = None
    llm_ttft_ms: float | None = None
    tts_ttfb_ms: float | None = None
    first_audio: float | None = None
    stt_speculative: bool | None = None
    stt_discarded: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: (start, end) of each tool call, on this process's clock
    tool_spans: list[tuple[float, float]] = field(default_factory=list)
    #: stage → the connector that served this turn there (from the stages' reports)
    connectors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trace_id = trace_id(self.session, self.epoch)

    def voiced(self) -> None:
        self.last_voiced = time.perf_counter()

    def ended(self) -> None:
        self.end_sent = time.perf_counter()

    def audio_out(self) -> bool:
        """Note the first bot audio sent; True the first time."""
        if self.first_audio is not None:
            return False
        self.first_audio = time.perf_counter()
        return True

    def on_event(self, event: SideEvent | Mapping[str, Any]) -> None:
        """Take a stage's report of the turn (a mapping is parsed first: EventError if bad)."""
        match event if isinstance(event, Event) else parse_side_event(event):
            case Transcript(role="user", final=final) as said if final is not False:
                self.transcript_at = self.transcript_at or time.perf_counter()
                self.stt_speculative, self.stt_discarded = said.speculative, said.discarded
                self._served(Stage.STT, said.connector)
            case Transcript(role="assistant", ttft_ms=ttft_ms) as said if ttft_ms is not None:
                self.llm_ttft_ms = ttft_ms
                self._served(Stage.LLM, said.connector)
            case Hop(stage=Stage.TTS, ttfb_ms=ttfb_ms, connector=connector):
                self.tts_ttfb_ms = ttfb_ms
                self._served(Stage.TTS, connector)
            case ToolResultEvent(duration_ms=ms):
                end = time.perf_counter()
                self.tool_spans.append((end - max(ms, 0.0) / 1000, end))

    def _served(self, stage: Stage, connector: str | None) -> None:
        if connector:
            self.connectors[str(stage)] = connector

    @property
    def tool_ms(self) -> float | None:
        """The union of the tool spans, in ms; None when no tool ran."""
        if not self.tool_spans:
            return None
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.tool_spans):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return round(total * 1000, 1)

    def metrics(self) -> TurnMetrics:
        """The turn's phases so far: the caller's `turn_metrics` event."""
        return TurnMetrics(
            epoch=self.epoch,
            trace_id=self.trace_id,
            eou_ms=_ms(self.last_voiced, self.end_sent),
            stt_ms=_ms(self.end_sent, self.transcript_at),
            llm_ttft_ms=self.llm_ttft_ms,
            tts_ttfb_ms=self.tts_ttfb_ms,
            first_audio_ms=_ms(self.end_sent, self.first_audio),
            v2v_ms=_ms(self.last_voiced, self.first_audio),
            stt_speculative=self.stt_speculative,
            stt_discarded=self.stt_discarded,
            tool_ms=self.tool_ms,
            connectors=dict(self.connectors) or None,
        )

    def _spans(self) -> None:
        """The turn's root span and the phases the transport saw (voicemesh/bus/tracing.py)."""
        at = {
            k: tracing.perf_to_unix_ns(v) if v is not None else None
            for k, v in (
                ("voiced", self.last_voiced),
                ("end", self.end_sent),
                ("transcript", self.transcript_at),
                ("audio", self.first_audio),
            )
        }
        start = at["voiced"] or at["end"]
        if start is None or at["audio"] is None:
            return
        attrs = {"voicemesh.role": str(Stage.TRANSPORT)}
        tracing.span("turn", self.session, self.epoch, start, at["audio"], root=True, attrs=attrs)
        for name, a, b in (
            ("eou", at["voiced"], at["end"]),
            ("stt", at["end"], at["transcript"]),  # as the transport waited for it
            ("first_audio", at["end"], at["audio"]),
        ):
            if a is not None and b is not None:
                tracing.span(name, self.session, self.epoch, a, b, attrs=attrs)

    def summary(self) -> dict[str, Any]:
        """`metrics()` as its JSON object."""
        return self.metrics().wire()

    def record(self) -> TurnMetrics:
        """Record the turn in the Prometheus histograms (and, with tracing on, its spans);
        returns its metrics."""
        m = self.metrics()
        if tracing.enabled():
            self._spans()
        for phase, ms in (
            ("eou", m.eou_ms),
            ("stt", m.stt_ms),
            ("llm_ttft", m.llm_ttft_ms),
            ("tts_ttfb", m.tts_ttfb_ms),
            ("first_audio", m.first_audio_ms),
            ("v2v", m.v2v_ms),
            ("tool", m.tool_ms),
        ):
            if ms is not None:
                TURN_PHASE.labels(phase).observe(ms / 1000)
        return m

    def observe(self) -> dict[str, Any]:
        """`record()`, returning the metrics as their JSON object."""
        return self.record().wire()
