"""Overload: calls past a transport's limit are refused cleanly, and the calls it carries keep
their latency (issue 14, self-protection).

One stack (every role its own process, `passthrough` stages, so the transport's own work is what
is measured) with the transport's `VOICEMESH_MAX_CALLS` = `--calls` (K). K aiortc callers
(voicemesh/callers/webrtc.py, in this process) hold calls to the default agent for the whole run,
saying the shipped voices' finished utterances one after another; the passthrough flow echoes
each turn back. Measured per admitted call, by phase:

- playout gaps: the time between consecutive audio frames the caller receives (the transport
  sends a 20 ms frame every 20 ms, speech or silence, so a gap past 20 ms is the transport, or the
  caller, falling behind); p50/p99/max over every frame;
- turn latency: the caller's last voiced frame to the first audible echo (end of turn included);
- the transport process's CPU seconds.

Phases of `--phase-s` seconds: *before* (the K calls alone), *during* (a flood of new call
attempts at `--flood-rate` a second, WebRTC offers and WebSocket connects alternating, open
loop) and *after*. Every attempt must be refused: 503 with Retry-After for an offer, an `error`
event then close 1013 for a WebSocket; any other outcome is counted, and an attempt let in is
"admitted beyond K" (must be 0). The transport's `/readyz` is read at the end of each phase.

    .venv/bin/python benchmarks/bench_overload.py [--calls 6] [--phase-s 20] [--flood-rate 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_calls_capacity import finished_voices  # noqa: E402
from voicemesh.bench.harness import (  # noqa: E402
    PREFIX,
    cpu_seconds,
    machine,
    passthrough_config,
    stack_env,
)
from voicemesh.bench.report import percentile  # noqa: E402
from voicemesh.callers.script import TurnResult  # noqa: E402
from voicemesh.callers.webrtc import call_over_webrtc  # noqa: E402
from voicemesh.callers.websocket import ws_url  # noqa: E402
from voicemesh.launcher import Stack  # noqa: E402
from voicemesh.servers import free_port, start_nats, start_valkey  # noqa: E402
from voicemesh.state import ConfigStore  # noqa: E402
from voicemesh.transport.api.capacity import WS_AT_CAPACITY  # noqa: E402

PHASES = ("before", "during", "after")
FRAME_MS = 20.0


def log(msg: str) -> None:
    print(f"bench_overload: {msg}", file=sys.stderr, flush=True)


class Record:
    """What the admitted callers heard, stamped so each sample falls in its phase."""

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []  # (arrival, ms since the caller's last frame)
        self.turns: list[tuple[float, float]] = []  # (turn done, latency ms)
        self.last: dict[int, float] = {}
        self.failed: list[str] = []

    def audio(self, caller: int) -> Any:
        def heard(t: float, _: bytes) -> None:
            if (before := self.last.get(caller)) is not None:
                self.gaps.append((t, (t - before) * 1000))
            self.last[caller] = t

        return heard

    async def turn(self, _: int, result: TurnResult) -> None:
        if result.latency_ms is not None:
            self.turns.append((time.perf_counter(), result.latency_ms))


async def sample_offer(extra_candidates: int) -> str:
    """A real offer of an aiortc caller (audio sendrecv, its ICE candidates), sent as is by
    every flooding attempt: what a caller's first request costs the transport to refuse. With
    `extra_candidates`, padded with that many more host candidates (a hostile caller's offer,
    still within the offer's 100 000-character limit at ~1500)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
    finally:
        await pc.close()
    padding = "".join(
        f"a=candidate:{i} 1 udp 2130706431 10.0.{i // 250}.{i % 250} {1024 + i} typ host\r\n"
        for i in range(extra_candidates)
    )
    return sdp + padding


class Flood:
    """New call attempts at a fixed rate, open loop, each classified by how it was refused."""

    def __init__(self, url: str, sdp: str, rate: float):
        self.url, self.sdp, self.rate = url, sdp, rate
        self.outcomes: Counter[str] = Counter()
        self.admitted = 0
        self.ms: dict[str, list[float]] = {"offer": [], "websocket": []}

    async def offer(self, http: httpx.AsyncClient) -> None:
        t = time.perf_counter()
        try:
            r = await http.post("/api/offer", json={"sdp": self.sdp, "type": "offer"})
        except httpx.HTTPError as exc:
            self.outcomes[f"offer: {type(exc).__name__}"] += 1
            return
        self.ms["offer"].append((time.perf_counter() - t) * 1000)
        if r.status_code == 503 and r.headers.get("retry-after"):
            self.outcomes["offer: 503 + Retry-After"] += 1
        else:
            self.outcomes[f"offer: {r.status_code}"] += 1
            if r.status_code == 200:
                self.admitted += 1

    async def websocket(self) -> None:
        t = time.perf_counter()
        try:
            async with websockets.connect(ws_url(self.url), open_timeout=10) as ws:
                first = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                if first.get("type") != "error":
                    self.admitted += 1
                    self.outcomes[f"websocket: admitted ({first.get('type')})"] += 1
                    return
                try:
                    await asyncio.wait_for(ws.recv(), 10)
                    self.outcomes["websocket: not closed after the error"] += 1
                except websockets.ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd is not None else None
                    retry = first.get("retry_after_s")
                    label = (
                        "close 1013 + retry_after_s" if code == WS_AT_CAPACITY and retry else code
                    )
                    self.outcomes[f"websocket: {label}"] += 1
                    self.ms["websocket"].append((time.perf_counter() - t) * 1000)
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            self.outcomes[f"websocket: {type(exc).__name__}"] += 1

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        tasks: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=self.url, timeout=15, limits=limits) as http:
            while (due := start + n / self.rate) < start + seconds:
                await asyncio.sleep(max(0.0, due - loop.time()))
                attempt = self.offer(http) if n % 2 == 0 else self.websocket()
                task = asyncio.ensure_future(attempt)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            await asyncio.gather(*tasks, return_exceptions=True)


