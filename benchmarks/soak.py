"""Soak: many concurrent WebSocket calls through the whole stack, with pass-through connectors.

    .venv/bin/python benchmarks/soak.py [--calls 200] [--seconds 60] [--instances 1]
        [--transports 1] [--clients N] [--quick] [--out FILE]

It starts its own nats-server and valkey-server and every role as its own process (`--transports`
transport processes, calls spread over them round-robin, and `--instances` of each of stt, llm and
tts, all with `passthrough` connectors), then drives
`--calls` concurrent calls on `/ws/call` from one or two client processes (uvloop; one shared
20 ms ticker per process sends every call's next frame), each call its own session, for
`--seconds`. With pass-through connectors the caller's own audio comes back as the bot's audio, so
each call checks, frame by frame, what it gets back against what it said.

Every 20 ms frame a call sends carries a watermark in its first 16 samples (one nibble a sample,
so silence stays far below the VAD threshold): a magic pattern, the call's index, the frame's
counter within the call, speech/silence, a checksum. Its other 304 samples are the call's own tone
(speech, ~ -12 dBFS) or zeros (silence, < -80 dBFS). An echoed frame must be byte-identical to the
frame of that counter the call sent.

A turn is: S speech frames (S varies 10-40 per turn), then E = end_of_turn_silence_ms / 20
silence frames. The session's transport options are `vad: energy`, start 40 ms, pre-roll
P = preroll_ms / 20 frames, barge-in 40 ms. Before every turn the call has sent at least P
silence frames since the previous turn ended, so the transport's turn detector opens the turn on
the 2nd speech frame with exactly P frames of pre-roll, and closes it on the E-th silence frame
(that frame included). The echo of a turn is therefore exactly the P + S + E consecutive frames
from counter (first speech - P) to (first speech + S + E - 1), nothing more, nothing less:

- lost: a frame of that range that never came back (by the end of the run, plus a drain);
- mixed: a frame whose watermark names another call; corrupt: bad watermark or payload;
- unexpected: a frame outside every turn's range (e.g. silence echoed), duplicate: twice.

After the E-th silence frame the call keeps sending silence (as a microphone would) until the
whole echo is back and the transport said `bot_done` for the turn (with pass-through it never
does, see results/soak.md: then 5 frames after the echo is complete), or a turn timeout of 10 s,
then a gap of silence, then the next turn. A turn given up on loses the rest of its echo by design
(the next turn is a barge-in, which drops queued bot audio), so its missing frames count as lost.
When time is up a call waits up to 30 s for its last echo before it hangs up.

Per-turn latency: the turn's last frame (the one that ended the turn) from sent to echoed back,
through VAD, the bus, the three stages and the paced playout. Memory: VmRSS of each process
every 5 s (every 1 s with --quick); start = first sample after the warm-up, end = the last sample
before the calls hang up, slope by least squares over that window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import shlex
import struct
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from voicemesh.bench.harness import FLOW, cpu_seconds, machine, stack_env
from voicemesh.bench.report import summarize
from voicemesh.config.models import parse_agent_config
from voicemesh.launcher import Stack
from voicemesh.servers import free_ports, start_nats, start_valkey
from voicemesh.state import ConfigStore

PREFIX = "vsoak"
RESULTS = Path(__file__).parent / "results" / "soak.md"

# --- the call's audio --------------------------------------------------------------------------

RATE = 16000
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000  # 320
FRAME_BYTES = FRAME_SAMPLES * 2
MARK_SAMPLES = 16
MAGIC = (0xA, 0x5)
_MARK = struct.Struct(f"<{MARK_SAMPLES}h")

START_MS, PREROLL_MS, END_MS = 40, 60, 100
P_FRAMES, E_FRAMES = PREROLL_MS // FRAME_MS, END_MS // FRAME_MS
SPEECH_MIN, SPEECH_MAX = 10, 40  # frames of speech in a turn
GAP_FRAMES = 10  # silence after a turn's echo is complete, before the next (>= P_FRAMES)
TURN_TIMEOUT_S = 10.0  # a caller waits this long for a turn's echo, then speaks again
FINAL_WAIT_S = 30.0  # for its last turn's echo before hanging up (hanging up drops the rest)
DRAIN_S = 2.0
MIN_MEMORY_WINDOW_S = 30.0  # a shorter run reports memory but does not judge it
DONE_GRACE_TICKS = 5  # echo complete but no bot_done yet: wait this many frames more for it

TRANSPORT_OPTIONS = {
    "vad": "energy",
    "energy_threshold_db": -40.0,
    "start_speech_ms": START_MS,
    "barge_in_speech_ms": START_MS,
    "end_of_turn_silence_ms": END_MS,
    "preroll_ms": PREROLL_MS,
    "turn": "silence",
}


def soak_config() -> Any:
    relay = {"primary": "passthrough"}
    return parse_agent_config(
        {
            "pipeline": {"name": "soak", "flow": FLOW},
            "connectors": {
                "stt": relay,
                "llm": relay,
                "tts": relay,
                "transport": {
                    "primary": "websocket",
                    "config": {"websocket": TRANSPORT_OPTIONS},
                },
            },
        }
    )


def nibbles(value: int, n: int) -> list[int]:
    return [(value >> (4 * i)) & 0xF for i in range(n)]


def watermark(call: int, counter: int, speech: bool) -> bytes:
    body = [*nibbles(call, 4), *nibbles(counter, 8), int(speech)]
    check = 0
    for v in body:
        check ^= v
    return _MARK.pack(*MAGIC, *body, check)


def read_mark(frame: bytes) -> tuple[int, int, bool] | None:
    """(call, counter, speech) from a frame's watermark; None if it is not one."""
    v = _MARK.unpack_from(frame)
    if (v[0], v[1]) != MAGIC or any(not 0 <= x <= 15 for x in v):
        return None
    check = 0
    for x in v[2:15]:
        check ^= x
    if check != v[15]:
        return None
    call = sum(x << (4 * i) for i, x in enumerate(v[2:6]))
    counter = sum(x << (4 * i) for i, x in enumerate(v[6:14]))
    return call, counter, bool(v[14])


