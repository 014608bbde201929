"""One turn's latency, as the transport sees it: each phase from the caller's last voiced frame
to the first bot audio sent back, built from what the transport observes itself and the hop
timings the stages report beside the flow (STT's final transcript, the LLM's time to first token
on its first sentence, TTS's time to first byte of the reply).

It is measured in the call because the call is the one place both ends of a turn pass: the
caller's speech going in and the bot's audio going out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram

from voicemesh.bus.subjects import trace_id

TURN_PHASE = Histogram(
    "voicemesh_turn_phase_seconds",
    "Per-turn latency by phase, measured at the transport: eou (last voiced frame → end of turn "
    "decided), stt (end of turn → final transcript), llm_ttft, tts_ttfb, first_audio (end of turn "
    "→ first bot audio sent), v2v (last voiced frame → first bot audio sent)",
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
    extra: dict[str, Any] = field(default_factory=dict)

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

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "transcript" and event.get("role") == "user" and event.get("final", True):
            self.transcript_at = self.transcript_at or time.perf_counter()
        elif kind == "transcript" and event.get("role") == "assistant" and "ttft_ms" in event:
            self.llm_ttft_ms = event["ttft_ms"]
        elif kind == "hop" and event.get("stage") == "tts":
            self.tts_ttfb_ms = event.get("ttfb_ms")

    def summary(self) -> dict[str, Any]:
        return {
            "type": "turn_metrics",
            "epoch": self.epoch,
            "trace_id": self.trace_id,
            "eou_ms": _ms(self.last_voiced, self.end_sent),
            "stt_ms": _ms(self.end_sent, self.transcript_at),
            "llm_ttft_ms": self.llm_ttft_ms,
            "tts_ttfb_ms": self.tts_ttfb_ms,
            "first_audio_ms": _ms(self.end_sent, self.first_audio),
            "v2v_ms": _ms(self.last_voiced, self.first_audio),
        }

    def observe(self) -> dict[str, Any]:
        """Record the turn in the Prometheus histograms; returns the summary."""
        s = self.summary()
        for phase, key in (
            ("eou", "eou_ms"),
            ("stt", "stt_ms"),
            ("llm_ttft", "llm_ttft_ms"),
            ("tts_ttfb", "tts_ttfb_ms"),
            ("first_audio", "first_audio_ms"),
            ("v2v", "v2v_ms"),
        ):
            if s[key] is not None:
                TURN_PHASE.labels(phase).observe(s[key] / 1000)
        return s
