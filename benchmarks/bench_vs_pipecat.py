"""voicemesh beside pipecat on the same offline engines, in one run (issue 13, item 5).

The same WAVs are played by the same aiortc WebRTC caller (voicemesh/callers/webrtc.py) to two
setups (three with `--before`), one call at a time, never two at once:

- voicemesh: the `voicemesh bench` environment (voicemesh/bench/harness.py): its own
  nats-server and valkey-server, every role as its own process, the default agent
  (config/agent-config.json) over the WebRTC transport;
- pipecat 1.14 in one process (benchmarks/pipecat_bot.py): SmallWebRTC transport, Silero VAD and
  smart-turn v3 with the agent's settings, pipecat's WhisperSTTService and PiperTTSService on the
  same model files, and a minimal pipecat LLM service around voicemesh's SmolLM2 connector
  (pipecat has no llama.cpp service);
- with `--before REV`, "before": voicemesh as it was at git revision REV (e.g. the main before a
  latency change), from its own checkout (a detached `git worktree` in the work directory,
  removed at the end) with that tree's own default agent (its config/agent-config.json). Its
  stack is started by a small helper process whose cwd is the old tree, through that tree's own
  `voicemesh.bench.harness.environment`: `python -m voicemesh` puts the current directory first
  on sys.path, so the role processes it spawns import the old `voicemesh`, not this one (checked:
  every role's cwd must be the old tree). The helper stops the old stack when its stdin closes,
  so it goes down with this script however this script ends.

Every setup is started and warmed up (one unmeasured call each) before anything is measured.
The WAVs are then split into blocks of `--block` turns; each block is one call to each setup,
the order rotating by one setup per block (voicemesh, pipecat; then pipecat, voicemesh; ...), so
drift in the machine's load falls on all of them; with N setups, a multiple of N blocks puts
each setup in each position equally often (hence `--block 4` by default with `--before`: 12
turns make 3 blocks). Voice to voice is timed by the caller, from its last voiced frame to the
first audible bot audio out of its jitter buffer; each setup's own per-phase figures come from its
`turn_metrics` events (voicemesh and before: the transport's trace, each its own tree's; pipecat:
its metrics and its UserBotLatencyObserver, see pipecat_bot.py).

Writes `--out` (default benchmarks/results/vs-pipecat.md), with `.json` and `.png` beside it.
`--quick`: 2 turns, one block (a smoke run: the figures mean little).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from voicemesh.bench.harness import QUESTIONS as HARNESS_QUESTIONS  # noqa: E402
from voicemesh.bench.harness import (  # noqa: E402
    _speak,
    checkout,
    cpu_seconds,
    environment,
    machine,
)
from voicemesh.bench.report import percentile  # noqa: E402
from voicemesh.callers.script import CallResult  # noqa: E402
from voicemesh.callers.webrtc import call_over_webrtc  # noqa: E402
from voicemesh.servers import free_port  # noqa: E402

VOICEMESH, PIPECAT, BEFORE = "voicemesh", "pipecat", "before"
SETUPS = (VOICEMESH, PIPECAT)
#: with `--before`: the order of the first block, and of the tables
SETUPS_BEFORE = (BEFORE, VOICEMESH, PIPECAT)
#: varied questions, spoken by the harness's Piper voice when no `--wavs` is given
QUESTIONS = [
    *HARNESS_QUESTIONS,
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
#: the old stack loads the same engines as ours; the old harness waits up to 600 s for its roles
BEFORE_READY_S = 660.0
#: how long the old stack gets to stop once told (its roles drain 15 s, then its two servers)
BEFORE_STOP_S = 60.0
#: then how long it gets after SIGTERM, before SIGKILL
BEFORE_TERM_S = 20.0


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


def order_of(setups: Sequence[str], block: int) -> tuple[str, ...]:
    """The setups in the order block `block` calls them: rotated by one per block, so over a
    multiple of len(setups) blocks each setup is called first, second, ... equally often (for
    two setups: alternating)."""
    k = block % len(setups)
    return (*setups[k:], *setups[:k])


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


# --- before: voicemesh at an older revision, from its own checkout ---------------------------

#: Run with cwd = the old tree: holds that tree's `voicemesh bench` stack up, prints one JSON line
#: (its HTTP URL and pids) once every role answers, and stops the stack when its stdin closes (we
#: closed it, or we died), on SIGTERM, or on Ctrl-C. It refuses to run on any `voicemesh` but the
#: old tree's, which is the point of the whole setup.
BEFORE_HELPER = r"""
import asyncio, contextlib, inspect, json, signal, sys, threading
from pathlib import Path