def tone(call: int) -> bytes:
    """The rest of a speech frame: the call's own tone, a whole number of periods per frame."""
    cycles = 3 + call % 37  # 150..1950 Hz
    samples = [
        round(12000 * math.sin(2 * math.pi * cycles * (MARK_SAMPLES + i) / FRAME_SAMPLES))
        for i in range(FRAME_SAMPLES - MARK_SAMPLES)
    ]
    return struct.pack(f"<{len(samples)}h", *samples)


SILENCE_BODY = bytes(FRAME_BYTES - MARK_SAMPLES * 2)


# --- one call (in a client process) ------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    lo: int  # first counter of the expected echo (pre-roll)
    speech: int  # first speech frame
    hi: int  # last counter: the E-th silence frame, which ends the turn
    epoch: int | None = None
    got: int = 0
    bot_done: bool = False
    ended_at: float | None = None  # when frame `hi` was sent
    complete_at: float | None = None
    timed_out: bool = False

    @property
    def n(self) -> int:
        return self.hi - self.lo + 1


@dataclass(eq=False)
class Caller:
    index: int
    session: str
    stop_at: float
    turn_latency: array = field(default_factory=lambda: array("d"))
    turn_at: array = field(default_factory=lambda: array("d"))  # when the turn ended, s from go
    frame_latency: array = field(default_factory=lambda: array("d"))

    def __post_init__(self) -> None:
        self.speech_body = tone(self.index)
        self.counter = 0
        self.started = 0.0
        self.sent_at = array("d")
        self.expect: dict[int, Turn] = {}
        self.received: set[int] = set()
        self.turns: list[Turn] = []
        self.open: Turn | None = None
        self.script = self._script()
        self.finished = False
        self.ws: Any = None
        self.error: str | None = None
        self.c: Counter[str] = Counter()
        self.errors: list[str] = []

    # what the call says, one frame per tick
    def _script(self) -> Any:
        lead = P_FRAMES + (self.index * 7) % 50  # turns of different calls out of step
        for _ in range(lead):
            yield False
        k = 0
        while time.perf_counter() < self.stop_at:
            s = SPEECH_MIN + (self.index * 7 + k * 13) % (SPEECH_MAX - SPEECH_MIN + 1)
            first = self.counter
            turn = Turn(lo=first - P_FRAMES, speech=first, hi=first + s + E_FRAMES - 1)
            for c in range(turn.lo, turn.hi + 1):
                self.expect[c] = turn
            self.turns.append(turn)
            self.open = turn
            for _ in range(s):
                yield True
            for _ in range(E_FRAMES):
                yield False
            turn.ended_at = self.sent_at[turn.hi]
            waited = 0
            while True:
                now = time.perf_counter()
                if turn.complete_at is not None and (turn.bot_done or waited >= DONE_GRACE_TICKS):
                    break
                if turn.complete_at is not None:
                    waited += 1
                if now - turn.ended_at > TURN_TIMEOUT_S:
                    turn.timed_out = True
                    self.c["turns_timed_out"] += 1
                    break
                yield False
            self.c["turns"] += 1
            k += 1
            for _ in range(GAP_FRAMES):
                yield False
        # time is up: the echo of a turn given up on may still be coming; hanging up would cut it
        last = self.turns[-1] if self.turns else None
        while (
            last is not None
            and last.complete_at is None
            and time.perf_counter() - (last.ended_at or 0) < FINAL_WAIT_S
        ):
            yield False

    def next_frame(self) -> bytes | None:
        try:
            speech = next(self.script)
        except StopIteration:
            return None
        c = self.counter
        self.counter += 1
        self.sent_at.append(time.perf_counter())
        self.c["frames_sent"] += 1
        return watermark(self.index, c, speech) + (self.speech_body if speech else SILENCE_BODY)

    def on_audio(self, data: bytes, now: float) -> None:
        if len(data) % FRAME_BYTES:
            self.c["misaligned_messages"] += 1
        for i in range(0, len(data) - FRAME_BYTES + 1, FRAME_BYTES):
            self._frame(data[i : i + FRAME_BYTES], now)

    def _frame(self, frame: bytes, now: float) -> None:
        self.c["frames_received"] += 1
        mark = read_mark(frame)
        if mark is None:
            self.c["corrupt"] += 1
            return
        call, c, speech = mark
        if call != self.index:
            self.c["mixed"] += 1
            if len(self.errors) < 5:
                self.errors.append(f"call {self.index} got frame {c} of call {call}")
            return
        body = self.speech_body if speech else SILENCE_BODY
        if frame[MARK_SAMPLES * 2 :] != body or c >= self.counter:
            self.c["corrupt"] += 1
            return
        turn = self.expect.pop(c, None)
        if turn is None:
            self.c["duplicate" if c in self.received else "unexpected"] += 1
            return
        self.received.add(c)
        if turn.timed_out:
            self.c["late"] += 1
        turn.got += 1
        if c >= turn.speech:
            self.frame_latency.append(now - self.sent_at[c])
        if c == turn.hi:
            self.turn_latency.append(now - self.sent_at[c])
            self.turn_at.append(self.sent_at[c] - self.started)
        if turn.got == turn.n:
            turn.complete_at = now

    def on_event(self, ev: dict[str, Any]) -> None:
        kind = str(ev.get("type"))
        self.c[f"event_{kind}"] += 1
        if kind == "turn" and self.open is not None and self.open.epoch is None:
            self.open.epoch = int(ev["epoch"])
        elif kind == "bot_done":
            for t in reversed(self.turns):
                if t.epoch == ev.get("epoch"):
                    t.bot_done = True
                    break
        elif kind == "error" and len(self.errors) < 5:
            self.errors.append(f"call {self.index}: {ev.get('error')}")

    def lost_so_far(self, now: float) -> int:
        """Frames of turns given up on (timed out) that have not come back."""
        return sum(t.n - t.got for t in self.turns if t.ended_at and now - t.ended_at > 5)

    def tally(self) -> Counter[str]:
        out = Counter(self.c)
        out["frames_expected"] = sum(t.n for t in self.turns if t.ended_at is not None)
        out["frames_lost"] = sum(t.n - t.got for t in self.turns if t.ended_at is not None)
        out["turns_without_bot_done"] = sum(
            1 for t in self.turns if t.ended_at is not None and not t.bot_done
        )
        out["calls_failed"] = int(self.error is not None)
        return out


