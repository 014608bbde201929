"""Stage capacity: calls per core for each offline engine of the default agent (issue 14).

An operator sizes the stage pools from this: how many concurrent calls one stage instance on one
core carries before its latency passes a budget. For each engine (stt/whisper, llm/SmolLM2,
tts/Piper) the real stage process (`voicemesh serve <role>`) runs alone, started under
`taskset -c CORE`, so it and every thread it makes (CTranslate2, llama.cpp, onnxruntime) share one
core and its engines size their thread pools to that core (connectors/threads.py). The benchmark
stands in for the rest of the pipeline on NATS: it sends each simulated call's turns to the
stage's subject and listens on the next hop's subject (no other stage runs, so nothing else takes
those messages).

Each simulated call makes one turn every `--interval` seconds (default 8 s: ~3 s of the caller
speaking plus the bot's reply), starting at a random phase, open loop (a slow turn does not delay
the next, as a caller does not wait for a stage that is behind). Inputs are real:

- STT: a finished utterance of the shipped voices (voicemesh/bench/voices/), streamed as the
  transport streams it (20 ms frames in real time, then the END frame); latency: END sent → the
  final transcript event;
- LLM: the words of those utterances as the user's turn, the default agent's prompt and options,
  each call's conversation growing in Valkey as a real call's does; latency: turn sent → the
  reply's first unit (what TTS waits for); the whole reply is generated and counted in CPU;
- TTS: replies of the kind SmolLM2 gives, cut into units as the LLM stage cuts them; latency: the
  first unit sent → its first audio; the whole reply is synthesized and counted in CPU.

First `--solo-turns` turns one at a time give the solo p50 and the CPU seconds per turn (the
stage process's user + system time from /proc over the turns). The theoretical bound is
interval ÷ CPU s per turn. Then N concurrent calls for `--duration` seconds per step, N from
`--steps` or, by default, fractions of that bound, stopping at the first step whose p95 passes
the budget or loses a turn. The budget, by default, is what a turn takes that waits behind exactly
one other: solo p50 + solo whole-turn p50 (the engine is one lock per process, so a turn that
comes while another runs waits for all of it; for TTS that is the whole reply, for the LLM the
whole generation); or `--budget-factor F` × solo p50, or `--budget-ms stage=ms`. Calls per
core is the last N that held.

    .venv/bin/python benchmarks/bench_stage_capacity.py [--stages stt,llm,tts] [--interval 8]
        [--duration 20] [--solo-turns 8] [--steps 2,4,8] [--budget-factor F] [--core 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import soundfile as sf
from nats.aio.client import Client
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_calls_capacity import finished_voices  # noqa: E402
from benchmarks.bench_tts_first_audio import REPLIES  # noqa: E402
from voicemesh.bench.harness import PREFIX, cpu_seconds, machine, stack_env  # noqa: E402
from voicemesh.bench.report import percentile  # noqa: E402
from voicemesh.bus import Flag, Frame, Kind, Subjects, decode, encode  # noqa: E402
from voicemesh.bus.events import Turn  # noqa: E402
from voicemesh.config.models import parse_agent_config  # noqa: E402
from voicemesh.launcher import Stack  # noqa: E402
from voicemesh.pipeline.text import SentenceSplitter  # noqa: E402
from voicemesh.servers import free_port, start_nats, start_valkey  # noqa: E402
from voicemesh.state import ConfigStore  # noqa: E402

STAGES = ("stt", "llm", "tts")
ENGINE = {"stt": "whisper tiny.en", "llm": "SmolLM2-135M", "tts": "Piper (joe)"}
#: what the benchmark listens on in place of the stage after this one in the default flow
NEXT_HOP = {"stt": "transport", "llm": "tts", "tts": "transport"}
WHAT = {
    "stt": "END sent → final transcript",
    "llm": "turn sent → first unit",
    "tts": "first unit sent → first audio",
}
#: steps: a few calls (a p95 within 2 × solo is passed at a low load already: a turn that waits
#: behind one other waits a whole turn), then fractions of the bound
FIRST_STEPS = (2, 3, 4)
FRACTIONS = (0.3, 0.5, 0.7, 0.85, 1.0, 1.2)
#: seconds the solo run watches the idle process, to take its idle cost off each turn's CPU
IDLE_S = 3.0
FRAME_S = 0.02
#: a turn not answered within this many intervals is lost (a newer turn of its call would
#: cancel it anyway)
LOST_AFTER = 1.0


def log(msg: str) -> None:
    print(f"bench_stage_capacity: {msg}", file=sys.stderr, flush=True)


class PinnedStack(Stack):
    """A stack of one stage process started under `taskset -c CORE`: the process and every
    thread it ever makes run on that core, and its engines see one usable core."""

    def __init__(self, env: dict[str, str], core: int):
        super().__init__(env)
        self.core = core

    def command(self, role: str) -> list[str]:
        return ["taskset", "-c", str(self.core), *super().command(role)]


@dataclass
class Inputs:
    utterances: list[bytes]  # 16 kHz PCM16, finished questions
    questions: list[str]  # what they say
    replies: list[list[str]]  # replies cut into units as the LLM stage cuts them


def load_inputs() -> Inputs:
    manifest = json.loads((ROOT / "voicemesh/bench/voices/manifest.json").read_text())
    items = manifest["items"] if isinstance(manifest, dict) else manifest
    text_of = {i["file"]: i["text"] for i in items}
    utterances, questions = [], []
    for path in finished_voices():
        data, rate = sf.read(str(path), dtype="int16")
        assert rate == 16000, path
        utterances.append(data.tobytes())
        questions.append(text_of[path.name])
    replies = []
    for reply in REPLIES:
        splitter = SentenceSplitter(first_words=5, early_first=True)
        replies.append([*splitter.push(reply + " "), *splitter.flush()])
    return Inputs(utterances, questions, replies)


@dataclass
class Turns:
    """Turns in flight and done: (session, epoch) → send time, latency, done time."""

    sent: dict[tuple[str, int], float] = field(default_factory=dict)
    first: dict[tuple[str, int], float] = field(default_factory=dict)
    #: the whole turn's work done (STT: the transcript; LLM, TTS: the reply's end marker)
    done: dict[tuple[str, int], float] = field(default_factory=dict)
    texts: dict[tuple[str, int], str] = field(default_factory=dict)
    #: TTS: the reply's units still to be closed (END) before the turn's work is done
    units_left: dict[tuple[str, int], int] = field(default_factory=dict)

    def answered(self, key: tuple[str, int], now: float, text: str = "") -> None:
        if key in self.sent and key not in self.first:
            self.first[key] = (now - self.sent[key]) * 1000
            if text:
                self.texts[key] = text

    def finished(self, key: tuple[str, int], now: float) -> None:
        if key in self.sent and key not in self.done:
            self.done[key] = (now - self.sent[key]) * 1000


class Driver:
    """Plays the rest of the pipeline for one stage: sends turns, hears answers."""

    def __init__(
        self, nc: Client, store: ConfigStore, stage: str, inputs: Inputs, history: int = 0
    ):
        self.nc, self.store, self.stage, self.inputs = nc, store, stage, inputs
        #: exchanges already in each LLM session's context when its first turn comes
        self.history = history
        self.made = 0  # sessions made so far: each LLM call gets a history of its own
        self.primary = ""  # the LLM's primary connector
        self.connector: dict[tuple[str, int], str] = {}
        self.subjects = Subjects(PREFIX)
        self.turns = Turns()
        self.epochs: dict[str, int] = {}

    async def listen(self) -> None:
        await self.nc.subscribe(
            self.subjects.data_all(NEXT_HOP[self.stage]),
            cb=self._heard,
            pending_msgs_limit=1_000_000,
        )
        if self.stage == "llm":
            await self.nc.subscribe(self.subjects.data_all("transport"), cb=self._llm_event)

    async def _heard(self, msg: Msg) -> None:
        now = time.perf_counter()
        frame = decode(msg.data)
        key = (Subjects.session_of(msg.subject), frame.epoch)
        if self.stage == "stt":
            if frame.kind is Kind.EVENT:
                body = frame.as_event
                if body.get("type") == "transcript" and body.get("final"):
                    self.turns.answered(key, now, str(body.get("text", "")))
                    self.turns.finished(key, now)
            return
        kind = Kind.TEXT if self.stage == "llm" else Kind.AUDIO
        if frame.kind is not kind:
            return
        if frame.payload and frame.index == 0:
            self.turns.answered(key, now, frame.as_text if kind is Kind.TEXT else "")
        elif kind is Kind.TEXT and frame.has(Flag.LAST):
            self.turns.finished(key, now)  # the LLM sends its marker after the last sentence
        elif kind is Kind.AUDIO and frame.has(Flag.END) and not frame.has(Flag.LAST):
            # TTS passes the reply's marker on at once, its units as each is synthesized
            left = self.turns.units_left[key] = self.turns.units_left.get(key, 1) - 1
            if left <= 0:
                self.turns.finished(key, now)

    async def sessions(self, n: int, agent_file: Path) -> list[str]:
        config = parse_agent_config(await asyncio.to_thread(agent_file.read_bytes))
        sids = [(await self.store.create_session(config, ttl_s=3600)).session_id for _ in range(n)]
        if self.stage == "llm" and self.history:
            for sid in sids:
                # a history of its own, as calls have: llama.cpp reuses the evaluated prompt
                # when the next one starts the same way, which calls served in turn never do
                self.made += 1
                await self.store.append_context(sid, *self.past(self.made))
                self.epochs[sid] = self.history
        if self.stage == "stt":  # the STT stage owns each session's stream through its lease
            for sid in sids:
                body = json.dumps({"session_id": sid}).encode()
                await self.nc.request(self.subjects.assign("stt"), body, timeout=10)
        return sids

    def past(self, offset: int) -> list[dict[str, Any]]:
        """`history` exchanges of a call so far: the shipped questions, replies of SmolLM2's
        kind."""
        q, r = self.inputs.questions, REPLIES
        return [
            m
            for e in range(1, self.history + 1)
            for m in (
                {"role": "user", "content": q[(offset + e) % len(q)], "epoch": e},
                {"role": "assistant", "content": r[(offset + e) % len(r)], "epoch": e},
            )
        ]

    async def end(self, sids: list[str]) -> None:
        for sid in sids:
            await self.nc.publish(self.subjects.ctl(sid), encode(Frame.event({"type": "call_end"})))
            await self.store.delete_config(sid)

    async def turn(self, sid: str, n: int) -> None:
        """One turn of call `sid`, its `n`th input (cycled)."""
        epoch = self.epochs[sid] = self.epochs.get(sid, 0) + 1
        key = (sid, epoch)
        await self.nc.publish(self.subjects.ctl(sid), encode(Frame.event(Turn(epoch=epoch))))
        inputs, out = self.inputs, self.subjects.data(self.stage, sid)
        if self.stage == "stt":
            pcm = inputs.utterances[n % len(inputs.utterances)]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            step = int(16000 * FRAME_S) * 2
            for seq, at in enumerate(range(0, len(pcm), step)):
                flags = Flag.START if seq == 0 else Flag.NONE
                frame = Frame.audio(
                    pcm[at : at + step], sample_rate=16000, epoch=epoch, seq=seq, flags=flags
                )
                await self.nc.publish(out, encode(frame))
                delay = t0 + (seq + 1) * FRAME_S - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            end = Frame.audio(
                b"", sample_rate=16000, epoch=epoch, seq=seq + 1, flags=Flag.END | Flag.LAST
            )
            self.turns.sent[key] = time.perf_counter()
            await self.nc.publish(out, encode(end))
        elif self.stage == "llm":
            text = inputs.questions[n % len(inputs.questions)]
            self.turns.sent[key] = time.perf_counter()
            frame = Frame.text(text, epoch=epoch, flags=Flag.START | Flag.END | Flag.LAST)
            await self.nc.publish(out, encode(frame))
        else:
            units = inputs.replies[n % len(inputs.replies)]
            self.turns.units_left[key] = len(units)
            self.turns.sent[key] = time.perf_counter()
            for index, unit in enumerate(units):
                frame = Frame.text(unit, epoch=epoch, index=index, flags=Flag.START | Flag.END)
                await self.nc.publish(out, encode(frame))
            marker = Frame.text("", epoch=epoch, index=len(units), flags=Flag.END | Flag.LAST)
            await self.nc.publish(out, encode(marker))

    def results(self, keys: list[tuple[str, int]]) -> tuple[list[float], int]:
        got = [self.turns.first[k] for k in keys if k in self.turns.first]
        return got, len(keys) - len(got)

    def fell_back(self, keys: list[tuple[str, int]]) -> int:
        """LLM turns another connector than the primary answered (the agent's scripted
        fallback, once SmolLM2 gave no first token within its attempt timeout, or while it is
        marked down after that): the reply came, but not the engine's."""
        return sum(k in self.connector and self.connector[k] != self.primary for k in keys)

    async def _llm_event(self, msg: Msg) -> None:
        """The LLM's transcript events name the connector that made each sentence."""
        frame = decode(msg.data)
        if frame.kind is Kind.EVENT:
            body = frame.as_event
            if body.get("type") == "transcript" and body.get("index") == 0:
                key = (Subjects.session_of(msg.subject), frame.epoch)
                self.connector[key] = str(body.get("connector"))