class FloodProcess:
    """The flood from a process of its own: its HTTP and WebSocket work must not slow the
    admitted callers, whose timing is what is measured. Started ahead of its phase (imports, the
    sample offer), it floods when told to."""

    def __init__(self, url: str, args: argparse.Namespace):
        self.url, self.args = url, args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        a = self.args
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, __file__, "--flood", self.url, "--phase-s", str(a.phase_s)),
            *("--flood-rate", str(a.flood_rate), "--offer-candidates", str(a.offer_candidates)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if (await self.proc.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the flood process did not start")

    async def run(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        out, _ = await self.proc.communicate()
        if self.proc.returncode:
            raise RuntimeError(f"the flood process failed ({self.proc.returncode})")
        result: dict[str, Any] = json.loads(out)
        return result


async def flood_here(url: str, args: argparse.Namespace) -> dict[str, Any]:
    flood = Flood(url, await sample_offer(args.offer_candidates), args.flood_rate)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await flood.run(args.phase_s)
    return {
        "attempts": sum(flood.outcomes.values()),
        "outcomes": dict(flood.outcomes),
        "admitted_beyond_limit": flood.admitted,
        "refusal_ms": {k: summary(v) for k, v in flood.ms.items()},
    }


def summary(values: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": _r(percentile(values, 50)),
        "p99": _r(percentile(values, 99)),
        "max": _r(max(values) if values else None),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


async def readyz(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        r = await http.get("/readyz")
        return {**r.json(), "http": r.status_code}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="voicemesh-overload-"))
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    env = stack_env(
        nats_srv.url,
        valkey_srv.url,
        VOICEMESH_MAX_CALLS=str(args.calls),
        VOICEMESH_WEBRTC_LOOPBACK="1",
    )
    store = ConfigStore.from_url(valkey_srv.url, key_prefix=PREFIX)
    await store.ensure_default_agent("local", passthrough_config())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(env, http_port=port)
    record, callers = Record(), []
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["benchmarks/bench_overload.py", *sys.argv[1:]]),
        "load_before": os.getloadavg(),
        "calls": args.calls,
        "phase_s": args.phase_s,
        "flood_rate": args.flood_rate,
        "offer_candidates": args.offer_candidates,
    }
    try:
        stack.start()
        log("starting the stack (passthrough stages)...")
        await stack.wait_ready(nats_srv.url, PREFIX, limit_s=120, progress=log)
        transport = stack.procs["transport"].pid
        wavs = finished_voices()
        for i in range(args.calls):
            mine = [wavs[(i * 3 + j) % len(wavs)] for j in range(500)]  # more than the run says
            callers.append(
                asyncio.ensure_future(
                    call_over_webrtc(
                        url, mine, None, on_audio=record.audio(i), after_turn=record.turn
                    )
                )
            )
            await asyncio.sleep(0.3)
        deadline = time.monotonic() + 30
        while (ready := await readyz(url))["calls"]["active"] < args.calls:
            if time.monotonic() > deadline or any(c.done() for c in callers):
                raise RuntimeError(f"the {args.calls} calls did not all start: {ready}")
            await asyncio.sleep(0.2)
        log(f"{args.calls} calls up; /readyz {ready['http']} (ready: {ready['ready']})")
        await asyncio.sleep(args.warmup_s)
        flood: dict[str, Any] = {}
        bounds, cpu, ready_at = {}, {}, {}
        for phase in PHASES:
            if phase == "during":
                flooder = FloodProcess(url, args)
                await flooder.start()
            t0, c0 = time.perf_counter(), cpu_seconds([transport])
            if phase == "during":
                log(f"during: {args.flood_rate:g} call attempts a second for {args.phase_s:g} s...")
                flood = await flooder.run()
            else:
                log(f"{phase}: the {args.calls} calls alone for {args.phase_s:g} s...")
                await asyncio.sleep(args.phase_s)
            bounds[phase] = (t0, time.perf_counter())
            cpu[phase] = cpu_seconds([transport]) - c0
            ready_at[phase] = await readyz(url)
            if any(c.done() for c in callers):
                raise RuntimeError("an admitted call ended during the run")
        phases = {}
        for phase, (t0, t1) in bounds.items():
            gaps = [g for t, g in record.gaps if t0 <= t < t1]
            turns = [ms for t, ms in record.turns if t0 <= t < t1]
            phases[phase] = {
                "seconds": round(t1 - t0, 1),
                "gap_ms": summary(gaps),
                "late_frames": sum(g > 2 * FRAME_MS for g in gaps),
                "turn_ms": summary(turns),
                "transport_cpu_s": round(cpu[phase], 2),
                "readyz": ready_at[phase],
            }
        extra_cpu = cpu["during"] - (cpu["before"] + cpu["after"]) / 2
        per_refusal = extra_cpu / max(1, flood["attempts"]) * 1000
        report |= {
            "phases": phases,
            "flood": {**flood, "transport_cpu_ms_per_refusal": round(per_refusal, 2)},
        }
    finally:
        for c in callers:
            c.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await asyncio.to_thread(stack.stop)
        await store.close()
        nats_srv.stop()
        valkey_srv.stop()
    report["load_after"] = os.getloadavg()
    return report


def _ms(x: Any) -> str:
    return "—" if x is None else f"{x:.1f} ms"


def markdown(r: dict[str, Any]) -> str:
    m, p, f = r["machine"], r["phases"], r["flood"]
    lines = [
        "# Overload: calls past the limit refused, the admitted calls unharmed",
        "",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['date']}",
        f"- Command: `{r['command']}`",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in r['load_before'])} /"
        f" {', '.join(f'{x:.1f}' for x in r['load_after'])}",
        f"- One transport with `VOICEMESH_MAX_CALLS={r['calls']}`, passthrough stages; "
        f"{r['calls']} aiortc callers (in the benchmark's process) talking the whole run; "
        f"{r['phase_s']:g} s per phase; during the flood {r['flood_rate']:g} new call attempts a "
        "second from a process of its own, WebRTC offers (a real aiortc offer"
        + (f" padded with {r['offer_candidates']} host candidates" if r["offer_candidates"] else "")
        + ") and WebSocket connects alternating",
        "",
        "| phase | playout gap p50 | p99 | max | frames > 40 ms apart | frames "
        "| turn latency p50 | p99 | turns | transport CPU s | /readyz |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in PHASES:
        x = p[phase]
        g, t = x["gap_ms"], x["turn_ms"]
        lines.append(
            f"| {phase} | {_ms(g['p50'])} | {_ms(g['p99'])} | {_ms(g['max'])} | {x['late_frames']} "
            f"| {g['n']} | {_ms(t['p50'])} | {_ms(t['p99'])} | {t['n']} | {x['transport_cpu_s']} "
            f"| {x['readyz']['http']} ({x['readyz']['calls']['active']} calls, "
            f"{x['readyz']['calls']['refused']} refused so far) |"
        )
    before, during = p["before"]["gap_ms"]["p99"], p["during"]["gap_ms"]["p99"]
    ratio = f"{during / before:.2f}×" if before and during else "—"
    lines += [
        "",
        f"Playout gap p99 during ÷ before: **{ratio}**; turn latency p99 "
        f"{_ms(p['before']['turn_ms']['p99'])} before, {_ms(p['during']['turn_ms']['p99'])} "
        "during.",
        "",
        f"**Flood: {f['attempts']} attempts, {f['admitted_beyond_limit']} admitted beyond the "
        f"limit.** The transport's CPU per refusal (during minus the mean of before and after, "
        f"÷ attempts): {f['transport_cpu_ms_per_refusal']} ms.",
        "",
        "| outcome | attempts |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(f["outcomes"].items())),
        "",
        "| attempt | refused in p50 | p99 | n |",
        "|---|---|---|---|",
        *(
            f"| {k} | {_ms(v['p50'])} | {_ms(v['p99'])} | {v['n']} |"
            for k, v in f["refusal_ms"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=6, help="VOICEMESH_MAX_CALLS and callers")
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--flood-rate", type=float, default=30.0, help="attempts a second")
    parser.add_argument(
        "--offer-candidates",
        type=int,
        default=0,
        help="pad each flooding offer with this many host candidates (1500: ~90 KB)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overload.md")
    parser.add_argument("--flood", metavar="URL", help=argparse.SUPPRESS)  # the flood process
    args = parser.parse_args()
    if args.flood:
        print(json.dumps(asyncio.run(flood_here(args.flood, args))))
        return
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
