"""voicemesh beside pipecat on the same offline engines, in one run (issue 13, item 5).

The same WAVs are played by the same aiortc WebRTC caller (voicemesh/callers/webrtc.py) to two
setups, one call at a time, never both at once:

- voicemesh: the `voicemesh bench` environment (voicemesh/bench/harness.py): its own
  nats-server and valkey-server, every role as its own process, the default agent
  (config/agent-config.json) over the WebRTC transport;
- pipecat 1.14 in one process (benchmarks/pipecat_bot.py): SmallWebRTC transport, Silero VAD and
  smart-turn v3 with the agent's settings, pipecat's WhisperSTTService and PiperTTSService on the
  same model files, and a minimal pipecat LLM service around voicemesh's SmolLM2 connector
  (pipecat has no llama.cpp service).

Both setups are started and warmed up (one unmeasured call each) before anything is measured.
The WAVs are then split into blocks of `--block` turns; each block is one call to each setup,
in alternating order (voicemesh first, then pipecat first, ...), so drift in the machine's load
falls on both. Voice to voice is timed by the caller, from its last voiced frame to the first
audible bot audio out of its jitter buffer; each setup's own per-phase figures come from its
`turn_metrics` events (voicemesh: the transport's trace; pipecat: its metrics and its
UserBotLatencyObserver, see pipecat_bot.py).

Writes `--out` (default benchmarks/results/vs-pipecat.md), with `.json` and `.png` beside it.
`--quick`: 2 turns, one block (a smoke run: the figures mean little).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from voicemesh.bench.harness import _speak, cpu_seconds, environment, machine  # noqa: E402
from voicemesh.bench.report import percentile  # noqa: E402
from voicemesh.callers.script import CallResult  # noqa: E402
from voicemesh.callers.webrtc import call_over_webrtc  # noqa: E402
from voicemesh.servers import free_port  # noqa: E402

VOICEMESH, PIPECAT = "voicemesh", "pipecat"
SETUPS = (VOICEMESH, PIPECAT)
#: varied questions, spoken by the harness's Piper voice when no `--wavs` is given
QUESTIONS = [
    "What is the capital of France?",
    "Tell me a fun fact about cats.",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "Can you recommend a good book to read?",
    "How many legs does a spider have?",
    "What is the tallest mountain in the world?",
    "Give me a tip for sleeping better.",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water?",
    "How do I make a cup of tea?",
    "What is the largest ocean on Earth?",
    "Name a famous composer.",
    "Is it going to be a good day for a walk?",
    "What language is spoken in Brazil?",
]
WARMUP = "Hello, can you hear me?"
#: the phases as each setup reports them, in path order: (key, column title)
PHASES = [
    ("eou_ms", "end of turn"),
    ("stt_ms", "STT"),
    ("llm_ttft_ms", "LLM first token"),
    ("tts_ttfb_ms", "TTS first audio"),
    ("v2v_ms", "v2v at the server"),
]
PIPECAT_READY_S = 600.0


def log(msg: str) -> None:
    print(f"bench_vs_pipecat: {msg}", file=sys.stderr, flush=True)


def wav_files(directory: Path) -> list[Path]:
    found = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".wav", ".flac"))
    if not found:
        raise SystemExit(f"no .wav or .flac files in {directory}")
    return found


def pick(wavs: list[Path], turns: int) -> list[Path]:
    """`turns` WAVs, cycling through the set when it is smaller."""
    return [wavs[i % len(wavs)] for i in range(turns)]


def blocks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@contextlib.contextmanager
def pipecat_bot(
    agent: Path, whisper: str, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The pipecat bot in its own process, on 127.0.0.1, until the block ends; its log goes to
    `log_path`."""
    port = free_port()
    logfile = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "pipecat_bot.py"),
            "--port",
            str(port),
            "--agent",
            str(agent),
            "--whisper",
            whisper,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        stdout=logfile,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the pipecat bot exited ({proc.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/ready")).json().get("ready"):
                    return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the pipecat bot was not ready within {limit_s:.0f} s")


def rows_of(setup: str, block: int, wavs: list[Path], result: CallResult) -> list[dict[str, Any]]:
    rows = []
    for wav, t in zip(wavs, result.turns, strict=False):
        p = t.phases
        rows.append(
            {
                "setup": setup,
                "block": block,
                "wav": wav.name,
                "caller_ms": round(t.latency_ms, 1) if t.latency_ms is not None else None,
                **{key: p.get(key) for key, _ in PHASES},
                "user_text": t.user_text,
                "bot_text": t.bot_text,
                # the connector that answered: the default agent fails over to a scripted reply
                # when SmolLM2 gives no first token within its attempt timeout (3 s)
                "engine": ",".join(sorted(c for c in t.connectors if c)) or None,
                "error": t.error,
            }
        )
    return rows


async def one_call(url: str, wavs: list[Path], turn_timeout: float) -> CallResult:
    return await call_over_webrtc(url, wavs, None, turn_timeout=turn_timeout)


async def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "command": command, "setups": SETUPS}
    report["load_before"] = os.getloadavg()
    work = Path(args.workdir or "/tmp") / f"vs-pipecat-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    if args.wavs:
        wavs = pick(wav_files(args.wavs), args.turns)
        report["wavs"] = str(args.wavs)
    else:
        log(f"speaking {args.turns} questions with the harness's Piper voice...")
        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.turns)]
        wavs = await asyncio.to_thread(_speak, texts, work)
        report["wavs"] = "the harness's: the questions below, in the bot's own Piper voice (joe)"
    report["turns_planned"] = len(wavs)
    (work / "warmup").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    cpu: dict[str, dict[str, float]] = {s: {"active": 0.0, "idle_other": 0.0} for s in SETUPS}
    calls: list[dict[str, Any]] = []
    bot_log = work / "pipecat-bot.log"
    with pipecat_bot(args.agent, args.whisper, bot_log) as (pc_url, pc_proc):
        log(f"loading the pipecat bot's engines (log: {bot_log})...")
        await wait_ready(pc_url, pc_proc, PIPECAT_READY_S)
        async with environment(args.agent, log) as env:
            urls = {VOICEMESH: env.http_url, PIPECAT: pc_url}
            pids = {VOICEMESH: [p.pid for p in env.stack.procs.values()], PIPECAT: [pc_proc.pid]}
            if not args.no_warmup:
                # not one of the measured WAVs: llama.cpp reuses the KV cache of an identical
                # prompt, which would make that turn's first token look free
                (first,) = await asyncio.to_thread(_speak, [WARMUP], work / "warmup")
                for setup in SETUPS:
                    log(f"warm-up call to {setup} (not counted)")
                    with contextlib.suppress(Exception):
                        await one_call(urls[setup], [first], args.turn_timeout)
            for b, block in enumerate(blocks(wavs, args.block)):
                order = SETUPS if b % 2 == 0 else SETUPS[::-1]
                for setup in order:
                    other = PIPECAT if setup == VOICEMESH else VOICEMESH
                    log(f"block {b + 1}: {len(block)} turns to {setup}")
                    c0 = {s: cpu_seconds(pids[s]) for s in SETUPS}
                    t0 = time.monotonic()
                    try:
                        result = await one_call(urls[setup], block, args.turn_timeout)
                    except Exception as exc:  # one failed call must not lose the run
                        log(f"{setup} call failed: {exc!r}")
                        calls.append({"setup": setup, "block": b, "error": repr(exc)})
                        continue
                    got = rows_of(setup, b, block, result)
                    rows.extend(got)
                    cpu[setup]["active"] += cpu_seconds(pids[setup]) - c0[setup]
                    cpu[setup]["idle_other"] += cpu_seconds(pids[other]) - c0[other]
                    calls.append(
                        {
                            "setup": setup,
                            "block": b,
                            "turns": len(got),
                            "seconds": round(time.monotonic() - t0, 1),
                        }
                    )
                    for r in got:
                        log(f"  {setup} {r['wav']}: {r['caller_ms']} ms  «{r['bot_text'][:50]}»")
    report["load_after"] = os.getloadavg()
    report["rows"] = rows
    report["calls"] = calls
    report["cpu"] = cpu
    report["summary"] = summarize(rows, cpu)
    return report