from voicemesh.bench import harness

tree = Path.cwd().resolve()
if not Path(harness.__file__).resolve().is_relative_to(tree):
    sys.exit(f"before: imported {harness.__file__}, not the old tree's ({tree})")
if list(inspect.signature(harness.environment).parameters)[:2] != ["agent_file", "progress"]:
    sys.exit("before: the old tree's harness.environment is not environment(agent_file, progress)")


async def main(agent: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def until_stdin_closes() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=until_stdin_closes, daemon=True).start()

    def say(msg: str) -> None:
        print(f"before: {msg}", file=sys.stderr, flush=True)

    async def hold() -> None:
        async with harness.environment(agent, say) as env:
            others = [*env.relay_pids(), env.nats.proc.pid, env.valkey.proc.pid]
            print(json.dumps({
                "url": env.http_url,
                "roles": {name: p.pid for name, p in env.stack.procs.items()},
                "others": others,
                "harness": harness.__file__,
            }), flush=True)
            await asyncio.Event().wait()

    held = asyncio.ensure_future(hold())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({held, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held  # the stack's and servers' teardown; re-raises a failed start


asyncio.run(main(Path(sys.argv[1])))
"""


def git(*argv: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *argv], check=True, capture_output=True, text=True
    ).stdout.strip()


def resolve_before(rev: str) -> str:
    """REV's full commit id; exits with the reason if REV's tree cannot serve as "before": its
    harness must have `environment(agent_file, progress)` as an async context manager (the helper
    calls it so), and the tree its own default agent."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--before {rev}: not a commit of {ROOT}") from None
    try:
        source = git("show", f"{commit}:voicemesh/bench/harness.py")
        git("cat-file", "-e", f"{commit}:config/agent-config.json")
    except subprocess.CalledProcessError:
        raise SystemExit(
            f"--before {rev}: no voicemesh/bench/harness.py or config/agent-config.json there"
        ) from None
    if not harness_compatible(source):
        raise SystemExit(
            f"--before {rev}: its voicemesh/bench/harness.py has no "
            "`async def environment(agent_file, progress)` context manager"
        )
    return commit


def harness_compatible(source: str) -> bool:
    """Whether a harness.py defines `environment` as this script's helper calls it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "environment":
            names = [a.arg for a in node.args.posonlyargs + node.args.args]
            required = len(names) - len(node.args.defaults)
            return (
                names[:2] == ["agent_file", "progress"]
                and required <= 2
                and any(ast.unparse(d).endswith("asynccontextmanager") for d in node.decorator_list)
            )
    return False


@dataclass
class OldStack:
    """The helper process holding the old tree's stack up."""

    tree: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    roles: dict[str, int] = field(default_factory=dict)
    others: list[int] = field(default_factory=list)
    _line: asyncio.Future[bytes] | None = None

    async def ready(self, limit_s: float = BEFORE_READY_S) -> None:
        """Until the helper reports the old stack up; fails when it exits or takes too long."""
        assert self.proc.stdout is not None
        if self._line is None:
            self._line = asyncio.ensure_future(asyncio.to_thread(self.proc.stdout.readline))
        done, _ = await asyncio.wait({self._line}, timeout=limit_s)
        if not done:
            raise TimeoutError(f"the before stack was not ready within {limit_s:.0f} s")
        line = self._line.result()
        if not line:
            self.proc.wait()
            raise RuntimeError(
                f"the before stack exited ({self.proc.returncode}) during startup:\n"
                + tail(self.log_path)
            )
        got = json.loads(line)
        self.url, self.roles, self.others = got["url"], got["roles"], got["others"]
        # the role processes import whichever voicemesh their cwd holds: it must be the old tree
        wrong = {n: d for n, pid in self.roles.items() if (d := cwd_of(pid)) != self.tree}
        if wrong:
            raise RuntimeError(f"before roles not running in {self.tree}: {wrong}")
        log(f"before stack up ({self.url}; {got['harness']})")

    def stop(self) -> None:
        """Close the helper's stdin (it stops the stack and its servers); after BEFORE_STOP_S,
        SIGTERM then SIGKILL it, and SIGKILL whatever it started that is still running in the old
        tree (checked by cwd, so a reused pid is left alone)."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(BEFORE_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(BEFORE_TERM_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in [*self.roles.values(), *self.others]:
            if cwd_of(pid) == self.tree:
                log(f"before: pid {pid} outlived its stack; killing it")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def cwd_of(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def start_helper(tree: Path, log_path: Path, logfile: IO[bytes]) -> OldStack:
    """The helper process, in `tree`, starting `tree`'s stack with `tree`'s default agent."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BEFORE_HELPER, str(tree / "config" / "agent-config.json")],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=logfile,
    )
    return OldStack(tree, proc, log_path)