async def wait_answered(
    driver: Driver, keys: list[tuple[str, int]], limit_s: float, *, whole: bool = False
) -> None:
    """Until every turn of `keys` is answered (`whole`: its work is done), or `limit_s`."""
    seen = driver.turns.done if whole else driver.turns.first
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and any(k not in seen for k in keys):  # noqa: ASYNC110
        await asyncio.sleep(0.02)


def sent_keys(driver: Driver, sids: list[str], before: dict[str, int]) -> list[tuple[str, int]]:
    return [(s, e) for s in sids for e in range(before.get(s, 0) + 1, driver.epochs.get(s, 0) + 1)]


async def solo(driver: Driver, pid: int, agent: Path, turns: int) -> dict[str, Any]:
    """Turns one at a time, each in a session of its own (so each LLM turn has the same history
    before it) and after the last turn's whole work was done: the stage's own latency and CPU
    per turn."""
    (warm,) = await driver.sessions(1, agent)
    await driver.turn(warm, 0)  # a warm-up turn, not counted
    await wait_answered(driver, sent_keys(driver, [warm], {}), 30, whole=True)
    await driver.end([warm])
    await asyncio.sleep(0.5)
    idle0, t_idle = cpu_seconds([pid]), time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle = (cpu_seconds([pid]) - idle0) / (time.monotonic() - t_idle)
    keys, cpu_of = [], {}
    for n in range(1, turns + 1):
        (sid,) = await driver.sessions(1, agent)
        before = dict(driver.epochs)
        await asyncio.sleep(0.3)
        cpu0, t0 = cpu_seconds([pid]), time.monotonic()
        await driver.turn(sid, n)
        mine = sent_keys(driver, [sid], before)
        await wait_answered(driver, mine, 30, whole=True)
        # the turn's work only: the process's idle cost over the same time is taken off
        cpu_of[mine[0]] = cpu_seconds([pid]) - cpu0 - idle * (time.monotonic() - t0)
        keys += mine
        await driver.end([sid])
    # the engine's own figures: a turn the fallback answered (SmolLM2 gave no first token in
    # time, or was marked down after that) measures the fallback
    fell_back = driver.fell_back(keys)
    keys = [k for k in keys if not driver.fell_back([k])]
    if fell_back:
        log(f"{driver.stage}: {fell_back} solo turns answered by the fallback, left out")
    latencies, lost = driver.results(keys)
    whole = [driver.turns.done[k] for k in keys if k in driver.turns.done]
    cpu = sum(cpu_of[k] for k in keys)
    return {
        "turns": turns,
        "lost": lost,
        "fallback": fell_back,
        "p50_ms": _r(percentile(latencies, 50)),
        "p95_ms": _r(percentile(latencies, 95)),
        "whole_p50_ms": _r(percentile(whole, 50)),
        "cpu_s_per_turn": round(cpu / max(1, len(keys)), 3),
        "idle_cpu_per_s": round(idle, 4),
        "samples": [_r(x) for x in latencies],
        "example": next(iter(driver.turns.texts.get(k, "") for k in keys), ""),
    }


