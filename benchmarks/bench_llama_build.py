"""The portable llama.cpp build (x86-64-v3, what `make` installs) against a native build of the
same release on this machine, side by side in one run.

Why: the portable build gives up AVX-512 (and, on newer CPUs, AMX) so that it runs everywhere;
this measures what that costs on a machine that has them. The goal: the portable build's LLM time
to first token is at most 10% more than the native build's.

    .venv/bin/python benchmarks/bench_llama_build.py [--rounds 4] [--turns 6] [--out FILE]

1. The LLM alone: a child process per build and round (builds alternate, so drift on this noisy
   machine hits both), each loading SmolLM2 as the smollm2 connector does and answering the same
   questions with the default agent's system prompt and options; time to first token and tokens/s.
2. Voice to voice: the whole default agent (`voicemesh` roles as processes, embedded servers), one
   WebRTC call per build with the same spoken questions; the transport's per-turn phases.

Both wheels come from scripts/llama-wheel.sh (the native one is built once, ~5 min, if missing)
and are installed side by side under .voicemesh/bench/, each put first on PYTHONPATH in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILDS = ("portable", "native")

CHILD = r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
from voicemesh.connectors.llm.smollm2 import model_path
opts, system, questions = json.loads(sys.stdin.read())
llm = Llama(model_path=str(model_path()), n_ctx=opts["n_ctx"], n_threads=opts["threads"],
            verbose=False)
llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
rows = []
for q in questions:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
    t0 = time.perf_counter(); first = None; n = 0
    for chunk in llm.create_chat_completion(messages=messages, stream=True,
            max_tokens=opts["max_tokens"], temperature=0.0, top_p=opts["top_p"]):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    rows.append({"ttft_ms": (first - t0) * 1000, "tokens": n,
                 "tok_s": (n - 1) / (end - first) if n > 1 else None})
print(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode().strip(),
                  "rows": rows}))
"""


def say(msg: str) -> None:
    print(f"bench_llama_build: {msg}", file=sys.stderr, flush=True)


def site(build: str) -> Path:
    """The build's wheel, from the project's wheel cache, installed into a folder of its own."""
    env = {**os.environ, "LLAMA_CPU": build}
    wheel = subprocess.run(
        ["bash", str(ROOT / "scripts/llama-wheel.sh"), "build", sys.executable],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = ROOT / ".voicemesh" / "bench" / f"llama-{build}"
    stamp = target / ".from"
    if not stamp.exists() or stamp.read_text() != wheel:
        say(f"installing the {build} wheel into {target}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
             str(target), wheel],
            check=True,
        )  # fmt: skip
        stamp.write_text(wheel)
    return target


def agent() -> tuple[dict[str, Any], str]:
    from voicemesh.config.connectors import SmolLM2Options
    from voicemesh.config.models import parse_agent_config

    config = parse_agent_config((ROOT / "config/agent-config.json").read_bytes())
    opts = config.options("llm", "smollm2")
    assert isinstance(opts, SmolLM2Options)
    return opts.model_dump(), config.system_prompt or ""