async def _run_calls(
    worker: int, calls: list[tuple[int, str, str]], seconds: float, go: Any, out: Any
) -> None:
    import websockets

    loop = asyncio.get_running_loop()
    callers = [Caller(i, sid, stop_at=math.inf) for i, sid, _ in calls]
    urls = {i: url for i, _, url in calls}
    sem = asyncio.Semaphore(20)

    async def connect(caller: Caller) -> None:
        async with sem:
            caller.ws = await websockets.connect(
                f"{urls[caller.index]}?session_id={caller.session}",
                max_size=None,
                ping_interval=None,
                open_timeout=60,
                compression=None,
            )
            hello = orjson.loads(await asyncio.wait_for(caller.ws.recv(), 30))
            if hello.get("type") != "session":
                raise RuntimeError(f"call {caller.index}: {hello}")

    await asyncio.gather(*(connect(c) for c in callers))
    out.put(("ready", worker, None))
    while not go.is_set():  # noqa: ASYNC110 (a multiprocessing event)
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    for c in callers:
        c.stop_at, c.started = start + seconds, start

    async def receive(caller: Caller) -> None:
        try:
            async for msg in caller.ws:
                now = time.perf_counter()
                if isinstance(msg, bytes):
                    caller.on_audio(msg, now)
                else:
                    caller.on_event(orjson.loads(msg))
        except Exception as exc:
            if not caller.finished:
                caller.error = f"receive: {exc!r}"
        if not caller.finished and caller.error is None:
            caller.error = "the transport closed the call"

    receivers = [asyncio.create_task(receive(c)) for c in callers]
    lag = array("d")
    # one ticker for every call of this process, calls spread over the 20 ms period
    n = len(callers)
    buckets: dict[int, list[Caller]] = {}
    for i, c in enumerate(callers):
        buckets.setdefault(i * FRAME_MS // n, []).append(c)
    plan = sorted(buckets.items())
    period = FRAME_MS / 1000
    t0 = loop.time()
    tick, last_report = 0, 0.0
    live = set(callers)
    while live:
        base = t0 + tick * period
        for ms, group in plan:
            delay = base + ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif ms == 0:
                lag.append(-delay)
            for c in group:
                if c not in live:
                    continue
                if c.error is not None:
                    live.discard(c)
                    continue
                frame = c.next_frame()
                try:
                    if frame is None:
                        c.finished = True
                        live.discard(c)
                        await c.ws.send(orjson.dumps({"type": "end"}).decode())
                    else:
                        await c.ws.send(frame)
                except Exception as exc:
                    c.error = f"send: {exc!r}"
                    live.discard(c)
        tick += 1
        now = time.perf_counter()
        if now - last_report >= 1.0:
            last_report = now
            total: Counter[str] = Counter()
            for c in callers:
                total.update(c.c)
            total["alive"] = sum(1 for c in callers if c.error is None and not c.finished)
            total["lost_so_far"] = sum(c.lost_so_far(now) for c in callers)
            out.put(("progress", worker, dict(total)))
    # drain: echoes of the last turns still on their way
    deadline = time.perf_counter() + DRAIN_S

    def pending() -> bool:
        return any(t.got < t.n for c in callers for t in c.turns[-1:] if c.error is None)

    while time.perf_counter() < deadline and pending():  # noqa: ASYNC110 (bounded poll)
        await asyncio.sleep(0.05)
    for c in callers:
        c.finished = True
        with contextlib.suppress(Exception):
            await c.ws.close()
    for r in receivers:
        r.cancel()
    await asyncio.gather(*receivers, return_exceptions=True)
    total = Counter()
    turn_lat, turn_at, frame_lat = array("d"), array("d"), array("d")
    errors: list[str] = []
    for c in callers:
        total.update(c.tally())
        turn_lat.extend(c.turn_latency)
        turn_at.extend(c.turn_at)
        frame_lat.extend(c.frame_latency)
        if c.error:
            errors.append(f"call {c.index}: {c.error}")
        errors.extend(c.errors)
    out.put(
        (
            "result",
            worker,
            {
                "counts": dict(total),
                "turn_latency": turn_lat.tobytes(),
                "turn_at": turn_at.tobytes(),
                "frame_latency": frame_lat.tobytes(),
                "tick_lag": lag.tobytes(),
                "errors": errors[:20],
            },
        )
    )


def client_main(
    worker: int, calls: list[tuple[int, str, str]], seconds: float, go: Any, out: Any
) -> None:
    import uvloop

    try:
        uvloop.run(_run_calls(worker, calls, seconds, go, out))
    except BaseException:
        out.put(("failed", worker, traceback.format_exc()))


# --- the orchestrator --------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def wait_http(ports: list[int], limit_s: float = 60.0) -> None:
    """Until every transport answers /healthz (wait_ready hears the first one only)."""
    import httpx

    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=2) as http:
        for port in ports:
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the transport on port {port} did not start")
                await asyncio.sleep(0.2)