async def step(
    driver: Driver,
    pid: int,
    agent: Path,
    calls: int,
    interval: float,
    duration: float,
    min_turns: int,
) -> dict[str, Any]:
    """`calls` concurrent calls, each a turn every `interval` s from a random phase, for
    `duration` s; then the turns still out get up to one interval to be answered."""
    # at least `min_turns` turns, so a step of few calls still has a p95 worth reading
    duration = max(duration, math.ceil(min_turns / calls) * interval)
    sids = await driver.sessions(calls, agent)
    before = dict(driver.epochs)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    rng = random.Random(calls)
    cpu0 = cpu_seconds([pid])

    running: set[asyncio.Task[None]] = set()

    async def call(i: int, sid: str) -> None:
        t = start + rng.uniform(0, interval)
        n = i * 7
        while t < start + duration:
            await asyncio.sleep(max(0.0, t - loop.time()))
            task = asyncio.ensure_future(driver.turn(sid, n))  # open loop: never waits for it
            running.add(task)
            task.add_done_callback(running.discard)
            n += 1
            t += interval

    await asyncio.gather(*(call(i, s) for i, s in enumerate(sids)))
    keys = sent_keys(driver, sids, before)
    await asyncio.sleep(0.1)
    await wait_answered(driver, keys, LOST_AFTER * interval + 4)
    cpu = cpu_seconds([pid]) - cpu0
    latencies, lost = driver.results(keys)
    whole = [driver.turns.done[k] for k in keys if k in driver.turns.done]
    await driver.end(sids)
    return {
        "calls": calls,
        "turns": len(keys),
        "lost": lost,
        "fallback": driver.fell_back(keys),
        "p50_ms": _r(percentile(latencies, 50)),
        "p95_ms": _r(percentile(latencies, 95)),
        "p99_ms": _r(percentile(latencies, 99)),
        "whole_p50_ms": _r(percentile(whole, 50)),
        "cpu_s_per_turn": round(cpu / max(1, len(keys)), 3),
        "core_busy": round(cpu / (loop.time() - start), 2),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def plan_steps(bound: float, fixed: list[int] | None) -> list[int]:
    if fixed:
        return fixed
    return sorted({*FIRST_STEPS, *(max(2, round(bound * f)) for f in FRACTIONS)})


async def measure_stage(
    stage: str, args: argparse.Namespace, inputs: Inputs, data: Path
) -> dict[str, Any]:
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    env = stack_env(nats_srv.url, valkey_srv.url)
    store = ConfigStore.from_url(valkey_srv.url, key_prefix=PREFIX)
    await store.ensure_default_agent("local", parse_agent_config(args.agent.read_bytes()))
    stack = PinnedStack(env, args.core)
    nc: Client | None = None
    try:
        proc = stack.spawn(stage, stage, VOICEMESH_METRICS_PORT=str(free_port()))
        nc = await nats.connect(nats_srv.url, name="bench-stage-capacity")
        t0 = time.monotonic()
        log(f"{stage}: loading {ENGINE[stage]} in `voicemesh serve {stage}` on core {args.core}...")
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{stage} exited: {stack.death(stage)}")
            with contextlib.suppress(Exception):
                await nc.request(Subjects(PREFIX).health(stage), b"{}", timeout=0.5)
                break
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"{stage} not ready after 600 s")
            await asyncio.sleep(0.2)
        log(f"{stage}: ready in {time.monotonic() - t0:.1f} s; affinity {_affinity(proc.pid)}")
        driver = Driver(nc, store, stage, inputs, args.history)
        driver.primary = parse_agent_config(args.agent.read_bytes()).connectors["llm"].primary
        await driver.listen()
        log(f"{stage}: {args.solo_turns} turns one at a time...")
        alone = await solo(driver, proc.pid, args.agent, args.solo_turns)
        if alone["p50_ms"] is None:
            raise RuntimeError(f"{stage}: no solo turn was answered")
        bound = args.interval / max(alone["cpu_s_per_turn"], 1e-3)
        if stage in args.budget_ms:
            budget = args.budget_ms[stage]
        elif args.budget_factor:
            budget = args.budget_factor * alone["p50_ms"]
        else:  # a turn that waits behind one other
            budget = alone["p50_ms"] + (alone["whole_p50_ms"] or alone["p50_ms"])
        log(
            f"{stage}: solo p50 {alone['p50_ms']:.0f} ms, {alone['cpu_s_per_turn']:.3f} CPU s/turn,"
            f" bound {bound:.1f} calls at {args.interval:g} s; budget p95 ≤ {budget:.0f} ms"
        )
        steps, held = [], None
        for n in plan_steps(bound, args.steps):
            log(f"{stage}: {n} calls for {args.duration:g} s...")
            r = await step(
                driver, proc.pid, args.agent, n, args.interval, args.duration, args.min_turns
            )
            r["held"] = bool(
                r["p95_ms"] is not None
                and r["p95_ms"] <= budget
                and not r["lost"]
                and not r["fallback"]
            )
            steps.append(r)
            log(
                f"{stage}:   {n} calls: p50 {r['p50_ms']} / p95 {r['p95_ms']} ms over "
                f"{r['turns']} turns, {r['lost']} lost, {r['fallback']} by the fallback, "
                f"core {r['core_busy']:.0%} busy -> " + ("held" if r["held"] else "over budget")
            )
            if not r["held"]:
                break
            held = n
        return {
            "stage": stage,
            "engine": ENGINE[stage],
            "measures": WHAT[stage],
            "solo": alone,
            "bound_calls": round(bound, 1),
            "budget_ms": round(budget, 1),
            "steps": steps,
            "calls_per_core": held,
        }
    finally:
        if nc is not None:
            await nc.close()
        await asyncio.to_thread(stack.stop)
        await store.close()
        nats_srv.stop()
        valkey_srv.stop()


