"""Transport capacity (issue 14): concurrent WebRTC calls one transport process holds on one core.

The stack is the latency harness's (voicemesh/bench/harness.py `environment`: its own NATS and
Valkey, every role its own process) with pass-through stages: stt, llm and tts relay each frame
unchanged, so each caller hears its own turns echoed back and every frame is accounted for, and
the transport is the only role doing per-call media work (Opus, SRTP, resampling, VAD, playout,
events, bus publish). The transport process (all its threads) is pinned to the first CPU this
run may use; the stages, NATS, Valkey, this script and the callers to the others.

Each step dials N calls from `--procs` caller processes (voicemesh/callers/load.py: aiortc
callers saying the shipped finished utterances with pauses, as benchmarks/bench_calls_capacity.py
picks them), `--ramp-s` apart, each for `--turns` turns. Inside the window in which all N are up
(from the last one dialled plus `--settle-s` to the first one ending) it counts, per call, the
bot frames heard against the window's length (drops), the gap between consecutive frames against
20 ms (inter-arrival jitter, out of the caller's 20 ms jitter buffer), and over whole calls the
RTP packets RTCP reports lost each way; then the transport's CPU seconds per call-second
and the callers' own CPU and event-loop lag (what of the jitter is theirs). A VAD stops
stepping at its first step that drops a frame, loses a packet or has p99 jitter >= `--limit-ms`
(20): its capacity is the step before.

    python benchmarks/bench_transport_capacity.py                 # webrtcvad and Silero, ~8 min
    python benchmarks/bench_transport_capacity.py --quick         # 2 and 4 calls, webrtcvad only
    python benchmarks/bench_transport_capacity.py --steps 20,40,60 --vad webrtc --turns 3

Writes `--out` (benchmarks/results/transport-capacity.md) and .json/.png beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from voicemesh.bench.harness import FLOW, Env, cpu_seconds, environment, machine  # noqa: E402
from voicemesh.callers.load import (  # noqa: E402
    CallerPool,
    CallSpec,
    heard_in,
    lag_p99,
    window,
)
from voicemesh.config.models import parse_agent_config  # noqa: E402
from voicemesh.config.stages import Stage  # noqa: E402

VOICES = ROOT / "voicemesh" / "bench" / "voices"
VADS = ("webrtc", "silero")


def log(msg: str) -> None:
    print(f"bench_transport_capacity: {msg}", file=sys.stderr, flush=True)


def finished_voices() -> list[Path]:
    """As bench_calls_capacity: the shipped finished utterances in voices that are not human."""
    manifest = json.loads((VOICES / "manifest.json").read_text())
    items = manifest["items"] if isinstance(manifest, dict) else manifest
    return [VOICES / i["file"] for i in items if i["label"] == "finished" and not i["human"]]


def agent(vad: str) -> dict[str, Any]:
    relay = {"primary": "passthrough"}
    return {
        "pipeline": {"name": "transport-capacity", "flow": FLOW},
        "connectors": {
            "stt": relay,
            "llm": relay,
            "tts": relay,
            "transport": {"primary": "webrtc", "config": {"webrtc": {"vad": vad}}},
        },
    }


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process: sched_setaffinity on a pid moves only that one thread."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def pin_others(env: Env, cores: Cores) -> None:
    """Everything but the transport (servers, stages, relays, this script) onto the other CPUs."""
    if cores.others is None:
        return
    pids = [env.nats.proc.pid, env.valkey.proc.pid, *env.stage_pids(), *env.relay_pids()]
    for pid in [*pids, os.getpid()]:
        pin(pid, cores.others)


class Sampler:
    """CPU seconds of some processes every 0.25 s, to cut any window out afterwards."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            self.samples.append((now, {k: cpu_seconds(v) for k, v in self.groups.items()}))
            await asyncio.sleep(0.25)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def between(self, start: float, end: float) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return {k: (c1[k] - c0[k]) / (t1 - t0) for k in c0} | {"_seconds": t1 - t0}