def usage(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Per process: (CPU seconds, seconds spent runnable but waiting for a CPU), all threads."""
    out = {}
    for name, pid in pids.items():
        waited = 0.0
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    waited += int((task / "schedstat").read_text().split()[1]) / 1e9
        out[name] = (cpu_seconds([pid]), waited)
    return out


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60


@dataclass
class Run:
    calls: int
    seconds: float
    instances: int
    clients: int
    transports: int
    interval: float
    warmup: float
    slope_limit: float = 2.0  # MB/min, per voicemesh role process


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


async def soak(run: Run, command: str) -> tuple[str, bool]:
    data = Path(tempfile.mkdtemp(prefix="voicemesh-soak-"))
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    env_vars = stack_env(nats_srv.url, valkey_srv.url, prefix=PREFIX, VOICEMESH_PRELOAD="false")
    env_vars.pop("VOICEMESH_DEFAULT_AGENT_FILE", None)
    ports = free_ports(run.transports)
    stack = Stack(env_vars, instances=run.instances, http_port=ports[0])
    store = ConfigStore.from_url(valkey_srv.url, key_prefix=PREFIX)
    workers: list[Any] = []
    ctx = mp.get_context("spawn")
    try:
        stack.start()
        for k, extra in enumerate(ports[1:], 2):  # more transports: calls are spread over them
            stack.spawn(
                f"transport-{k}",
                "transport",
                VOICEMESH_HTTP_HOST="127.0.0.1",
                VOICEMESH_HTTP_PORT=str(extra),
            )
        print(
            f"soak: starting the stack ({run.transports} transport(s),"
            f" {run.instances} instance(s) of each stage)...",
            flush=True,
        )
        await stack.wait_ready(nats_srv.url, PREFIX, limit_s=180)
        await wait_http(ports)
        config = soak_config()
        sids = [
            (await store.create_session(config, ttl_s=3600)).session_id for _ in range(run.calls)
        ]
        urls = [f"ws://127.0.0.1:{p}/ws/call" for p in ports]
        out = ctx.Queue()
        go = ctx.Event()
        shares = [
            [(i, sids[i], urls[i % len(urls)]) for i in range(w, run.calls, run.clients)]
            for w in range(run.clients)
        ]
        for w, share in enumerate(shares):
            p = ctx.Process(target=client_main, args=(w, share, run.seconds, go, out), daemon=True)
            p.start()
            workers.append(p)
        ready = 0
        deadline = time.monotonic() + 120
        while ready < run.clients:
            try:
                kind, w, body = out.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline or any(not p.is_alive() for p in workers):
                    raise RuntimeError("the callers did not connect") from None
                continue
            if kind == "failed":
                raise RuntimeError(f"client {w} failed:\n{body}")
            ready += kind == "ready"
        print(f"soak: {run.calls} calls connected; speaking for {run.seconds:.0f} s", flush=True)

        pids: dict[str, int] = {name: p.pid for name, p in stack.procs.items()}
        pids["nats-server"] = nats_srv.proc.pid
        pids["valkey-server"] = valkey_srv.proc.pid
        for w, p in enumerate(workers):
            pids[f"client-{w + 1}" if run.clients > 1 else "client"] = p.pid  # type: ignore[assignment]
        pids["orchestrator"] = os.getpid()
        series: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        cpu_at: dict[str, Any] = {}
        cpu_end: dict[str, Any] = {}

        go.set()
        t0 = time.monotonic()
        progress: dict[int, dict[str, int]] = {}
        results: dict[int, dict[str, Any]] = {}
        next_sample, next_print = 0.0, run.interval
        while len(results) < run.clients:
            now = time.monotonic() - t0
            if now >= next_sample and next_sample <= run.seconds + 1e-6:
                for name, pid in pids.items():
                    rss = rss_mb(pid)
                    if rss is not None:
                        series[name].append((next_sample, rss))
                if not cpu_at and next_sample >= run.warmup:
                    cpu_at = {"t": time.monotonic(), "m": machine_jiffies(), "p": usage(pids)}
                if next_sample + run.interval > run.seconds + 1e-6:
                    cpu_end = {"t": time.monotonic(), "m": machine_jiffies(), "p": usage(pids)}
                next_sample += run.interval
            if now >= next_print:
                next_print += 5.0 if run.seconds >= 30 else run.interval
                tot: Counter[str] = Counter()
                for snap in progress.values():
                    tot.update(snap)
                rss = {k: v[-1][1] for k, v in series.items() if v}
                print(
                    f"soak: t={now:5.1f}s  calls alive {tot['alive']:4d}  turns {tot['turns']:6d}"
                    f"  frames sent {tot['frames_sent']:8d} back {tot['frames_received']:8d}"
                    f"  lost so far {tot['lost_so_far']}  mixed {tot['mixed']}"
                    f"  RSS MB transport {fmt(rss.get('transport'))}"
                    f" stt {fmt(rss.get('stt', rss.get('stt-1')))}"
                    f" llm {fmt(rss.get('llm', rss.get('llm-1')))}"
                    f" tts {fmt(rss.get('tts', rss.get('tts-1')))}"
                    f" client {fmt(rss.get('client', rss.get('client-1')))}",
                    flush=True,
                )
            try:
                kind, w, body = out.get(timeout=0.1)
            except queue.Empty:
                if dead := stack.dead():
                    raise RuntimeError(f"role process(es) died: {dead}") from None
                if time.monotonic() - t0 > run.seconds + 60:
                    raise RuntimeError("the callers did not finish") from None
                continue
            if kind == "progress":
                progress[w] = body
            elif kind == "result":
                results[w] = body
            elif kind == "failed":
                raise RuntimeError(f"client {w} failed:\n{body}")
        for p in workers:
            p.join(10)
        return report(run, command, series, cpu_at, cpu_end, results, stack)
    finally:
        for p in workers:
            if p.is_alive():
                p.terminate()
                p.join(5)
        await asyncio.to_thread(stack.stop)
        await store.close()
        nats_srv.stop()
        valkey_srv.stop()


def report(
    run: Run,
    command: str,
    series: dict[str, list[tuple[float, float]]],
    cpu_at: dict[str, Any],
    cpu_end: dict[str, Any],
    results: dict[int, dict[str, Any]],
    stack: Stack,
) -> tuple[str, bool]:
    counts: Counter[str] = Counter()
    turn_lat, turn_at, frame_lat, lag = array("d"), array("d"), array("d"), array("d")
    errors: list[str] = []
    for r in results.values():
        counts.update(r["counts"])
        turn_lat.frombytes(r["turn_latency"])
        turn_at.frombytes(r["turn_at"])
        frame_lat.frombytes(r["frame_latency"])
        lag.frombytes(r["tick_lag"])
        errors.extend(r["errors"])
    roles = list(stack.procs)
    lost, mixed = counts["frames_lost"], counts["mixed"]
    bad = counts["corrupt"] + counts["unexpected"] + counts["duplicate"]
    mem_rows: list[tuple[Any, ...]] = []
    flat: bool | None = True
    for name, points in series.items():
        window = [(t, v) for t, v in points if run.warmup - 1e-6 <= t <= run.seconds + 1e-6]
        if not window:
            continue
        slope = slope_per_min(window)
        start, end = window[0][1], window[-1][1]
        judged = name in roles and run.seconds - run.warmup >= MIN_MEMORY_WINDOW_S
        ok = slope is not None and slope <= run.slope_limit
        if judged and not ok:
            flat = False
        verdict = ("PASS" if ok else "FAIL") if judged else "(info)"
        if name in roles and not judged:
            flat = None
        mem_rows.append((name, points[0][1], start, end, end - start, slope, verdict))
    cpu_rows, machine_busy, ours = [], None, 0.0
    if cpu_at and cpu_end:
        span = max(cpu_end["t"] - cpu_at["t"], 1e-9)
        for name, (c1, w1) in cpu_at["p"].items():
            if name in cpu_end["p"]:
                c2, w2 = cpu_end["p"][name]
                cpu_rows.append((name, 100 * (c2 - c1) / span, 100 * (w2 - w1) / span))
                ours += (c2 - c1) / span
        (b1, t1), (b2, t2) = cpu_at["m"], cpu_end["m"]
        machine_busy = 100 * (b2 - b1) / max(t2 - t1, 1)
    timeline = []
    step = 10.0 if run.seconds >= 30 else 2.0
    for k in range(math.ceil(run.seconds / step)):
        window = [
            lat * 1000
            for lat, at in zip(turn_lat, turn_at, strict=True)
            if k * step <= at < (k + 1) * step
        ]
        st = summarize(window)
        timeline.append((k * step, (k + 1) * step, len(window), st["p50"], st["p99"]))
    tl = summarize([x * 1000 for x in turn_lat])
    fl = summarize([x * 1000 for x in frame_lat])
    lg = summarize([x * 1000 for x in lag])
    turns = counts["turns"]
    ok = lost == 0 and mixed == 0 and bad == 0 and counts["calls_failed"] == 0
    m = machine()

    def verdict(good: bool) -> str:
        return "**PASS**" if good else "**FAIL**"

    lines = [
        "# Soak: concurrent WebSocket calls through the whole stack, pass-through connectors",
        "",
        f"**Machine:** {m['cores']} cores, {m['memory_gib']} GiB RAM, Python {m['python']}, "
        f"{m['platform']} (shared with other engineers' test runs: CPU is contended)  ",
        f"**Date:** {m['date']}  ",
        f"**Command:** `{command}`",
        "",
        f"{run.calls} calls on `/ws/call` from {run.clients} client process(es) (uvloop), each its"
        f" own session, for {run.seconds:.0f} s; {run.transports} transport(s) (calls spread"
        f" round-robin) + {run.instances} instance(s) each of"
        " stt, llm, tts with `passthrough`, each role its own process, embedded nats-server and"
        " valkey-server. Transport options: energy VAD, start/barge-in"
        f" {START_MS} ms, pre-roll {PREROLL_MS} ms, end of turn {END_MS} ms of silence. A turn is"
        f" {SPEECH_MIN}-{SPEECH_MAX} frames of the call's watermarked tone + {E_FRAMES} silence"
        f" frames; its echo must be exactly P + S + E = {P_FRAMES} + S + {E_FRAMES} frames"
        " (see the module docstring for the rule), each byte-identical to what the call sent.",
        "",
        "## Verdict",
        "",
        "| criterion | measured | result |",
        "| :-- | :-- | :-- |",
        f"| no frame lost | {lost} lost of {counts['frames_expected']} expected echo frames"
        f" ({counts['late']} late) | {verdict(lost == 0)} |",
        f"| no session mixed | {mixed} frames of another call; {bad} corrupt/unexpected/duplicate"
        f" | {verdict(mixed == 0 and bad == 0)} |",
        f"| memory flat (each role process, slope ≤ {run.slope_limit:g} MB/min after"
        f" {run.warmup:g} s warm-up) | see below |"
        f" {verdict(flat) if flat is not None else 'not judged (run too short)'} |",
        f"| every call completes | {counts['calls_failed']} of {run.calls} failed |"
        f" {verdict(counts['calls_failed'] == 0)} |",
        "",
        "## Traffic and latency",
        "",
        "| figure | value |",
        "| :-- | --: |",
        f"| turns completed | {turns} ({turns / max(run.calls, 1):.1f} per call,"
        f" {turns / run.seconds:.0f} per s) |",
        f"| turns timed out (echo not complete in {TURN_TIMEOUT_S:g} s) |"
        f" {counts['turns_timed_out']} |",
        f"| frames sent by the callers | {counts['frames_sent']}"
        f" ({counts['frames_sent'] / run.seconds:.0f} per s) |",
        f"| frames echoed back | {counts['frames_received']} |",
        f"| `turn` events / `bot_done` events / `interrupted` events |"
        f" {counts['event_turn']} / {counts['event_bot_done']} / {counts['event_interrupted']} |",
        f"| turns with no `bot_done` | {counts['turns_without_bot_done']} |",
        f"| `error` events | {counts['event_error']} |",
        f"| per-turn echo latency p50 / p95 / p99 / max (ms) | {fmt(tl['p50'])} / {fmt(tl['p95'])}"
        f" / {fmt(tl['p99'])} / {fmt(tl['max'])} |",
        f"| per-frame echo latency p50 / p95 / p99 (ms) | {fmt(fl['p50'])} / {fmt(fl['p95'])}"
        f" / {fmt(fl['p99'])} |",
        f"| client ticker lag p50 / p99 / max (ms) | {fmt(lg['p50'], 2)} / {fmt(lg['p99'], 2)}"
        f" / {fmt(lg['max'], 2)} |",
        "",
        "Per-turn latency: the frame that ended the turn (its last silence frame), from sent by the"
        " caller to echoed back: VAD, the bus through stt → llm → tts, and the transport's paced"
        " playout (which sends at most 3 frames ahead of real time). Per-frame: every speech and"
        " trailing-silence frame, the same way. Ticker lag: how late the client's 20 ms ticks ran"
        " (a client that cannot keep real time shows here).",
        "",
        "## Memory (VmRSS, MB)",
        "",
        f"Sampled every {run.interval:g} s; start = the sample at {run.warmup:g} s (after the"
        " warm-up), end = the last sample before the calls hang up; slope by least squares over"
        " that window.",
        "",
        "| process | at 0 s | start | end | end − start | slope MB/min | flat |",
        "| :-- | --: | --: | --: | --: | --: | :-- |",
    ]
    for name, first, start, end, delta, slope, v in mem_rows:
        lines.append(
            f"| {name} | {first:.1f} | {start:.1f} | {end:.1f} | {delta:+.1f} |"
            f" {fmt(slope, 2)} | {v} |"
        )
    lines += [
        "",
        "## CPU (% of one core, over the same window)",
        "",
        "CPU: user + system time. Waiting: time runnable but not running (in a CPU's run queue,"
        " /proc/<pid>/task/*/schedstat): a process that waits a lot is short of CPU, not idle.",
        "",
        "| process | CPU % | waiting for a CPU % |",
        "| :-- | --: | --: |",
    ]
    lines += [f"| {name} | {pct:.0f} | {wait:.0f} |" for name, pct, wait in cpu_rows]
    if machine_busy is not None:
        lines += [
            "",
            f"The whole machine was {machine_busy:.0f}% busy ({m['cores']} cores = 100%);"
            f" this benchmark's processes used {ours * 100 / max(m['cores'], 1):.0f}% of it,"
            " other work on the machine the rest.",
        ]
    lines += [
        "",
        "## Per-turn echo latency over time",
        "",
        "| turns ending in | turns | p50 ms | p99 ms |",
        "| :-- | --: | --: | --: |",
    ]
    lines += [
        f"| {a:g}-{b:g} s | {n} | {fmt(p50)} | {fmt(p99)} |" for a, b, n, p50, p99 in timeline
    ]
    if errors:
        lines += ["", "## Errors (first 20)", "", *(f"- {e}" for e in errors[:20])]
    lines.append("")
    return "\n".join(lines), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--instances", type=int, default=1, help="instances of each stage")
    ap.add_argument(
        "--transports", type=int, default=1, help="transport processes; calls spread over them"
    )
    ap.add_argument(
        "--clients", type=int, default=0, help="caller processes (default: 2 above 100 calls)"
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20 calls for 10 s")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default: benchmarks/results/soak.md; --quick writes none)",
    )
    args = ap.parse_args()
    if args.quick:
        args.calls, args.seconds = 20, 10.0
    clients = args.clients or (2 if args.calls > 100 else 1)
    interval = 5.0 if args.seconds >= 30 else 1.0
    run = Run(
        calls=args.calls,
        seconds=args.seconds,
        instances=args.instances,
        transports=args.transports,
        clients=clients,
        interval=interval,
        warmup=10.0 if args.seconds >= 30 else 2.0,
    )
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    text, ok = asyncio.run(soak(run, command))
    print(text)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"soak: wrote {out}")
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