@contextlib.contextmanager
def before_stack(commit: str, work: Path) -> Iterator[OldStack]:
    """The old tree checked out into `work`, and its stack starting (call `ready()`): it loads
    while the other setups load. Everything is stopped and the checkout removed at the end."""
    log_path = work / "before-stack.log"
    with checkout(commit, work / "before-tree", ROOT) as tree, log_path.open("wb") as logfile:
        old = start_helper(tree.resolve(), log_path, logfile)
        try:
            yield old
        finally:
            old.stop()


# --- the run ---------------------------------------------------------------------------------


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


def revisions(before: str | None, before_commit: str | None) -> dict[str, Any]:
    """What each voicemesh setup ran: this tree's commit (and whether it had edits), and the
    old one's."""
    out: dict[str, Any] = {}
    with contextlib.suppress(subprocess.CalledProcessError, OSError):
        out[VOICEMESH] = {
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    if before is not None and before_commit is not None:
        out[BEFORE] = {"rev": before, "commit": before_commit[:12]}
    return out


async def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    setups = SETUPS_BEFORE if args.before else SETUPS
    before_commit = resolve_before(args.before) if args.before else None
    report: dict[str, Any] = {"machine": machine(), "command": command, "setups": setups}
    report["revisions"] = revisions(args.before, before_commit)
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
    n_blocks = -(-len(wavs) // args.block)
    if n_blocks % len(setups):
        log(
            f"{n_blocks} blocks for {len(setups)} setups: not every setup goes first equally "
            f"often (make --turns ÷ --block a multiple of {len(setups)})"
        )
    (work / "warmup").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    # per setup: its processes' CPU during its calls, and the other setups' (idle) during them
    cpu: dict[str, dict[str, float]] = {s: {"active": 0.0, "idle_other": 0.0} for s in setups}
    calls: list[dict[str, Any]] = []
    bot_log = work / "pipecat-bot.log"
    with contextlib.ExitStack() as stack:
        # started first: the old stack loads its engines while the others load theirs
        old = stack.enter_context(before_stack(before_commit, work)) if before_commit else None
        if old is not None:
            log(f"loading the before stack ({args.before}; log: {old.log_path})...")
        pc_url, pc_proc = stack.enter_context(pipecat_bot(args.agent, args.whisper, bot_log))
        log(f"loading the pipecat bot's engines (log: {bot_log})...")
        await wait_ready(pc_url, pc_proc, PIPECAT_READY_S)
        async with environment(args.agent, log) as env:
            urls = {VOICEMESH: env.http_url, PIPECAT: pc_url}
            pids = {VOICEMESH: [p.pid for p in env.stack.procs.values()], PIPECAT: [pc_proc.pid]}
            if old is not None:
                await old.ready()
                urls[BEFORE], pids[BEFORE] = old.url, list(old.roles.values())
            if not args.no_warmup:
                # not one of the measured WAVs: llama.cpp reuses the KV cache of an identical
                # prompt, which would make that turn's first token look free
                (first,) = await asyncio.to_thread(_speak, [WARMUP], work / "warmup")
                for setup in setups:
                    log(f"warm-up call to {setup} (not counted)")
                    with contextlib.suppress(Exception):
                        await one_call(urls[setup], [first], args.turn_timeout)
            for b, block in enumerate(blocks(wavs, args.block)):
                for setup in order_of(setups, b):
                    others = [s for s in setups if s != setup]
                    log(f"block {b + 1}: {len(block)} turns to {setup}")
                    c0 = {s: cpu_seconds(pids[s]) for s in setups}
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
                    cpu[setup]["idle_other"] += sum(cpu_seconds(pids[o]) - c0[o] for o in others)
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
    report["summary"] = summarize(rows, cpu, setups)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(
    rows: list[dict[str, Any]], cpu: dict[str, dict[str, float]], setups: Sequence[str] = SETUPS
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setup in setups:
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
    out["ratio_p50"] = _ratio(out[VOICEMESH]["caller_ms"]["p50"], out[PIPECAT]["caller_ms"]["p50"])
    out["ratio_p95"] = _ratio(out[VOICEMESH]["caller_ms"]["p95"], out[PIPECAT]["caller_ms"]["p95"])
    if BEFORE in setups:
        # this tree ÷ each other setup, for every figure of the comparison table
        out["ratios"] = {
            f"{VOICEMESH}/{other}": {
                key: _ratio(out[VOICEMESH][key]["p50"], out[other][key]["p50"])
                for key in ("caller_ms", *(k for k, _ in PHASES))
            }
            | {
                "caller_ms_p95": _ratio(
                    out[VOICEMESH]["caller_ms"]["p95"], out[other]["caller_ms"]["p95"]
                ),
                "cpu_s_per_turn": _ratio(
                    out[VOICEMESH]["cpu_s_per_turn"], out[other]["cpu_s_per_turn"]
                ),
            }
            for other in setups
            if other != VOICEMESH
        }
    return out


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


PHASE_NOTES = {
    VOICEMESH: (
        "end of turn: last voiced frame → end of turn decided (transport; with the default "
        "agent's text end of turn it waits for the speculative transcript, made from the "
        "caller's pause on, and ends with it); STT: end of turn → final transcript (what the "
        "end still waited for: whisper ran during the pause); LLM first token and TTS first "
        "audio: as the stages report them (with speculative replies they ran during the pause "
        "too); v2v at the server: last voiced frame → first bot audio sent."
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
    BEFORE: (
        "as voicemesh's, from the old tree's own transport trace and stages (what its "
        "turn_metrics reported at that revision: there whisper starts at the end of turn)."
    ),
}


def labels(report: dict[str, Any]) -> dict[str, str]:
    """How the tables name each setup: with `--before`, which voicemesh is which."""
    if BEFORE not in report["setups"]:
        return {s: s for s in report["setups"]}
    rev = report.get("revisions", {})
    after = rev.get(VOICEMESH, {})
    here = after.get("commit", "this tree") + (" + edits" if after.get("dirty") else "")
    return {
        BEFORE: f"before (voicemesh @ {rev.get(BEFORE, {}).get('commit', '?')[:7]})",
        VOICEMESH: f"after (voicemesh @ {here})",
        PIPECAT: PIPECAT,
    }


def comparison(report: dict[str, Any]) -> list[str]:
    """A column per setup and, for this tree, its ratio to each other setup (lower is better)."""
    s, setups, name = report["summary"], report["setups"], labels(report)
    # after ÷ pipecat first: the goal; then after ÷ before
    others = sorted((o for o in setups if o != VOICEMESH), key=lambda o: o != PIPECAT)
    lines = [
        "| | "
        + " | ".join(name[x] for x in setups)
        + " | "
        + " | ".join(f"after ÷ {o}" for o in others)
        + " |",
        "|---|" + "---|" * (len(setups) + len(others)),
    ]
    figures: list[tuple[str, str, str, bool]] = [
        ("caller v2v p50", "caller_ms", "p50", True),
        ("caller v2v p95", "caller_ms", "p95", True),
        *((f"{title} p50", key, "p50", True) for key, title in PHASES),
        ("CPU s / turn", "cpu_s_per_turn", "", False),
    ]
    lines.append(
        "| turns answered | "
        + " | ".join(f"{s[x]['answered']}/{s[x]['turns']}" for x in setups)
        + " |"
        + " |" * len(others)
    )
    for title, key, q, is_ms in figures:
        vals = {x: (s[x][key][q] if q else s[x][key]) for x in setups}
        shown = [f"{_ms(vals[x])} ms" if is_ms else _x(vals[x]) for x in setups]
        ratios = [_x(_ratio(vals[VOICEMESH], vals[o])) for o in others]
        lines.append(f"| {title} | " + " | ".join(shown + ratios) + " |")
    return lines


def markdown(report: dict[str, Any], png: Path | None) -> str:
    s = report["summary"]
    m = report["machine"]
    setups = report["setups"]
    name = labels(report)
    with_before = BEFORE in setups
    rev = report.get("revisions", {})
    lines = [
        "# voicemesh before and after, beside pipecat, same engines, same caller"
        if with_before
        else "# voicemesh beside pipecat, same engines, same caller",
        "",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}, Python {m['python']},"
        f" {m['date']}",
        f"- Command: `{report['command']}`",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in report['load_before'])}"
        f" / {', '.join(f'{x:.1f}' for x in report['load_after'])} (other work on the machine "
        f"lands on {'every setup' if with_before else 'both setups'}: compare the ratio, not "
        "absolute figures)",
        f"- WAVs: {report['wavs']}; {report['turns_planned']} turns per setup, blocks of "
        f"{report['block']} turns per call, "
        + (
            f"the order rotating by one setup per block ({len(setups)} setups)"
            if with_before
            else "alternating which setup goes first"
        ),
        f"- pipecat's whisper call: {report['whisper']} (see benchmarks/pipecat_bot.py)",
        *(
            [
                f"- before: voicemesh at `{rev[BEFORE]['rev']}` ({rev[BEFORE]['commit']}), run "
                "from its own checkout with its own default agent (its "
                "config/agent-config.json) and its own `voicemesh bench` stack; after: this "
                f"tree, {name[VOICEMESH].removeprefix('after (').removesuffix(')')}, with "
                f"`--agent` ({report.get('agent', '?')})"
            ]
            if with_before
            else []
        ),
        *(
            [
                "- **`--quick`: a smoke run of 2 turns; it shows that "
                + ("every setup answers" if with_before else "both setups answer")
                + ", its figures mean little**"
            ]
            if report.get("quick")
            else []
        ),
        "",
        "Voice to voice is timed by the caller (aiortc, 20 ms jitter buffer) from its last voiced "
        "frame (Silero) to the first audible bot audio out of its jitter buffer: "
        + ("each setup's VAD" if with_before else "both VADs")
        + ", smart-turn, both media paths and both jitter buffers included.",
        "",
    ]
    if with_before:
        lines += [*comparison(report), ""]
    lines += [
        "| setup | turns answered | caller v2v p50 | caller v2v p95 | "
        + " | ".join(f"{title} p50" for _, title in PHASES)
        + " | CPU s / turn |",
        "|---|---|---|---|" + "---|" * len(PHASES) + "---|",
    ]
    for setup in setups:
        st = s[setup]
        lines.append(
            f"| {name[setup]} | {st['answered']}/{st['turns']} | "
            f"{_ms(st['caller_ms']['p50'])} ms | {_ms(st['caller_ms']['p95'])} ms | "
            + " | ".join(f"{_ms(st[k]['p50'])} ms" for k, _ in PHASES)
            + f" | {st['cpu_s_per_turn'] if st['cpu_s_per_turn'] is not None else '–'} |"
        )
    ratio = s["ratio_p50"]
    for setup in setups:
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
    ]
    if with_before:
        r = s["ratios"][f"{VOICEMESH}/{BEFORE}"]
        lines.append(
            f"**after p50 ÷ before p50 (at the caller): {_x(r['caller_ms'])}**; p95 ratio "
            f"{_x(r['caller_ms_p95'])}."
        )
    lines += [
        "",
        "Phases, as each setup measures them (they are not the same cut of the path):",
        "",
        *(f"- {name[setup]}: {PHASE_NOTES[setup]}" for setup in setups),
        "- CPU s / turn: user + system CPU of the setup's processes during its calls (voicemesh"
        + (" and before" if with_before else "")
        + ": every role process, not nats-server and valkey-server; pipecat: the bot process), "
        "per answered turn. The idle "
        + ("setups" if with_before else "setup")
        + " used "
        + ", ".join(f"{s[x]['idle_other_cpu_s']} s during {x}'s calls" for x in setups)
        + (
            " (the other setups' idle processes)."
            if with_before
            else " (the other setup's idle processes)."
        ),
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
    setups, name = report["setups"], labels(report)
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setup in setups:
        vals = sorted(
            r["caller_ms"] for r in report["rows"] if r["setup"] == setup and r["caller_ms"]
        )
        if vals:
            ys = [0.0, *((i + 1) / len(vals) for i in range(len(vals)))]
            label = f"{name[setup]} (p50 {percentile(vals, 50):.0f} ms)"
            cdf.step([vals[0], *vals], ys, where="post", label=label)
    cdf.axvline(800, color="grey", linestyle=":", label="goal p50 800 ms")
    cdf.set_xlabel("voice to voice at the caller (ms)")
    cdf.set_ylabel("fraction of turns")
    cdf.set_title("voice to voice, same WAVs, same caller")
    cdf.legend(loc="lower right", fontsize="small" if len(setups) > 2 else None)
    width = 0.76 / len(setups)
    keys = [("caller_ms", "caller v2v"), *PHASES]
    for j, setup in enumerate(setups):
        st = report["summary"][setup]
        heights = [st[k]["p50"] or 0 for k, _ in keys]
        xs = [i + (j - (len(setups) - 1) / 2) * width for i in range(len(keys))]
        bars.bar(xs, heights, width, label=name[setup])
    bars.set_xticks(range(len(keys)), [t for _, t in keys], rotation=25, ha="right")
    bars.set_ylabel("p50 (ms)")
    bars.set_title("p50 per phase (each setup's own cut)")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


async def _main(args: argparse.Namespace, command: str) -> dict[str, Any]:
    # SIGTERM unwinds like Ctrl-C, so every process this run started is stopped
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    return await run(args, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=12, help="turns per setup (default 12)")
    parser.add_argument(
        "--block", type=int, help="turns per call (default 6; 4 with --before: 3 blocks of 12)"
    )
    parser.add_argument("--quick", action="store_true", help="2 turns in one block: a smoke run")
    parser.add_argument("--wavs", type=Path, help="a directory of WAV/FLAC utterances to play")
    parser.add_argument("--agent", type=Path, default=ROOT / "config" / "agent-config.json")
    parser.add_argument(
        "--whisper",
        choices=("matched", "stock"),
        default="matched",
        help="pipecat's whisper call: voicemesh's decoding options (matched) or its own (stock)",
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run voicemesh as it was at git revision REV (its own checkout and default "
        "agent), as a third setup",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/vs-pipecat.md")
    parser.add_argument("--turn-timeout", type=float, default=90.0)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--workdir", help="where the spoken WAVs go (default /tmp)")
    args = parser.parse_args()
    if args.block is None:
        args.block = 4 if args.before else 6
    if args.quick:
        args.turns, args.block = 2, 2
    if args.turns < 1 or args.block < 1:
        parser.error("--turns and --block must be at least 1")
    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    try:
        report = asyncio.run(_main(args, command))
    except asyncio.CancelledError:
        log("stopped (SIGTERM)")
        raise SystemExit(143) from None
    report["block"], report["whisper"], report["quick"] = args.block, args.whisper, args.quick
    if args.before:
        agent = args.agent.resolve()
        report["agent"] = str(agent.relative_to(ROOT) if agent.is_relative_to(ROOT) else agent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    drawn = plot(report, png)
    text = markdown(report, png if drawn else None)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