def summarize(rows: list[dict[str, Any]], cpu: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setup in SETUPS:
        mine = [r for r in rows if r["setup"] == setup]
        stats: dict[str, Any] = {"turns": len(mine)}
        for key in ("caller_ms", *(k for k, _ in PHASES)):
            vals = [r[key] for r in mine if r.get(key) is not None]
            stats[key] = {"p50": percentile(vals, 50), "p95": percentile(vals, 95), "n": len(vals)}
        answered = sum(1 for r in mine if r["caller_ms"] is not None)
        stats["answered"] = answered
        stats["not_smollm2"] = sum(1 for r in mine if r.get("engine") != "smollm2")
        stats["cpu_s_per_turn"] = round(cpu[setup]["active"] / answered, 2) if answered else None
        stats["idle_other_cpu_s"] = round(cpu[setup]["idle_other"], 2)
        out[setup] = stats
    vm, pc = out[VOICEMESH]["caller_ms"]["p50"], out[PIPECAT]["caller_ms"]["p50"]
    out["ratio_p50"] = round(vm / pc, 3) if vm and pc else None
    vm95, pc95 = out[VOICEMESH]["caller_ms"]["p95"], out[PIPECAT]["caller_ms"]["p95"]
    out["ratio_p95"] = round(vm95 / pc95, 3) if vm95 and pc95 else None
    return out


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


PHASE_NOTES = {
    VOICEMESH: (
        "end of turn: last voiced frame → end of turn decided (transport); STT: end of turn → "
        "final transcript (whisper starts at end of turn); LLM first token and TTS first audio: "
        "as the stages report them; v2v at the server: last voiced frame → first bot audio sent."
    ),
    PIPECAT: (
        "end of turn: UserBotLatencyObserver's user turn (VAD stop − stop_secs → "
        "UserStoppedSpeakingFrame; pipecat's smart-turn strategy also waits for the "
        "transcript, so this includes whisper's time after the 200 ms pause); STT: "
        "WhisperSTTService's processing time (it starts at VAD stop, beside smart-turn, so it "
        "overlaps end of turn); LLM first token and TTS first audio: the services' TTFB "
        "metrics (first of the turn); v2v at the server: UserBotLatencyObserver's latency "
        "(user silence → BotStartedSpeakingFrame)."
    ),
}


def markdown(report: dict[str, Any], png: Path | None) -> str:
    s = report["summary"]
    m = report["machine"]
    lines = [
        "# voicemesh beside pipecat, same engines, same caller",
        "",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}, Python {m['python']},"
        f" {m['date']}",
        f"- Command: `{report['command']}`",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in report['load_before'])}"
        f" / {', '.join(f'{x:.1f}' for x in report['load_after'])} (other work on the machine "
        "lands on both setups: compare the ratio, not absolute figures)",
        f"- WAVs: {report['wavs']}; {report['turns_planned']} turns per setup, blocks of "
        f"{report['block']} turns per call, alternating which setup goes first",
        f"- pipecat's whisper call: {report['whisper']} (see benchmarks/pipecat_bot.py)",
        *(
            [
                "- **`--quick`: a smoke run of 2 turns; it shows that both setups answer, its "
                "figures mean little**"
            ]
            if report.get("quick")
            else []
        ),
        "",
        "Voice to voice is timed by the caller (aiortc, 20 ms jitter buffer) from its last voiced "
        "frame (Silero) to the first audible bot audio out of its jitter buffer: both VADs, "
        "smart-turn, both media paths and both jitter buffers included.",
        "",
        "| setup | turns answered | caller v2v p50 | caller v2v p95 | "
        + " | ".join(f"{title} p50" for _, title in PHASES)
        + " | CPU s / turn |",
        "|---|---|---|---|" + "---|" * len(PHASES) + "---|",
    ]
    for setup in SETUPS:
        st = s[setup]
        lines.append(
            f"| {setup} | {st['answered']}/{st['turns']} | {_ms(st['caller_ms']['p50'])} ms | "
            f"{_ms(st['caller_ms']['p95'])} ms | "
            + " | ".join(f"{_ms(st[k]['p50'])} ms" for k, _ in PHASES)
            + f" | {st['cpu_s_per_turn'] if st['cpu_s_per_turn'] is not None else '–'} |"
        )
    ratio = s["ratio_p50"]
    for setup in SETUPS:
        if n := s[setup]["not_smollm2"]:
            lines += [
                "",
                f"**Not a like-for-like run: {n} of {setup}'s turns were not answered by "
                "SmolLM2** (a fallback reply, or none; see the `engine` column below).",
            ]
    lines += [
        "",
        f"**voicemesh p50 ÷ pipecat p50 (at the caller): {ratio if ratio is not None else '–'}**"
        f" (goal ≤ 1.0); p95 ratio {s['ratio_p95'] if s['ratio_p95'] is not None else '–'}.",
        "",
        "Phases, as each setup measures them (they are not the same cut of the path):",
        "",
        *(f"- {setup}: {PHASE_NOTES[setup]}" for setup in SETUPS),
        "- CPU s / turn: user + system CPU of the setup's processes during its calls (voicemesh: "
        "every role process, not nats-server and valkey-server; pipecat: the bot process), per "
        "answered turn. The idle setup used "
        + ", ".join(f"{s[x]['idle_other_cpu_s']} s during {x}'s calls" for x in SETUPS)
        + " (the other setup's idle processes).",
        "",
    ]
    if png is not None:
        lines += [f"![voice to voice at the caller]({png.name})", ""]
    else:
        lines += ["(no plot: matplotlib is not installed)", ""]
    lines += [
        "## Turns",
        "",
        "| setup | block | wav | caller ms | "
        + " | ".join(title for _, title in PHASES)
        + " | heard | engine | answered |",
        "|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|",
    ]
    for r in report["rows"]:
        heard = (r["user_text"] or "").replace("|", "/")[:60]
        said = (r["bot_text"] or r.get("error") or "").replace("|", "/")[:60]
        lines.append(
            f"| {r['setup']} | {r['block'] + 1} | {r['wav']} | {_ms(r['caller_ms'])} | "
            + " | ".join(_ms(r.get(k)) for k, _ in PHASES)
            + f" | {heard} | {r.get('engine') or '–'} | {said} |"
        )
    failed = [c for c in report["calls"] if "error" in c]
    if failed:
        lines += ["", "Failed calls: " + "; ".join(f"{c['setup']}: {c['error']}" for c in failed)]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setup in SETUPS:
        vals = sorted(
            r["caller_ms"] for r in report["rows"] if r["setup"] == setup and r["caller_ms"]
        )
        if vals:
            ys = [0.0, *((i + 1) / len(vals) for i in range(len(vals)))]
            label = f"{setup} (p50 {percentile(vals, 50):.0f} ms)"
            cdf.step([vals[0], *vals], ys, where="post", label=label)
    cdf.axvline(800, color="grey", linestyle=":", label="goal p50 800 ms")
    cdf.set_xlabel("voice to voice at the caller (ms)")
    cdf.set_ylabel("fraction of turns")
    cdf.set_title("voice to voice, same WAVs, same caller")
    cdf.legend(loc="lower right")
    width = 0.38
    keys = [("caller_ms", "caller v2v"), *PHASES]
    for j, setup in enumerate(SETUPS):
        st = report["summary"][setup]
        heights = [st[k]["p50"] or 0 for k, _ in keys]
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        bars.bar(xs, heights, width, label=setup)
    bars.set_xticks(range(len(keys)), [t for _, t in keys], rotation=25, ha="right")
    bars.set_ylabel("p50 (ms)")
    bars.set_title("p50 per phase (each setup's own cut)")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=12, help="turns per setup (default 12)")
    parser.add_argument("--block", type=int, default=6, help="turns per call (default 6)")
    parser.add_argument("--quick", action="store_true", help="2 turns in one block: a smoke run")
    parser.add_argument("--wavs", type=Path, help="a directory of WAV/FLAC utterances to play")
    parser.add_argument("--agent", type=Path, default=ROOT / "config" / "agent-config.json")
    parser.add_argument(
        "--whisper",
        choices=("matched", "stock"),
        default="matched",
        help="pipecat's whisper call: voicemesh's decoding options (matched) or its own (stock)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/vs-pipecat.md")
    parser.add_argument("--turn-timeout", type=float, default=90.0)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--workdir", help="where the spoken WAVs go (default /tmp)")
    args = parser.parse_args()
    if args.quick:
        args.turns, args.block = 2, 2
    if args.turns < 1 or args.block < 1:
        parser.error("--turns and --block must be at least 1")
    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    report = asyncio.run(run(args, command))
    report["block"], report["whisper"], report["quick"] = args.block, args.whisper, args.quick
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    drawn = plot(report, png)
    text = markdown(report, png if drawn else None)
    args.out.write_text(text)
    import json

    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