async def record_profile(pid: int, at: float, seconds: float, out: Path) -> None:
    """py-spy on the transport from `at` (time.monotonic()) for `seconds`, folded stacks to
    `out`; --nonblocking so sampling never pauses the process it measures."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    spy = Path(sys.executable).with_name("py-spy")
    proc = await asyncio.create_subprocess_exec(
        str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
        "--nonblocking", "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        log(f"py-spy failed: {err.decode(errors='replace')[-300:]}")


async def one_step(
    env: Any,
    vad: str,
    calls: int,
    args: argparse.Namespace,
    wavs: list[Path],
    cores: Any,
    profile: Path | None = None,
) -> dict[str, Any]:
    transport = env.stack.procs[str(Stage.TRANSPORT)].pid
    if cores.transport is not None:
        pin(transport, cores.transport)
    procs = min(args.procs, calls)
    pool = CallerPool(procs, sorted(cores.others) if cores.others else None)
    try:
        await asyncio.to_thread(pool.wait_ready)
        start = time.monotonic() + 3.0  # the callers prepare their utterances first
        specs = [
            CallSpec(
                n,
                [str(wavs[(n * 3 + i) % len(wavs)]) for i in range(args.turns)],
                start + n * args.ramp_s,
            )
            for n in range(calls)
        ]
        spy = None
        if profile is not None:
            at = start + calls * args.ramp_s + args.settle_s
            spy = asyncio.create_task(record_profile(transport, at, args.profile_s, profile))
        with Sampler({"transport": [transport], "callers": pool.pids}) as sampler:
            pool.dial(env.http_url, f"cap-{vad}", specs, args.turn_timeout, args.pause_s)
            stats, lags = await asyncio.to_thread(
                pool.results, calls * args.ramp_s + args.turns * args.turn_timeout + 60
            )
        if spy is not None:
            await spy
    finally:
        await asyncio.to_thread(pool.close)
    w0, w1 = window(stats, settle_s=args.settle_s)
    heard = heard_in(stats, w0, w1)
    cpu = sampler.between(w0, w1)
    row: dict[str, Any] = {
        "vad": vad,
        "calls": calls,
        "window_s": round(w1 - w0, 1),
        **heard.__dict__,
        "transport_core_used": round(cpu["transport"], 3) if cpu else None,
        "transport_cpu_s_per_call_s": round(cpu["transport"] / calls, 5) if cpu else None,
        "callers_cores_used": round(cpu["callers"], 3) if cpu else None,
        "callers_loop_lag_p99_ms": lag_p99(lags, w0, w1),
        "caller_procs": procs,
    }
    row["ok"] = (
        w1 > w0
        and not heard.errors
        and heard.dropped == 0
        and heard.lost_inbound == 0
        and heard.lost_outbound == 0
        and heard.jitter_p99_ms is not None
        and heard.jitter_p99_ms < args.limit_ms
    )
    return row


class Cores:
    def __init__(self) -> None:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) >= 2:
            self.transport: set[int] | None = {allowed[0]}
            self.others: set[int] | None = set(allowed[1:])
        else:
            self.transport = self.others = None

    def describe(self) -> str:
        if self.transport is None:
            return "not pinned (one CPU allowed)"
        return (
            f"transport (all threads) on CPU {sorted(self.transport)}; stages, NATS, Valkey, "
            f"relays, this script and the callers on CPU {sorted(self.others or ())}"
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    wavs = finished_voices()
    cores = Cores()
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "pinning": cores.describe(),
        "limit_ms": args.limit_ms,
        "turns_per_call": args.turns,
        "ramp_s": args.ramp_s,
        "caller_procs": args.procs,
        "load_before": os.getloadavg(),
        "steps": [],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(agent(args.vads[0]), f)
        agent_file = Path(f.name)
    try:
        async with environment(agent_file, log) as env:
            pin_others(env, cores)
            log(f"pinning: {cores.describe()}")
            for vad in args.vads:
                await env.store.create_agent(f"cap-{vad}", parse_agent_config(agent(vad)))
            log("warm-up call (not counted)")
            await one_step(env, args.vads[0], 1, _warm(args), wavs, cores)
            for vad in args.vads:
                for calls in args.steps:
                    log(f"vad {vad}: {calls} calls ...")
                    row = await one_step(env, vad, calls, args, wavs, cores)
                    report["steps"].append(row)
                    log(
                        f"  {'ok ' if row['ok'] else 'OVER'} frames {row['frames']}/"
                        f"{row['expected']} (dropped {row['dropped']}), jitter p50/p99/max "
                        f"{row['jitter_p50_ms']}/{row['jitter_p99_ms']}/{row['jitter_max_ms']} ms, "
                        f"RTP lost in/out {row['lost_inbound']}/{row['lost_outbound']}, "
                        f"v2v p50 {row['v2v_p50_ms']} ms, "
                        f"transport {row['transport_core_used']} core "
                        f"({row['transport_cpu_s_per_call_s']} s/call-s), callers "
                        f"{row['callers_cores_used']} core (their loop lag p99 "
                        f"{row['callers_loop_lag_p99_ms']} ms), window {row['window_s']} s"
                        + (f", errors: {row['errors'][:2]}" if row["errors"] else "")
                    )
                    if not row["ok"]:
                        break
    finally:
        await asyncio.to_thread(agent_file.unlink, missing_ok=True)
    report["load_after"] = os.getloadavg()
    report["capacity"] = {
        vad: max(
            (s["calls"] for s in report["steps"] if s["vad"] == vad and s["ok"]),
            default=0,
        )
        for vad in args.vads
    }
    return report


async def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    """One step of `--profile` calls with py-spy on the transport: where its time goes."""
    from voicemesh.bench.pyspy import IDLE, breakdown

    wavs, cores = finished_voices(), Cores()
    raw = args.out.with_name("transport-profile.txt")
    raw.parent.mkdir(parents=True, exist_ok=True)
    vad = args.vads[0]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(agent(vad), f)
        agent_file = Path(f.name)
    try:
        async with environment(agent_file, log) as env:
            if cores.others is not None:
                for pid in [env.nats.proc.pid, env.valkey.proc.pid, *env.stage_pids(), os.getpid()]:
                    pin(pid, cores.others)
            await env.store.create_agent(f"cap-{vad}", parse_agent_config(agent(vad)))
            await one_step(env, vad, 1, _warm(args), wavs, cores)
            log(f"profiling the transport under {args.profile} calls ({vad}) ...")
            row = await one_step(env, vad, args.profile, args, wavs, cores, profile=raw)
    finally:
        await asyncio.to_thread(agent_file.unlink, missing_ok=True)
    counts = breakdown(raw.read_text()) if raw.exists() else Counter()
    idle = counts.pop(IDLE, 0)
    total = sum(counts.values()) or 1
    per_call_s = row["transport_cpu_s_per_call_s"] or 0.0
    return {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "pinning": cores.describe(),
        "calls": args.profile,
        "vad": vad,
        "step": row,
        "samples": total,
        "idle_samples": idle,
        "categories": [
            {
                "category": name,
                "share": round(n / total, 4),
                # µs of transport CPU per call per 20 ms frame period
                "us_per_call_frame": round(n / total * per_call_s * 1e6 / 50, 1),
            }
            for name, n in counts.most_common()
        ],
    }


def profile_markdown(p: dict[str, Any]) -> str:
    step = p["step"]
    lines = [
        f"# Transport profile: {p['calls']} WebRTC calls, {p['vad']} VAD, pass-through stages",
        "",
        f"- Machine: {p['machine'].get('cores')} cores, {p['machine'].get('date')}; "
        f"command `{p['command']}`",
        f"- Pinning: {p['pinning']}",
        f"- py-spy record --nonblocking at 200 Hz, all threads, {p['samples']} busy samples "
        f"({p['idle_samples']} more of threads waiting, left out; folded stacks beside this "
        "file, transport-profile.txt); each stack counted under the first "
        "category from its leaf up (voicemesh/bench/pyspy.py)",
        f"- Transport: {step['transport_core_used']} core, "
        f"{step['transport_cpu_s_per_call_s']} CPU s per call-second; jitter p99 "
        f"{step['jitter_p99_ms']} ms, dropped {step['dropped']}",
        "",
        "| where | share of samples | µs per call per 20 ms |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c['category']} | {c['share'] * 100:.1f} % | {c['us_per_call_frame']} |"
        for c in p["categories"]
    ]
    return "\n".join(lines) + "\n"


async def run_ab(args: argparse.Namespace) -> dict[str, Any]:
    """The transport's CPU per call-second under the same `--ab-calls` calls, with the stack's
    code from `--ab` (another worktree, e.g. of the previous commit) and from this tree, in turns
    within one run, so the comparison shares the machine's load of the moment. The callers are
    this tree's in both."""
    wavs, cores, vad = finished_voices(), Cores(), args.vads[0]
    trees = [args.ab.resolve(), ROOT]
    rows: list[dict[str, Any]] = []
    here = Path.cwd()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(agent(vad), f)
        agent_file = Path(f.name)
    try:
        for r in range(args.ab_rounds):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                # `python -m voicemesh` puts its working directory first on sys.path
                os.environ["PYTHONPATH"] = str(tree)
                os.chdir(tree)
                async with environment(agent_file, log) as env:
                    pin_others(env, cores)
                    await env.store.create_agent(f"cap-{vad}", parse_agent_config(agent(vad)))
                    await one_step(env, vad, 1, _warm(args), wavs, cores)
                    row = await one_step(env, vad, args.ab_calls, args, wavs, cores)
                row["tree"] = str(tree)
                rows.append(row)
                log(
                    f"round {r + 1}, {tree}: {row['transport_cpu_s_per_call_s']} CPU s per "
                    f"call-s, jitter p99 {row['jitter_p99_ms']} ms, dropped {row['dropped']}"
                )
    finally:
        os.chdir(here)
        await asyncio.to_thread(agent_file.unlink, missing_ok=True)
    means = {
        str(t): round(
            sum(r["transport_cpu_s_per_call_s"] or 0 for r in rows if r["tree"] == str(t))
            / max(1, sum(1 for r in rows if r["tree"] == str(t))),
            5,
        )
        for t in trees
    }
    before, after = means[str(trees[0])], means[str(trees[1])]
    return {
        "calls": args.ab_calls,
        "vad": vad,
        "pinning": cores.describe(),
        "load": os.getloadavg(),
        "rows": rows,
        "cpu_s_per_call_s": means,
        "after_over_before": round(after / before, 3) if before else None,
    }


