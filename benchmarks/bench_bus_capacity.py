"""Bus capacity against raw NATS (issue 14): how many sessions the loop carries with its p99 at
most `--limit-ms` (20 ms) and no frame lost, for the raw relay chain and for voicemesh's stages,
found by search in one run on one machine; and the CPU each spends per frame.

The loop is `voicemesh bench`'s (voicemesh/bench/harness.py): 20 ms PCM16 frames paced at 50 per
second per session enter at stt and come back from the transport's subject, 4 hops later.
- raw-nats: three nats-py processes that republish every message untouched
  (voicemesh/bench/relay.py), the floor any Python relay on NATS pays;
- voicemesh: the three stage services (`voicemesh serve stt|llm|tts`) with `passthrough`
  connectors: every frame is decoded, checked against its session's turn, routed by the session's
  config and published, as a real stage does before its engine;
- before (with `--before REV`): the same stages from REV's tree, checked out beside this one,
  so one run shows a change's effect.

Every setup runs on the same nats-server and valkey-server, each under its own subject prefix, so
they never see each other's frames; one setup runs at a time. The search steps the session count
up (`--steps`) in rotating setup order until a setup fails (p99 over the limit, or a frame lost),
then halves the interval between its last pass and its first fail down to `--resolution`.

CPU per frame is the loop processes' user+system CPU over the frames that entered the loop, at
each step; the ratio voicemesh ÷ raw is taken at the steps both passed.

Writes `--out` (default benchmarks/results/bus-capacity.md) with .json and .png beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from nats.aio.client import Client  # noqa: E402

from voicemesh.bench.harness import (  # noqa: E402
    RAW,
    checkout,
    end_sessions,
    machine,
    measure_loop,
    open_sessions,
    passthrough_config,
    stack_env,
    start_relays,
)
from voicemesh.bus import Subjects  # noqa: E402
from voicemesh.config.stages import Stage  # noqa: E402
from voicemesh.launcher import Stack  # noqa: E402
from voicemesh.servers import EmbeddedServer, free_port, start_nats, start_valkey  # noqa: E402
from voicemesh.state import ConfigStore  # noqa: E402

RAW_SETUP, AFTER, BEFORE = "raw-nats", "voicemesh", "before"


def log(msg: str) -> None:
    print(f"bench_bus_capacity: {msg}", file=sys.stderr, flush=True)


class TreeStack(Stack):
    """The roles of one source tree: `-P` keeps the working directory off sys.path and
    PYTHONPATH puts the tree first, so `--before`'s roles import the old voicemesh, not ours."""

    def __init__(self, tree: Path, env: dict[str, str], http_port: int):
        super().__init__({**env, "PYTHONPATH": str(tree)}, http_port=http_port)
        self.tree = tree

    def command(self, role: str) -> list[str]:
        return [sys.executable, "-P", "-m", "voicemesh", "serve", role]

    def imported_from(self) -> Path:
        out = subprocess.run(
            [sys.executable, "-P", "-c", "import voicemesh; print(voicemesh.__file__)"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(out.stdout.strip()).resolve().parent.parent


@dataclass
class Setup:
    name: str
    prefix: str
    stack: TreeStack | None = None
    store: ConfigStore | None = None
    relays: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    def pids(self) -> list[int]:
        if self.stack is None:
            return [r.pid for r in self.relays]
        return [p.pid for n, p in self.stack.procs.items() if n != Stage.TRANSPORT]

    def passed(self) -> list[int]:
        return sorted(r["sessions"] for r in self.rows if r["ok"])

    def failed(self) -> list[int]:
        return sorted(r["sessions"] for r in self.rows if not r["ok"])


async def start_stage_setup(
    setup: Setup, tree: Path, nats_srv: EmbeddedServer, valkey_srv: EmbeddedServer
) -> None:
    env = stack_env(nats_srv.url, valkey_srv.url, prefix=setup.prefix)
    setup.store = ConfigStore.from_url(valkey_srv.url, key_prefix=setup.prefix)
    await setup.store.ensure_default_agent("local", passthrough_config())
    setup.stack = TreeStack(tree, env, free_port())
    where = await asyncio.to_thread(setup.stack.imported_from)
    if where != tree:
        raise SystemExit(f"{setup.name}: voicemesh imports from {where}, not {tree}")
    setup.stack.start()
    await setup.stack.wait_ready(nats_srv.url, setup.prefix, limit_s=120, progress=log)
    log(f"{setup.name}: stages of {tree} ready")


async def run_step(
    nc: Client, setup: Setup, sessions: int, *, seconds: float, limit_ms: float
) -> dict[str, Any]:
    if setup.stack is None:
        subjects_in = [f"{RAW}.stt.s{i:05d}" for i in range(sessions)]
        result = await measure_loop(
            nc, subjects_in, f"{RAW}.transport.*", setup.pids(), seconds=seconds
        )
    else:
        assert setup.store is not None
        subjects = setup.subjects
        sids = await open_sessions(nc, setup.store, subjects, sessions)
        result = await measure_loop(
            nc,
            [subjects.data(Stage.STT, s) for s in sids],
            subjects.data_all(Stage.TRANSPORT),
            setup.pids(),
            seconds=seconds,
        )
        await end_sessions(nc, setup.store, subjects, sids)
    p99 = result["p99_ms"]
    ok = p99 is not None and p99 <= limit_ms and not result["frames_lost"]
    row = {"setup": setup.name, "sessions": sessions, "ok": ok, **result}
    log(
        f"{setup.name:>9} × {sessions:4d}: p50 {_ms(result['p50_ms'])} ms, p99 {_ms(p99)} ms, "
        f"lost {result['frames_lost']}, {result['cpu_us_per_frame']} µs CPU/frame "
        f"(CPU s per process {result['cpu_s_per_process']}) -> {'pass' if ok else 'FAIL'}"
    )
    setup.rows.append(row)
    await asyncio.sleep(1.0)  # let the stages forget the ended sessions
    return row


async def search(
    nc: Client, setups: list[Setup], steps: list[int], args: argparse.Namespace
) -> None:
    """Step up in rotating order while any setup passes; then bisect each setup's interval."""
    for i, n in enumerate(steps):
        live = [s for s in setups if not s.failed()]
        if not live:
            break
        k = i % len(live)
        for setup in live[k:] + live[:k]:
            await run_step(nc, setup, n, seconds=args.seconds, limit_ms=args.limit_ms)
    for setup in setups:
        while setup.failed():
            lo = max(setup.passed(), default=0)
            hi = min(setup.failed())
            if hi - lo <= args.resolution:
                break
            mid = (lo + hi) // 2 // 10 * 10 or (lo + hi) // 2
            await run_step(nc, setup, mid, seconds=args.seconds, limit_ms=args.limit_ms)


#: frames of the event loop and of nats-py's delivery that every stack sample passes through:
#: they say nothing about where a frame's own cost goes
_PLUMBING = (
    "run_forever",
    "_run_once",
    "_run (asyncio/events.py",
    "<module>",
    "run (",
    "main (",
    "_run_code (",
    "_run_module_as_main (",
    "cmd_serve (",
)


async def profile(nc: Client, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """One more step at `--profile` sessions with py-spy sampling each loop process; the
    collapsed stacks are written beside the report, and the functions that hold the most
    samples (inclusive, per process) are summed up for it."""
    out_dir = args.out.parent / f"{args.out.stem}-profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["relay-1", "relay-2", "relay-3"] if setup.stack is None else ["stt", "llm", "tts"]
    spies, files = [], []
    for name, pid in zip(names, setup.pids(), strict=True):
        path = out_dir / f"{setup.name}-{name}.txt"
        files.append(path)
        spies.append(
            subprocess.Popen(  # noqa: ASYNC220 (returns at once; the spy runs beside us)
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "250",
                    "-d",
                    str(int(args.seconds + 3)),
                    "-f",
                    "raw",
                    "-o",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    await asyncio.sleep(0.5)
    row = await run_step(nc, setup, args.profile, seconds=args.seconds, limit_ms=args.limit_ms)
    setup.rows.remove(row)  # a profiled step runs slower: it is not a capacity sample
    for spy in spies:
        await asyncio.to_thread(spy.wait)
    return {name: top_functions(path) for name, path in zip(names, files, strict=True)}


def top_functions(path: Path, n: int = 15) -> dict[str, Any]:
    inclusive: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            if "Thread._bootstrap" in stack:  # idle pool and metrics threads, not the loop
                continue
            total += int(count)
            seen = {f for f in stack.split(";") if not any(p in f for p in _PLUMBING)}
            for frame in seen:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
    top = sorted(inclusive.items(), key=lambda kv: -kv[1])[:n]
    return {
        "samples": total,
        "top": [{"function": f, "share": round(c / total, 3)} for f, c in top] if total else [],
    }


def capacity(setup: Setup) -> int:
    """The largest count that passed below every failure (a pass above a fail does not count)."""
    first_fail = min(setup.failed(), default=1 << 30)
    return max((n for n in setup.passed() if n < first_fail), default=0)


def summary(setups: list[Setup]) -> dict[str, Any]:
    by = {s.name: s for s in setups}
    caps = {s.name: capacity(s) for s in setups}
    out: dict[str, Any] = {"capacity": caps}
    raw = by[RAW_SETUP]
    raw_rows = {r["sessions"]: r for r in raw.rows if r["ok"]}
    for name in (AFTER, BEFORE):
        if name not in by:
            continue
        ratios = []
        for r in by[name].rows:
            base = raw_rows.get(r["sessions"])
            if r["ok"] and base and base["cpu_us_per_frame"] and r["cpu_us_per_frame"]:
                ratios.append(
                    {
                        "sessions": r["sessions"],
                        "cpu_ratio": round(r["cpu_us_per_frame"] / base["cpu_us_per_frame"], 2),
                        "p50_ratio": round(r["p50_ms"] / base["p50_ms"], 2),
                    }
                )
        out[name] = {
            "capacity_ratio": round(caps[name] / caps[RAW_SETUP], 2) if caps[RAW_SETUP] else None,
            "per_step": ratios,
        }
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    setups = list(s["capacity"])
    lines = [
        "# Bus capacity against raw NATS",
        "",
        f"{report['machine']['date']} · {report['machine']['cores']} cores · "
        f"{report['machine']['cpu']} · Python {report['machine']['python']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Limit: loop p99 ≤ {report['limit_ms']} ms and no frame lost; 50 frames/s per session, "
        f"{report['seconds']} s measured per step (after 1 s of warm-up); 4 hops.",
        "",
        "| setup | capacity (sessions) | ÷ raw | CPU µs/frame ÷ raw (at the steps both passed) |",
        "|---|---|---|---|",
    ]
    for name in setups:
        cap = s["capacity"][name]
        extra = s.get(name, {})
        ratio = extra.get("capacity_ratio")
        cpu = ", ".join(f"{r['cpu_ratio']}× @{r['sessions']}" for r in extra.get("per_step", []))
        lines.append(f"| {name} | {cap} | {'' if ratio is None else f'{ratio}×'} | {cpu} |")
    lines += [
        "",
        "| setup | sessions | p50 ms | p95 ms | p99 ms | lost | CPU s | CPU µs/frame | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["rows"], key=lambda r: (setups.index(r["setup"]), r["sessions"])):
        lines.append(
            f"| {r['setup']} | {r['sessions']} | {_ms(r['p50_ms'])} | {_ms(r['p95_ms'])} "
            f"| {_ms(r['p99_ms'])} "
            f"| {r['frames_lost']} | {r['cpu_s']} | {r['cpu_us_per_frame']} "
            f"| {'pass' if r['ok'] else 'fail'} |"
        )
    for setup, procs in report.get("profiles", {}).items():
        lines += ["", f"## Profile of {setup} (py-spy, inclusive share of each process's samples)"]
        for proc, prof in procs.items():
            top = "; ".join(f"{t['function']} {t['share']:.0%}" for t in prof["top"][:8])
            lines.append(f"- **{proc}** ({prof['samples']} samples): {top}")
    if report.get("revisions"):
        lines += ["", f"Revisions: {report['revisions']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in report["summary"]["capacity"]:
        rows = sorted(
            (r for r in report["rows"] if r["setup"] == name and r["p99_ms"] is not None),
            key=lambda r: r["sessions"],
        )
        ax.plot([r["sessions"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=name)
    ax.axhline(report["limit_ms"], color="grey", linestyle="--", linewidth=1, label="limit")
    ax.set_xlabel("concurrent sessions (50 frames/s each)")
    ax.set_ylabel("loop p99 (ms)")
    ax.set_yscale("log")
    ax.set_title("Bus loop p99 against load, one run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="voicemesh-buscap-"))
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    setups = [Setup(RAW_SETUP, RAW), Setup(AFTER, "va")]
    if args.before:
        setups.append(Setup(BEFORE, "vo"))
    nc: Client | None = None
    profiles: dict[str, Any] = {}
    with contextlib.ExitStack() as trees:
        try:
            setups[0].relays = start_relays(nats_srv.url)
            await start_stage_setup(setups[1], ROOT, nats_srv, valkey_srv)
            if args.before:
                tree = trees.enter_context(checkout(args.before, data / "before-tree", ROOT))
                await start_stage_setup(setups[2], tree.resolve(), nats_srv, valkey_srv)
            nc = await nats.connect(nats_srv.url, name="bench-bus-capacity")
            await asyncio.sleep(0.5)
            await search(nc, setups, args.steps, args)
            if args.profile:
                for setup in setups:
                    profiles[setup.name] = await profile(nc, setup, args)
        finally:
            if nc is not None:
                await nc.close()
            for s in setups:
                for r in s.relays:
                    r.terminate()
                if s.stack is not None:
                    await asyncio.to_thread(s.stack.stop)
                if s.store is not None:
                    await s.store.close()
            nats_srv.stop()
            valkey_srv.stop()
    rows = [r for s in setups for r in s.rows]
    return {
        "machine": machine(),
        "command": " ".join(["benchmarks/bench_bus_capacity.py", *sys.argv[1:]]),
        "limit_ms": args.limit_ms,
        "seconds": args.seconds,
        "revisions": {"before": args.before} if args.before else {},
        "load": os.getloadavg(),
        "rows": rows,
        "summary": summary(setups),
        "profiles": profiles,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 200, 300, 400, 500, 600, 800, 1000],
        help="session counts stepped through (default 100,...,1000)",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per step")
    p.add_argument("--limit-ms", type=float, default=20.0, help="p99 limit of the loop")
    p.add_argument("--resolution", type=int, default=25, help="bisect down to this many sessions")
    p.add_argument("--before", help="also run voicemesh's stages at this git revision")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after the search, one step at this many sessions per setup under py-spy",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bus-capacity.md")
    return p.parse_args()


if __name__ == "__main__":
    import uvloop

    args = parse_args()
    t0 = time.monotonic()
    report = uvloop.run(main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.write_text(render(report))
    plot(report, args.out.with_suffix(".png"))
    print(render(report))
    log(f"wrote {args.out} (+ .json, .png) in {time.monotonic() - t0:.0f} s")
