"""A WebRTC load generator: many headless aiortc callers (voicemesh.callers.webrtc) spread over a
few processes, each saying its utterances with pauses and recording when every frame of the bot's
audio reached it. Used by benchmarks/bench_transport_capacity.py to find how many calls one
transport process holds.

Why processes: one caller costs about what one call costs the transport (Opus both ways, SRTP,
the jitter buffer), so N callers in the benchmark's own event loop would saturate before the
transport does, and their lateness would be blamed on it. Each worker is a spawned interpreter
(aiortc and PyAV are not fork-safe) that reports its CPU so a reader can tell whether the callers
were the limit.

The bot's stream is continuous over WebRTC (silence between replies), one frame per 20 ms, so
what a caller hears can be checked without knowing what was sent: in any window, the frames
received against the window's length tell drops, and each gap between two frames against 20 ms
is the inter-arrival jitter (RFC 3550's D(i-1, i)) of the audio out of the caller's own jitter
buffer, i.e. the lateness a player with that buffer would have to absorb.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS

FRAME_S = FRAME_MS / 1000


@dataclass
class CallSpec:
    index: int
    wavs: list[str]
    #: time.monotonic() at which to dial (CLOCK_MONOTONIC is one clock for every process here)
    start_at: float


@dataclass
class CallStats:
    index: int
    #: time.monotonic() of every bot frame as it came out of the caller's jitter buffer
    arrivals: list[float] = field(default_factory=list)
    #: RTP packets lost (RTCP): of the caller's audio as the transport reported it, and of the
    #: bot's as the caller's receiver counted them; None when no report came
    lost_inbound: int | None = None
    lost_outbound: int | None = None
    v2v_ms: list[float] = field(default_factory=list)
    turns: int = 0
    answered: int = 0
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0


async def one_call(
    url: str, agent: str, spec: CallSpec, *, turn_timeout: float, pause_s: float
) -> CallStats:
    from voicemesh.callers.webrtc import call_over_webrtc

    stats = CallStats(spec.index, turns=len(spec.wavs))
    wavs = [Path(w) for w in spec.wavs]
    arrivals = stats.arrivals

    def on_audio(_t: float, _pcm: bytes) -> None:
        arrivals.append(time.monotonic())

    def on_stats(report: Any) -> None:
        for entry in report.values():
            if entry.type == "remote-inbound-rtp":  # the transport's receiver, by RTCP
                stats.lost_inbound = (stats.lost_inbound or 0) + entry.packetsLost
            elif entry.type == "inbound-rtp":
                stats.lost_outbound = (stats.lost_outbound or 0) + entry.packetsLost

    delay = spec.start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    stats.started = time.monotonic()
    try:
        # a call that hangs (a peer that never closes) is one failed call, not a lost step
        result = await asyncio.wait_for(
            call_over_webrtc(
                url,
                wavs,
                None,
                agent=agent,
                turn_timeout=turn_timeout,
                pause_s=pause_s,
                on_audio=on_audio,
                on_stats=on_stats,
                inline_codec=True,
            ),
            len(wavs) * turn_timeout + 30,
        )
        stats.v2v_ms = [t.latency_ms for t in result.turns if t.latency_ms is not None]
        stats.answered = len(stats.v2v_ms)
    except Exception as exc:  # one failed call is a result, not the end of the step
        stats.error = repr(exc)[:300]
    stats.ended = time.monotonic()
    return stats


#: how often a caller process checks how late its own event loop runs
LAG_PERIOD_S = 0.01


async def _watch_lag(lags: list[tuple[float, float]]) -> None:
    """(when, ms late) of a 10 ms sleep, all along: a caller process whose loop runs late hears
    the bot's frames late, and that is its own jitter, not the transport's."""
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(LAG_PERIOD_S)
        t1 = time.monotonic()
        lags.append((t1, (t1 - t0 - LAG_PERIOD_S) * 1000))


async def _calls(
    url: str, agent: str, specs: list[CallSpec], turn_timeout: float, pause_s: float
) -> tuple[list[CallStats], list[tuple[float, float]]]:
    lags: list[tuple[float, float]] = []
    watcher = asyncio.create_task(_watch_lag(lags))
    stats = await asyncio.gather(
        *(one_call(url, agent, s, turn_timeout=turn_timeout, pause_s=pause_s) for s in specs)
    )
    watcher.cancel()
    return list(stats), lags


def worker(conn: Connection, cpus: list[int] | None) -> None:
    """A caller process: pin, import, say ready, take (url, agent, specs, timeouts), run the
    calls, send back their stats as dicts."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    import logging

    logging.basicConfig(level=logging.WARNING)
    # aiortc logs every ICE pair it drops at INFO; quiet it below our own warnings
    import voicemesh.callers.webrtc  # noqa: F401  (the slow imports, before "ready")

    conn.send("ready")
    url, agent, specs, turn_timeout, pause_s = conn.recv()
    # if this process hangs past its budget, say where (stderr) before the parent gives up on it
    import faulthandler

    faulthandler.dump_traceback_later(len(specs[0].wavs) * turn_timeout + 50 if specs else 60)
    _prepare({w for spec in specs for w in spec.wavs})
    stats, lags = asyncio.run(_calls(url, agent, specs, turn_timeout, pause_s))
    conn.send(([asdict(s) for s in stats], lags))
    conn.close()