def _warm(args: argparse.Namespace) -> argparse.Namespace:
    warm = argparse.Namespace(**vars(args))
    warm.turns = 1
    return warm


def _v(x: Any, unit: str = "") -> str:
    return "—" if x is None else f"{x}{unit}"


def markdown(report: dict[str, Any], png: Path | None) -> str:
    m = report["machine"]
    lines = [
        "# Transport capacity: concurrent WebRTC calls on one core",
        "",
        f"- Machine: {m.get('cores')} cores, {m.get('memory_gib')} GiB, {m.get('python')}, "
        f"{m.get('date', '')}",
        f"- Command: `{report['command']}`",
        f"- Pinning: {report['pinning']}",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in report['load_before'])}"
        f" / {', '.join(f'{x:.1f}' for x in report['load_after'])}",
        f"- Each call: {report['turns_per_call']} turns of the shipped finished utterances, "
        "echoed back by pass-through stages; calls dialled "
        f"{report['ramp_s']} s apart from {report['caller_procs']} caller processes",
        "- Dropped: bot frames missing from what a caller heard in the window in which every "
        "call was up (the stream is continuous, one frame per 20 ms); RTP lost: packets RTCP "
        "reported lost over whole calls, caller → transport / transport → caller; jitter: "
        "|gap between consecutive frames "
        f"− 20 ms| at the callers; capacity: the most calls with nothing dropped and p99 jitter "
        f"< {report['limit_ms']:.0f} ms; callers' loop lag: p99 of how late a 10 ms sleep "
        "woke in the caller processes, the part of the jitter that is theirs, not the transport's",
        "",
        "| VAD | calls | frames heard / expected | dropped | RTP lost in / out "
        "| jitter p50 / p99 / max "
        "| v2v p50 / p95 | transport core used | transport CPU s per call-s "
        "| callers' cores used | callers' loop lag p99 | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        lines.append(
            f"| {s['vad']} | {s['calls']} | {s['frames']} / {s['expected']} | {s['dropped']} "
            f"| {s['lost_inbound']} / {s['lost_outbound']} "
            f"| {_v(s['jitter_p50_ms'])} / {_v(s['jitter_p99_ms'])} / "
            f"{_v(s['jitter_max_ms'])} ms | {_v(s['v2v_p50_ms'])} / {_v(s['v2v_p95_ms'])} ms "
            f"| {_v(s['transport_core_used'])} | {_v(s['transport_cpu_s_per_call_s'])} "
            f"| {_v(s['callers_cores_used'])} | {_v(s.get('callers_loop_lag_p99_ms'))} ms "
            f"| {'yes' if s['ok'] else 'no'} |"
        )
    cap = report["capacity"]
    lines += [
        "",
        "**Capacity: "
        + ", ".join(f"{n} calls with {vad}" for vad, n in cap.items())
        + " (one transport process on one core).**",
        "",
    ]
    errors = [e for s in report["steps"] for e in s["errors"]]
    if errors:
        lines += ["Errors: " + "; ".join(errors[:10]), ""]
    if png is not None:
        lines += [f"![jitter and CPU against calls]({png.name})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (jit, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for vad in {s["vad"] for s in report["steps"]}:
        rows = sorted((s for s in report["steps"] if s["vad"] == vad), key=lambda s: s["calls"])
        xs = [s["calls"] for s in rows]
        jit.plot(xs, [s["jitter_p99_ms"] or 0 for s in rows], "o-", label=f"{vad}: jitter p99")
        jit.plot(xs, [s["jitter_p50_ms"] or 0 for s in rows], ".--", label=f"{vad}: jitter p50")
        cpu.plot(xs, [s["transport_core_used"] or 0 for s in rows], "o-", label=f"{vad}: transport")
        cpu.plot(xs, [s["callers_cores_used"] or 0 for s in rows], ".--", label=f"{vad}: callers")
    jit.axhline(report["limit_ms"], color="grey", linestyle=":", label="limit")
    jit.set_xlabel("concurrent WebRTC calls")
    jit.set_ylabel("inter-arrival jitter at the callers (ms)")
    jit.legend(fontsize="small")
    cpu.axhline(1.0, color="grey", linestyle=":")
    cpu.set_xlabel("concurrent WebRTC calls")
    cpu.set_ylabel("cores used")
    cpu.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="10,20,30,40,50,60", help="calls tried, in order")
    parser.add_argument("--vad", default="webrtc,silero", help="VADs, each searched on its own")
    parser.add_argument("--turns", type=int, default=3, help="turns per call (default 3)")
    parser.add_argument("--procs", type=int, default=2, help="caller processes (default 2)")
    parser.add_argument("--ramp-s", type=float, default=0.1, help="between two calls dialling")
    parser.add_argument("--settle-s", type=float, default=1.0, help="after the last one dialled")
    parser.add_argument("--pause-s", type=float, default=0.5, help="caller's pause before a turn")
    parser.add_argument("--limit-ms", type=float, default=20.0, help="p99 jitter limit")
    parser.add_argument("--turn-timeout", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="2 and 4 calls, webrtcvad, 2 turns")
    parser.add_argument(
        "--profile", type=int, default=0, help="instead: py-spy the transport under this many calls"
    )
    parser.add_argument("--profile-s", type=float, default=10.0, help="py-spy's duration")
    parser.add_argument(
        "--ab", type=Path, help="instead: transport CPU with this other tree's code against ours"
    )
    parser.add_argument("--ab-calls", type=int, default=10, help="calls in each --ab step")
    parser.add_argument("--ab-rounds", type=int, default=2, help="--ab steps per tree")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "transport-capacity.md"
    )
    args = parser.parse_args()
    args.steps = [int(x) for x in str(args.steps).split(",") if x.strip()]
    args.vads = [v.strip() for v in str(args.vad).split(",") if v.strip()]
    if any(v not in VADS for v in args.vads):
        parser.error(f"--vad takes {', '.join(VADS)}")
    if args.quick:
        args.steps, args.vads, args.turns = [2, 4], ["webrtc"], 2
    if args.ab:
        ab = asyncio.run(run_ab(args))
        ab["command"] = " ".join(sys.argv)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name(args.out.stem + "-ab.json").write_text(json.dumps(ab, indent=1))
        print(json.dumps({k: v for k, v in ab.items() if k != "rows"}, indent=1))
        for row in ab["rows"]:
            print(
                f"{row['tree']}: {row['transport_cpu_s_per_call_s']} s/call-s, jitter p99 "
                f"{row['jitter_p99_ms']} ms, dropped {row['dropped']}, transport "
                f"{row['transport_core_used']} core, callers {row['callers_cores_used']}"
            )
        return
    if args.profile:
        prof = asyncio.run(run_profile(args))
        md = args.out.with_name("transport-profile.md")
        md.with_suffix(".json").write_text(json.dumps(prof, indent=1, default=str))
        md.write_text(profile_markdown(prof))
        print(profile_markdown(prof))
        return
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    drew = plot(report, png)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    args.out.write_text(markdown(report, png if drew else None))
    print(markdown(report, png if drew else None))


if __name__ == "__main__":
    main()