def llm_alone(sites: dict[str, Path], rounds: int) -> dict[str, Any]:
    from voicemesh.bench.harness import QUESTIONS

    opts, system = agent()
    out: dict[str, Any] = {b: {"ttft_ms": [], "tok_s": [], "system_info": ""} for b in BUILDS}
    for r in range(rounds):
        for build in BUILDS if r % 2 == 0 else tuple(reversed(BUILDS)):
            env = {**os.environ, "PYTHONPATH": str(sites[build]), "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(
                [sys.executable, "-c", CHILD],
                input=json.dumps([opts, system, QUESTIONS]),
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            if proc.returncode != 0:
                raise SystemExit(f"the {build} build failed ({proc.returncode}):\n{proc.stderr}")
            got = json.loads(proc.stdout)
            out[build]["system_info"] = got["system_info"]
            out[build]["ttft_ms"] += [row["ttft_ms"] for row in got["rows"]]
            out[build]["tok_s"] += [row["tok_s"] for row in got["rows"] if row["tok_s"]]
            say(f"round {r + 1}/{rounds}: {build} done")
    return out


async def voice(sites: dict[str, Path], turns: int, rounds: int) -> dict[str, Any]:
    """`rounds` stacks per build, alternating (A B B A ...), `turns` turns each: a stack run
    takes minutes, and load from elsewhere on the machine must not fall on one build only."""
    from voicemesh.bench.harness import environment, voice_to_voice

    out: dict[str, Any] = {b: {"turns": []} for b in BUILDS}
    for r in range(rounds):
        for build in BUILDS if r % 2 == 0 else tuple(reversed(BUILDS)):
            os.environ["PYTHONPATH"] = str(sites[build])  # every role inherits it; LLM uses it
            try:
                async with environment(ROOT / "config/agent-config.json", say) as env:
                    got = await voice_to_voice(env, turns, lambda: None)
            finally:
                os.environ.pop("PYTHONPATH", None)
            out[build]["turns"] += got["turns"]
            say(f"voice to voice, round {r + 1}/{rounds}, {build} build: done")
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(alone: dict[str, Any], calls: dict[str, Any], args: argparse.Namespace) -> str:
    from voicemesh.bench.harness import machine

    m = machine()
    lines = [
        "# Portable vs native llama.cpp build (llama-cpp-python 0.3.36, SmolLM2-135M Q4_1)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {m.get('cpu')}, {m.get('cores')} cores; "
        f"`benchmarks/bench_llama_build.py --rounds {args.rounds} --turns {args.turns} "
        f"--call-rounds {args.call_rounds}`. Builds alternate within the run; ratios are "
        "portable ÷ native.",
        "",
        "## The LLM alone (time to first token from the request, in the LLM process)",
        "",
        "| build | compiled with | TTFT p50 (ms) | TTFT mean (ms) | tokens/s p50 | n |",
        "|---|---|---|---|---|---|",
    ]
    for b in BUILDS:
        a = alone[b]
        flags = " ".join(
            part.split("=")[0].strip()
            for part in a["system_info"].removeprefix("CPU :").split("|")
            if part.strip().endswith("= 1") and "AVX" in part
        )
        lines.append(
            f"| {b} | {flags} | {p50(a['ttft_ms']):.1f} | {statistics.fmean(a['ttft_ms']):.1f} "
            f"| {p50(a['tok_s']):.0f} | {len(a['ttft_ms'])} |"
        )
    ttft = p50(alone["portable"]["ttft_ms"]) / p50(alone["native"]["ttft_ms"])
    speed = p50(alone["portable"]["tok_s"]) / p50(alone["native"]["tok_s"])
    verdict = "met" if ttft <= 1.10 else "missed"
    lines += [
        "",
        f"TTFT ratio {ttft:.2f} (goal ≤ 1.10: {verdict}); tokens/s ratio {speed:.2f}.",
        "",
        "## Voice to voice, the default agent over WebRTC (the transport's clock, ms, p50)",
        "",
        "| build | turns | eou | stt | llm_ttft | tts_ttfb | v2v |",
        "|---|---|---|---|---|---|---|",
    ]

    def col(b: str, key: str) -> float:
        return p50([r[key] for r in calls[b]["turns"] if r[key] is not None])

    for b in BUILDS:
        cells = " | ".join(
            f"{col(b, k):.0f}" for k in ("eou_ms", "stt_ms", "llm_ttft_ms", "tts_ttfb_ms", "v2v_ms")
        )
        lines.append(f"| {b} | {len(calls[b]['turns'])} | {cells} |")
    if all(calls[b]["turns"] for b in BUILDS):
        lines += [
            "",
            f"llm_ttft ratio {col('portable', 'llm_ttft_ms') / col('native', 'llm_ttft_ms'):.2f}; "
            f"v2v ratio {col('portable', 'v2v_ms') / col('native', 'v2v_ms'):.2f}. The LLM's "
            "first token here is the stage's (the turn's context read, then llama.cpp), and v2v "
            "includes end of turn, whisper and Piper, which do not depend on the build.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="LLM-alone rounds per build")
    ap.add_argument("--turns", type=int, default=5, help="voice-to-voice turns per call")
    ap.add_argument("--call-rounds", type=int, default=2, help="calls (stacks) per build")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/llama-build.md")
    args = ap.parse_args()
    sites = {b: site(b) for b in BUILDS}
    alone = llm_alone(sites, args.rounds)
    calls = (
        asyncio.run(voice(sites, args.turns, args.call_rounds))
        if args.turns
        else {b: {"turns": []} for b in BUILDS}
    )
    text = report(alone, calls, args)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
