"""Concurrent offline calls on one machine, speculation on against off (issue 13, capacity).

How many WebRTC calls to the default agent (whisper, SmolLM2, Piper: every role its own process,
one instance each) the machine holds before the callers' p95 voice to voice passes `--limit-ms`
(1.5 s), with speculative STT and speculative replies on (the default agent) and off (the same
agent with `speculative_stt` and `speculative_reply` false). Speculation costs CPU (a whisper run
at each pause, a reply begun at a pause the caller then talks through), so it could lower the
number of calls a machine holds while it shortens each turn: this measures both.

One stack (voicemesh/bench/harness.py `environment`) serves both agents. For each step of
`--steps` (call counts), both modes run once, in alternating order, each as N concurrent aiortc
callers (in this process, so their Opus and jitter buffers share the cores too), started 1 s
apart, each saying `--turns` utterances from the shipped voices the bot was not tuned on (the
`finished` synthesized items of voicemesh/bench/voices/manifest.json), cycled with an offset
per caller. Voice to voice is the caller's: last voiced frame to the first audible bot audio out
of its jitter buffer. A mode stops stepping once its p95 passed the limit.

Writes `--out` (default benchmarks/results/calls-capacity.md) and `.json` beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from voicemesh.bench.harness import cpu_seconds, environment, machine  # noqa: E402
from voicemesh.bench.report import percentile  # noqa: E402
from voicemesh.callers.webrtc import call_over_webrtc  # noqa: E402
from voicemesh.config.models import parse_agent_config  # noqa: E402

VOICES = ROOT / "voicemesh" / "bench" / "voices"
MODES = ("on", "off")
TRANSPORTS = ("webrtc", "websocket")


def log(msg: str) -> None:
    print(f"bench_calls_capacity: {msg}", file=sys.stderr, flush=True)


def finished_voices() -> list[Path]:
    """The shipped utterances that end a turn, in voices that are not the bot's and not human
    (the human recordings are not questions)."""
    manifest = json.loads((VOICES / "manifest.json").read_text())
    items = manifest["items"] if isinstance(manifest, dict) else manifest
    return [VOICES / i["file"] for i in items if i["label"] == "finished" and not i["human"]]


def agent_json(base: dict[str, Any], speculate: bool) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for carrier in TRANSPORTS:
        options = data["connectors"]["transport"]["config"].setdefault(carrier, {})
        options["speculative_stt"] = options["speculative_reply"] = speculate
    return data


async def one_step(
    url: str, agent: str, calls: int, wavs: list[Path], turns: int, turn_timeout: float
) -> dict[str, Any]:
    async def caller(n: int) -> list[dict[str, Any]]:
        await asyncio.sleep(n * 1.0)  # staggered: N callers never all pause at once
        mine = [wavs[(n * 3 + i) % len(wavs)] for i in range(turns)]
        try:
            result = await call_over_webrtc(url, mine, None, agent=agent, turn_timeout=turn_timeout)
        except Exception as exc:  # one failed call must not lose the step
            log(f"  caller {n} failed: {exc!r}")
            return [{"caller": n, "error": repr(exc)}]
        return [
            {
                "caller": n,
                "wav": w.name,
                "caller_ms": t.latency_ms,
                "eou_ms": t.phases.get("eou_ms"),
                "engine": ",".join(sorted(c for c in t.connectors if c)) or None,
                "error": t.error,
            }
            for w, t in zip(mine, result.turns, strict=False)
        ]

    results = await asyncio.gather(*(caller(n) for n in range(calls)))
    rows = [r for rs in results for r in rs]
    v2v = [r["caller_ms"] for r in rows if r.get("caller_ms") is not None]
    return {
        "calls": calls,
        "turns": calls * turns,
        "answered": len(v2v),
        "p50": percentile(v2v, 50),
        "p95": percentile(v2v, 95),
        "not_smollm2": sum(1 for r in rows if r.get("engine") not in (None, "smollm2")),
        "rows": rows,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = json.loads(args.agent.read_text())
    wavs = finished_voices()
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "limit_ms": args.limit_ms,
        "turns_per_call": args.turns,
        "load_before": os.getloadavg(),
        "steps": [],
    }
    async with environment(args.agent, log) as env:
        pids = [p.pid for p in env.stack.procs.values()]
        for mode in MODES:
            config = parse_agent_config(agent_json(base, mode == "on"))
            await env.store.create_agent(f"spec-{mode}", config)
        log("warm-up call (not counted)")
        await one_step(env.http_url, "spec-on", 1, wavs[-1:], 1, args.turn_timeout)
        over: set[str] = set()
        for s, calls in enumerate(args.steps):
            order = MODES if s % 2 == 0 else MODES[::-1]
            for mode in order:
                if mode in over:
                    continue
                log(f"{calls} concurrent calls, speculation {mode}")
                c0, t0 = cpu_seconds(pids), time.monotonic()
                step = await one_step(
                    env.http_url, f"spec-{mode}", calls, wavs, args.turns, args.turn_timeout
                )
                step["mode"] = mode
                step["seconds"] = round(time.monotonic() - t0, 1)
                cpu = cpu_seconds(pids) - c0
                step["cpu_s_per_turn"] = (
                    round(cpu / step["answered"], 2) if step["answered"] else None
                )
                report["steps"].append(step)
                log(
                    f"  p50 {step['p50']} ms, p95 {step['p95']} ms, "
                    f"{step['answered']}/{step['turns']} answered, "
                    f"{step['cpu_s_per_turn']} CPU s/turn"
                )
                if step["p95"] is None or step["p95"] > args.limit_ms:
                    over.add(mode)
            if len(over) == len(MODES):
                break
    report["load_after"] = os.getloadavg()
    report["capacity"] = {
        mode: max(
            (
                s["calls"]
                for s in report["steps"]
                if s["mode"] == mode
                and s["p95"] is not None
                and s["p95"] <= args.limit_ms
                and s["answered"] == s["turns"]
            ),
            default=0,
        )
        for mode in MODES
    }
    return report


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f} ms"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Concurrent offline calls: speculation on against off",
        "",
        f"- Machine: {m.get('cores')} cores, {m.get('memory_gib')} GiB, {m.get('python')}, "
        f"{m.get('date', '')}",
        f"- Command: `{report['command']}`",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in report['load_before'])}"
        f" / {', '.join(f'{x:.1f}' for x in report['load_after'])}",
        f"- Each call: {report['turns_per_call']} turns from the shipped voices the bot was not "
        "tuned on; callers started 1 s apart; the default agent, every role one process; the "
        "callers (aiortc) run on the same cores",
        f"- Capacity: the most concurrent calls with every turn answered and caller p95 voice to "
        f"voice ≤ {report['limit_ms']:.0f} ms",
        "",
        "| calls | speculation | turns answered | caller v2v p50 | caller v2v p95 "
        "| not SmolLM2 | CPU s / turn |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sorted(report["steps"], key=lambda s: (s["calls"], s["mode"])):
        lines.append(
            f"| {s['calls']} | {s['mode']} | {s['answered']}/{s['turns']} | {_ms(s['p50'])} "
            f"| {_ms(s['p95'])} | {s['not_smollm2']} | {s['cpu_s_per_turn']} |"
        )
    cap = report["capacity"]
    lines += [
        "",
        f"**Capacity: {cap['on']} calls with speculation on, {cap['off']} with it off.**",
        "",
        '"not SmolLM2": turns the default agent\'s scripted fallback answered because SmolLM2 '
        "gave no first token within its attempt timeout (3 s): the LLM stage was saturated.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="1,2,3,4", help="concurrent calls tried (1,2,3,4)")
    parser.add_argument("--turns", type=int, default=4, help="turns per call (default 4)")
    parser.add_argument("--limit-ms", type=float, default=1500.0)
    parser.add_argument("--quick", action="store_true", help="1 and 2 calls, 2 turns: a smoke run")
    parser.add_argument("--agent", type=Path, default=ROOT / "config" / "agent-config.json")
    parser.add_argument("--turn-timeout", type=float, default=60.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "calls-capacity.md"
    )
    args = parser.parse_args()
    args.steps = [int(x) for x in str(args.steps).split(",") if x.strip()]
    if args.quick:
        args.steps, args.turns = [1, 2], 2
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    args.out.write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