def _prepare(wavs: set[str]) -> None:
    """Find each utterance's last voiced frame now (Script.speak asks for it at every turn, and
    it is cached): Silero over a whole utterance stalls the loop of every call in the process."""
    from voicemesh.callers.script import last_voiced_frame, load_pcm16

    for wav in wavs:
        pcm = load_pcm16(Path(wav))
        last_voiced_frame(pcm + bytes(-len(pcm) % FRAME_BYTES))  # padded as Script.speak pads


class CallerPool:
    """`procs` caller processes, started and imported ahead of a step so that dialling is on
    time; one use each (`run`), then they exit."""

    def __init__(self, procs: int, cpus: list[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(child, cpus), daemon=True)
            p.start()
            child.close()
            self._pipes.append(parent)
            self.procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def wait_ready(self, timeout: float = 60.0) -> None:
        for pipe in self._pipes:
            if not pipe.poll(timeout) or pipe.recv() != "ready":
                raise RuntimeError("a caller process did not start")

    def dial(
        self, url: str, agent: str, specs: list[CallSpec], turn_timeout: float, pause_s: float
    ) -> None:
        """Hand the calls out round-robin; they dial at their own start_at."""
        for i, pipe in enumerate(self._pipes):
            mine = specs[i :: len(self._pipes)]
            pipe.send((url, agent, mine, turn_timeout, pause_s))

    def results(self, timeout: float) -> tuple[list[CallStats], list[tuple[float, float]]]:
        """Every call's stats, and every caller process's loop lag samples (when, ms late)."""
        out: list[CallStats] = []
        lags: list[tuple[float, float]] = []
        for pipe in self._pipes:
            if not pipe.poll(timeout):
                raise RuntimeError("a caller process gave no result in time")
            stats, lag = pipe.recv()
            out += [CallStats(**d) for d in stats]
            lags += lag
        return sorted(out, key=lambda s: s.index), lags

    def close(self) -> None:
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


@dataclass
class Heard:
    """What the callers heard inside one window, over all calls."""

    calls: int
    frames: int
    expected: int
    dropped: int
    #: calls with at least one frame missing in the window
    calls_dropping: int
    jitter_p50_ms: float | None
    jitter_p99_ms: float | None
    jitter_max_ms: float | None
    #: RTP packets lost over whole calls (RTCP), caller → transport and transport → caller
    lost_inbound: int
    lost_outbound: int
    v2v_p50_ms: float | None
    v2v_p95_ms: float | None
    errors: list[str]


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values.size else None


def heard_in(stats: list[CallStats], start: float, end: float) -> Heard:
    """Frames, drops and jitter of every call between `start` and `end` (time.monotonic())."""
    jitters: list[np.ndarray] = []
    frames = expected = dropped = dropping = 0
    for s in stats:
        a = np.asarray(s.arrivals, dtype=np.float64)
        a = a[(a >= start) & (a <= end)]
        if a.size < 2:
            continue
        want = round(float(a[-1] - a[0]) / FRAME_S) + 1
        lost = max(0, want - a.size)
        frames, expected, dropped = frames + a.size, expected + want, dropped + lost
        dropping += lost > 0
        jitters.append(np.abs(np.diff(a) - FRAME_S) * 1000)
    j = np.concatenate(jitters) if jitters else np.zeros(0)
    v2v = np.asarray([v for s in stats for v in s.v2v_ms], dtype=np.float64)
    return Heard(
        calls=len(stats),
        frames=frames,
        expected=expected,
        dropped=dropped,
        calls_dropping=dropping,
        jitter_p50_ms=_pct(j, 50),
        jitter_p99_ms=_pct(j, 99),
        jitter_max_ms=round(float(j.max()), 2) if j.size else None,
        lost_inbound=sum(s.lost_inbound or 0 for s in stats),
        lost_outbound=sum(s.lost_outbound or 0 for s in stats),
        v2v_p50_ms=_pct(v2v, 50),
        v2v_p95_ms=_pct(v2v, 95),
        errors=[f"call {s.index}: {s.error}" for s in stats if s.error],
    )


def lag_p99(lags: list[tuple[float, float]], start: float, end: float) -> float | None:
    """p99 of how late the caller processes' loops ran between `start` and `end` (ms)."""
    inside = np.asarray([ms for t, ms in lags if start <= t <= end], dtype=np.float64)
    return _pct(inside, 99)


def window(stats: list[CallStats], *, settle_s: float) -> tuple[float, float]:
    """Every call up (the last one dialled plus `settle_s`) until the first call ends: the span
    in which the transport carried all of them."""
    started = [s.started for s in stats if s.started]
    ended = [s.ended for s in stats if s.ended and s.error is None] or [
        s.ended for s in stats if s.ended
    ]
    if not started or not ended:
        return (math.inf, -math.inf)
    return max(started) + settle_s, min(ended) - 0.5