def _affinity(pid: int) -> str:
    cores = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            cores |= os.sched_getaffinity(int(tid))
    return ",".join(map(str, sorted(cores)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    inputs = load_inputs()
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["benchmarks/bench_stage_capacity.py", *sys.argv[1:]]),
        "load_before": os.getloadavg(),
        "interval_s": args.interval,
        "duration_s": args.duration,
        "core": args.core,
        "history": args.history,
        "budget_rule": (
            f"{args.budget_factor:g} × solo p50"
            if args.budget_factor
            else "solo p50 + solo whole-turn p50 (a turn that waits behind one other)"
        )
        + (f"; set: {args.budget_ms}" if args.budget_ms else ""),
        "stages": [],
    }
    for stage in args.stages:
        with tempfile.TemporaryDirectory(prefix="voicemesh-stagecap-") as data:
            report["stages"].append(await measure_stage(stage, args, inputs, Path(data)))
    report["load_after"] = os.getloadavg()
    return report


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f} ms"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    interval = report["interval_s"]
    lines = [
        "# Stage capacity: calls per core for each offline engine",
        "",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['date']}",
        f"- Command: `{report['command']}`",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in report['load_before'])} /"
        f" {', '.join(f'{x:.1f}' for x in report['load_after'])}",
        f"- One stage process (`voicemesh serve <stage>`, the default agent's engine) under "
        f"`taskset -c {report['core']}`; each call a turn every {interval:g} s from a random "
        f"phase, open loop; {report['duration_s']:g} s per step",
        "- Capacity: the most calls whose turn latency p95 stayed within the budget with no turn "
        "lost (and, for the LLM, none answered by the agent's scripted fallback); the bound is "
        "interval ÷ CPU s per turn (the core 100 % busy, no queueing)",
        f"- Budget (p95 of the latency measured): {report['budget_rule']}",
        f"- LLM turns: {report['history']} exchanges of the call already in the context",
        "",
        "| stage | engine | latency measured | solo p50 | CPU s / turn | budget (p95) "
        f"| calls per core at {interval:g} s | bound {interval:g} s ÷ CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report["stages"]:
        held = s["calls_per_core"]
        if held is None:  # even the first step failed
            held = f"< {s['steps'][0]['calls']}" if s["steps"] else "?"
        lines.append(
            f"| {s['stage']} | {s['engine']} | {s['measures']} | {_ms(s['solo']['p50_ms'])} "
            f"| {s['solo']['cpu_s_per_turn']:.3f} | {_ms(s['budget_ms'])} "
            f"| **{held}** "
            f"| {s['bound_calls']:.1f} |"
        )
    lines += ["", "## Steps", ""]
    lines += [
        "| stage | calls | turns | lost | by the fallback | p50 | p95 | p99 | whole turn p50 "
        "| CPU s / turn | core busy | held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["stages"]:
        solo = s["solo"]
        lines.append(
            f"| {s['stage']} | 1 (solo, one at a time) | {solo['turns']} | {solo['lost']} "
            f"| {solo['fallback']} "
            f"| {_ms(solo['p50_ms'])} | {_ms(solo['p95_ms'])} | | {_ms(solo['whole_p50_ms'])} "
            f"| {solo['cpu_s_per_turn']:.3f} | | |"
        )
        for r in s["steps"]:
            lines.append(
                f"| {s['stage']} | {r['calls']} | {r['turns']} | {r['lost']} | {r['fallback']} "
                f"| {_ms(r['p50_ms'])} "
                f"| {_ms(r['p95_ms'])} | {_ms(r['p99_ms'])} | {_ms(r['whole_p50_ms'])} "
                f"| {r['cpu_s_per_turn']:.3f} "
                f"| {r['core_busy']:.0%} | {'yes' if r['held'] else 'no'} |"
            )
    lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stages, strict=True):
        xs = [1] + [r["calls"] for r in s["steps"]]
        p50 = [s["solo"]["p50_ms"]] + [r["p50_ms"] for r in s["steps"]]
        p95 = [s["solo"]["p95_ms"]] + [r["p95_ms"] for r in s["steps"]]
        ax.plot(xs, p50, "o-", label="p50")
        ax.plot(xs, p95, "s-", label="p95")
        ax.axhline(s["budget_ms"], color="red", linestyle="--", label="budget")
        ax.axvline(s["bound_calls"], color="gray", linestyle=":", label="bound")
        ax.set_title(f"{s['stage']}: {s['engine']}")
        ax.set_xlabel(f"concurrent calls (a turn every {report['interval_s']:g} s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_budgets(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, text.split(",")):
        stage, _, ms = part.partition("=")
        if stage not in STAGES:
            raise argparse.ArgumentTypeError(f"unknown stage {stage!r} in --budget-ms")
        out[stage] = float(ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=lambda s: s.split(","), default=list(STAGES))
    parser.add_argument(
        "--interval", type=float, default=8.0, help="seconds between a call's turns"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of turns per step")
    parser.add_argument("--solo-turns", type=int, default=8)
    parser.add_argument("--min-turns", type=int, default=12, help="turns per step at least")
    parser.add_argument(
        "--history",
        type=int,
        default=8,
        help="exchanges in each LLM call's context before its first turn (a call's middle)",
    )
    parser.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="call counts to try (default: 2, 3, 4, then 0.3-1.2 × the bound)",
    )
    parser.add_argument(
        "--budget-factor",
        type=float,
        default=None,
        help="p95 ≤ this × solo p50 (default: solo p50 + solo whole-turn p50)",
    )
    parser.add_argument(
        "--budget-ms", type=parse_budgets, default={}, help="absolute p95 budgets: stt=800,tts=300"
    )
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--agent", type=Path, default=ROOT / "config" / "agent-config.json")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "stage-capacity.md"
    )
    args = parser.parse_args()
    for stage in args.stages:
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}")
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    text = markdown(report)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
