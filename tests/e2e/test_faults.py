"""Faults, end to end: instances killed or stopped mid-call, NATS and Valkey restarted under a live
call. Every test starts its own nats-server, valkey-server and role processes (it kills things, so
it never touches the session's shared stack), speaks to the transport over the WebSocket with
Piper-made speech that the stack's whisper STT transcribes, and prints the gap it measured.

Deterministic engines wherever the STT is not concerned: the `scripted` LLM and the `tone` TTS.
Where a reply or a sentence must take seconds, the `openai` connectors against the OpenAI loopback
servers (voicemesh.testing.loopback), which stream scripted text word by word, or a tone, with a
delay. Each LLM (TTS) process gets its own API key through its environment (`${FAULTS_LLM_KEY}`,
`${FAULTS_TTS_KEY}` in the config), so the loopback server can tell which instance is working.

Run: .venv/bin/python -m pytest tests/e2e/test_faults.py -q -s (about 2 minutes; -s shows the
measured gaps).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
import websockets
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import AGENT_FILE
from voicemesh.callers.script import TurnResult, load_pcm16
from voicemesh.callers.websocket import call_over_websocket, ws_url
from voicemesh.config.models import parse_agent_config
from voicemesh.launcher import Stack
from voicemesh.pipeline.text import SentenceSplitter
from voicemesh.servers import EmbeddedServer, free_port, start_nats, start_valkey
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.audio import PCMStream
from voicemesh.testing.loopback.chat import credential
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer
from voicemesh.testing.loopback.openai_speech import OpenAISpeechServer
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS

# configs here point connectors at loopback fake providers (the roles get the same setting)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_egress")]


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the per-process keys in the LLM's and TTS's credentials, in this
    process (which validates the config) and in every role it starts (open_rig copies the env)."""
    monkeypatch.setenv(
        "VOICEMESH_SECRET_ENV", "llm.openai:FAULTS_LLM_KEY;tts.openai:FAULTS_TTS_KEY"
    )


#: The transport runs with auth on (its default), accepting this key.
API_KEY = "faults-key-5c1e"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

SILENCE = bytes(FRAME_BYTES)
FRAME_S = FRAME_MS / 1000
#: A line long enough (about 4.5 s) to kill something while the caller is still speaking; one
#: clause, so no pause inside it reaches the VAD's 600 ms end-of-turn silence.
LONG_LINE = "Please tell me a long story about a small red fox who lives in a quiet green forest"
SHORT_LINE = "The weather is sunny today."
#: The scripted LLM's reply (agent_config), said by the `tone` TTS.
SCRIPTED_REPLY = "All right. Here is my answer."
#: Streamed one word every WORD_DELAY_S by the loopback server: about 2 s from first to last word.
WORD_DELAY_S = 0.05
SLOW_REPLY = (
    "Once upon a time there was a small red fox. "
    "It lived in a quiet green forest near a river. "
    "Every morning it walked along the water looking for berries. "
    "One day it met a wise old owl who knew every path in the woods."
)


def units(reply: str) -> list[str]:
    """A reply's units as the LLM stage cuts them: the first clause or first words, then
    sentences."""
    splitter = SentenceSplitter()
    return [*splitter.push(reply), *splitter.flush()]


SLOW_SENTENCES = units(SLOW_REPLY)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


class TurnLost(Exception):
    """The turn got no complete reply (no bot_done) in time."""


# --- the stack: own servers, one process per instance, one log file per process ---------------


class LoggedStack(Stack):
    """A Stack whose processes each write to their own log file, so a test can read what one
    instance did; instances are named, and that name is also their VOICEMESH_INSTANCE_ID."""

    def __init__(self, env: dict[str, str], log_dir: Path, **kw: Any):
        super().__init__(env, **kw)
        self.log_dir = log_dir
        self.exited_at: dict[str, float] = {}

    def spawn(self, name: str, role: str, **extra_env: str) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "voicemesh", "serve", role],
                env={**self.env, "VOICEMESH_INSTANCE_ID": name, **extra_env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    async def watch_exit(self, name: str) -> float:
        """perf_counter time at which the process has exited."""
        await asyncio.to_thread(self.procs[name].wait)
        return self.exited_at.setdefault(name, time.perf_counter())


@dataclass
class Rig:
    nats: EmbeddedServer
    valkey: EmbeddedServer
    stack: LoggedStack
    store: ConfigStore
    url: str
    prefix: str
    names: list[str]

    def lease_key(self, sid: str) -> str:
        return self.store.keys.lease("stt", sid)

    async def lease_holder(self, sid: str) -> str | None:
        value = await self.store.client.get(self.lease_key(sid))
        return value.decode() if value else None

    async def new_session(self, config: dict[str, Any] | None = None) -> str:
        async with httpx.AsyncClient(base_url=self.url, headers=AUTH) as http:
            resp = await http.post("/api/sessions", json={"config": config} if config else {})
            assert resp.status_code == 201, resp.text
            return resp.json()["session_id"]

    async def answering(self, names: list[str] | None = None, *, limit_s: float = 120) -> float:
        """Wait until every named instance answers its role's health ping; returns the seconds it
        took. Fails at once if one of the processes exits."""
        want = set(names or self.names)
        t0 = time.perf_counter()
        seen: set[str] = set()
        nc = None
        try:
            while True:
                if dead := [n for n in self.stack.dead() if n in want]:
                    raise AssertionError(f"exited: {dead}")
                if nc is None or not nc.is_connected:
                    with contextlib.suppress(Exception):
                        nc = await nats.connect(self.nats.url, allow_reconnect=False)
                if nc is not None and nc.is_connected:
                    inbox = nc.new_inbox()
                    replies: asyncio.Queue[bytes] = asyncio.Queue()

                    async def got(msg: Any, q: asyncio.Queue[bytes] = replies) -> None:
                        if msg.data:  # not a no-responders status
                            q.put_nowait(msg.data)

                    sub = await nc.subscribe(inbox, cb=got)
                    for role in {n.split("-")[0] for n in want}:
                        await nc.publish(f"{self.prefix}.health.{role}", b"{}", reply=inbox)
                    await asyncio.sleep(0.05)
                    await sub.unsubscribe()
                    while not replies.empty():
                        seen.add(orjson.loads(replies.get_nowait())["instance"])
                    if want <= seen:
                        return time.perf_counter() - t0
                if time.perf_counter() - t0 > limit_s:
                    raise AssertionError(f"not answering after {limit_s} s: {want - seen}")
                await asyncio.sleep(0.02)
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()

    def dump_logs(self, lines: int = 25) -> None:
        for name in self.stack.procs:
            tail = self.stack.log(name).splitlines()[-lines:]
            print(f"----- {name} (last {len(tail)} lines)", *tail, sep="\n")


def agent_config(**connectors: dict[str, Any]) -> dict[str, Any]:
    """The default agent with whisper STT (the only offline STT), the scripted LLM and the tone
    TTS, unless `connectors` says otherwise."""
    cfg = orjson.loads(AGENT_FILE.read_bytes())
    cfg["connectors"]["llm"] = {"primary": "scripted", "config": {"replies": [SCRIPTED_REPLY]}}
    cfg["connectors"]["tts"] = {"primary": "tone", "config": {"tone": {"ms_per_word": 60}}}
    cfg["connectors"].update(connectors)
    return cfg


@contextlib.asynccontextmanager
async def open_rig(
    tmp_path: Path,
    *,
    stt: int = 1,
    llm: int = 1,
    tts: int = 1,
    lease_ttl_ms: int = 1000,
    llm_env: Callable[[str], dict[str, str]] = lambda _: {},
    tts_env: Callable[[str], dict[str, str]] = lambda _: {},
) -> AsyncIterator[Rig]:
    """Own nats-server and valkey-server, the agent above as the default (so stages preload
    whisper), `stt`/`llm`/`tts` instances named `<role>-<n>` and one transport."""
    t0 = time.perf_counter()
    data = tmp_path / "data"
    data.mkdir()
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    prefix = f"f{uuid.uuid4().hex[:8]}"
    store = ConfigStore.from_url(valkey_srv.url, key_prefix=prefix)
    env = {
        **os.environ,
        "NATS_URL": nats_srv.url,
        "VALKEY_URL": valkey_srv.url,
        "VOICEMESH_SUBJECT_PREFIX": prefix,
        "VOICEMESH_KEY_PREFIX": prefix,
        "VOICEMESH_LEASE_TTL_MS": str(lease_ttl_ms),
        "VOICEMESH_API_KEYS": API_KEY,
        "VOICEMESH_EGRESS_PRIVATE": "1",  # the fake providers are on loopback
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    stack = LoggedStack(env, data, http_port=port)
    names: list[str] = []
    rig = Rig(nats_srv, valkey_srv, stack, store, f"http://127.0.0.1:{port}", prefix, names)
    try:
        await store.create_agent("faults", parse_agent_config(orjson.dumps(agent_config())))
        for role, count in (("stt", stt), ("llm", llm), ("tts", tts)):
            for i in range(1, count + 1):
                name = f"{role}-{i}"
                extra = {"llm": llm_env, "tts": tts_env}.get(role, lambda _: {})(name)
                stack.spawn(name, role, **extra)
                names.append(name)
        stack.spawn(
            "transport",
            "transport",
            VOICEMESH_HTTP_HOST="127.0.0.1",
            VOICEMESH_HTTP_PORT=str(port),
        )
        names.append("transport")
        await rig.answering(limit_s=180)
        print(f"\n[stack of {', '.join(names)} ready in {time.perf_counter() - t0:.1f} s]")
        yield rig
    except BaseException:
        rig.dump_logs()
        raise
    finally:
        await asyncio.to_thread(stack.stop, 10)
        await store.close()
        nats_srv.stop()
        valkey_srv.stop()


# --- a caller with a microphone that never stops, and timestamps on everything ----------------


@dataclass
class Turn:
    epoch: int
    speech_end: float
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)

    def at(self, kind: str) -> float | None:
        return next((t for t, ev in self.events if ev["type"] == kind), None)

    @property
    def done(self) -> bool:
        return self.at("bot_done") is not None or any(
            ev["type"] == "transcript" and ev["role"] == "user" and ev["final"] and not ev["text"]
            for _, ev in self.events
        )

    @property
    def gap_ms(self) -> float:
        """Caller's end of speech → the transport's first bot audio (bot_started)."""
        started = self.at("bot_started")
        assert started is not None, f"turn {self.epoch}: no bot audio; events {self.kinds}"
        return (started - self.speech_end) * 1000

    @property
    def kinds(self) -> list[str]:
        return [ev["type"] for _, ev in self.events]

    @property
    def user_text(self) -> str:
        return next(
            (
                ev["text"]
                for _, ev in self.events
                if ev["type"] == "transcript" and ev["role"] == "user" and ev["final"]
            ),
            "",
        )

    @property
    def sentences(self) -> list[tuple[int, str]]:
        return [
            (ev["index"], ev["text"])
            for _, ev in self.events
            if ev["type"] == "transcript" and ev["role"] == "assistant"
        ]

    @property
    def bot_text(self) -> str:
        return " ".join(text for _, text in self.sentences)


#: What a test does while the caller speaks; it gets the future of the line's end.
WhileSpeaking = Callable[[asyncio.Future[float]], Awaitable[None]]


class Caller:
    """A WebSocket caller whose microphone streams 20 ms frames in real time all along (silence
    when it says nothing), as a browser does, so the test is free to act while it speaks."""

    def __init__(self, url: str, session_id: str):
        self.url, self.session_id = url, session_id
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.turns: dict[int, Turn] = {}
        self._speech: collections.deque[bytes] = collections.deque()
        self._spoken: asyncio.Future[float] | None = None
        self._changed = asyncio.Event()
        self._latest: Turn | None = None

    async def __aenter__(self) -> Caller:
        self.ws = await websockets.connect(
            ws_url(self.url, session_id=self.session_id), additional_headers=AUTH
        )
        hello = orjson.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert hello["type"] == "session", hello
        self._tasks = [asyncio.create_task(self._mic()), asyncio.create_task(self._receive())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.ws.send(orjson.dumps({"type": "end"}).decode())
        await self.ws.close()

    async def _mic(self) -> None:
        clock = time.perf_counter()
        try:
            while True:
                if self._speech:
                    await self.ws.send(self._speech.popleft())
                    if not self._speech and self._spoken is not None:
                        self._spoken.set_result(time.perf_counter())
                else:
                    await self.ws.send(SILENCE)
                clock += FRAME_S
                await asyncio.sleep(max(0.0, clock - time.perf_counter()))
        except websockets.ConnectionClosed as exc:
            if self._spoken is not None and not self._spoken.done():
                self._spoken.set_exception(
                    RuntimeError(f"the transport closed the call mid-line: {exc}")
                )

    async def _receive(self) -> None:
        async for msg in self.ws:
            now = time.perf_counter()
            if isinstance(msg, bytes):
                if self._latest is not None:
                    self._latest.audio.extend(msg)
                continue
            ev = orjson.loads(msg)
            self.events.append((now, ev))
            epoch = ev.get("epoch")
            if ev["type"] == "turn":
                self._latest = self.turns.setdefault(epoch, Turn(epoch, 0.0))
            if epoch in self.turns:
                self.turns[epoch].events.append((now, ev))
            self._changed.set()

    def say(self, pcm: bytes, lead_s: float = 0.3) -> asyncio.Future[float]:
        """Queue a line after `lead_s` of silence; the future resolves (perf_counter time) when
        its last frame has been sent."""
        assert self._spoken is None or self._spoken.done(), "still speaking"
        pcm += bytes(-len(pcm) % FRAME_BYTES)
        self._spoken = asyncio.get_running_loop().create_future()
        self._speech.extend([SILENCE] * int(lead_s / FRAME_S))
        self._speech.extend(pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES))
        return self._spoken

    async def until(self, check: Callable[[], Any], limit_s: float, what: str) -> Any:
        deadline = time.perf_counter() + limit_s
        while not (result := check()):
            if self._tasks[1].done():
                raise RuntimeError(f"{what}: the transport closed the call ({self.ws.close_code})")
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TurnLost(f"{what}: nothing within {limit_s:.1f} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
        return result

    async def turn(
        self,
        pcm: bytes,
        *,
        limit_s: float = 30.0,
        while_speaking: WhileSpeaking | None = None,
    ) -> Turn:
        """Say `pcm` as one turn (running `while_speaking` meanwhile) and wait for the whole
        reply; raises TurnLost if it does not complete within `limit_s` of the end of speech."""
        known = set(self.turns)
        spoken = self.say(pcm)
        if while_speaking is not None:
            await while_speaking(spoken)
        end = await spoken
        turn = await self.until(
            lambda: next((t for e, t in self.turns.items() if e not in known), None), 5, "turn"
        )
        turn.speech_end = end
        await self.until(lambda: turn.done, limit_s, f"reply to turn {turn.epoch}")
        return turn


async def first(check: Callable[[], Any], limit_s: float, what: str, step: float = 0.01) -> Any:
    deadline = time.perf_counter() + limit_s
    while not (result := await check() if asyncio.iscoroutinefunction(check) else check()):
        if time.perf_counter() > deadline:
            raise AssertionError(f"{what}: not within {limit_s} s")
        await asyncio.sleep(step)
    return result


@pytest.fixture(scope="module")
def wavs(say: Callable[[str], Path]) -> dict[str, Path]:
    """The caller's lines, spoken by Piper (WAV files, for call_over_websocket)."""
    return {text: say(text) for text in (LONG_LINE, SHORT_LINE)}


@pytest.fixture(scope="module")
def lines(wavs: dict[str, Path]) -> dict[str, bytes]:
    """The same lines as 16 kHz PCM16, for the Caller."""
    return {text: load_pcm16(path) for text, path in wavs.items()}


# --- a slow, deterministic LLM: the OpenAI loopback server ------------------------------------


class KeyedChatServer(OpenAIChatServer):
    """The OpenAI loopback server, noting the API key (= the LLM instance) of each chat request."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.keys: list[str] = []

    async def chat(self, request: Request) -> Response:
        self.keys.append(credential(request) or "")
        return await super().chat(request)


def slow_llm(server: OpenAIChatServer) -> dict[str, Any]:
    return {
        "primary": "openai",
        "config": {
            "openai": {
                "model": "loopback-gpt",
                "base_url": f"{server.url}/v1",
                "api_key": "${FAULTS_LLM_KEY}",
            }
        },
    }


def llm_key(name: str) -> dict[str, str]:
    return {"FAULTS_LLM_KEY": name}


async def start_slow_reply(
    rig: Rig, caller: Caller, server: KeyedChatServer, line: bytes
) -> tuple[asyncio.Task[Turn], str]:
    """Say `line`; return the turn (still running) once its first sentence has reached the
    caller, and the LLM instance generating it."""
    turn = asyncio.create_task(caller.turn(line, limit_s=60))
    await first(lambda: server.keys, 30, "the LLM asked the loopback server")
    await caller.until(
        lambda: any(
            ev["type"] == "transcript" and ev["role"] == "assistant" for _, ev in caller.events
        ),
        10,
        "first sentence",
    )
    assert not turn.done()
    return turn, server.keys[0]


# --- 1. STT owner SIGKILLed while the caller speaks -------------------------------------------


async def test_stt_owner_killed_mid_utterance_reply_still_arrives(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """Three STT instances, lease TTL 1 s.

    Turn 2: the owner dies 1 s into a 5 s line. Its lease lapses while the caller is still
    talking; at the end of the turn the transport finds the lease gone, assigns another instance
    and replays the whole utterance to it.

    Turn 3: the new owner dies as the caller stops speaking, so when the turn ends 600 ms later
    its lease still names it and the END frame goes to a dead instance (the "known gap" of
    docs/operations.md before redelivery); the turn supervisor must notice and replay."""
    line = lines[LONG_LINE]
    line_s = len(line) / 32000
    async with open_rig(tmp_path, stt=3, lease_ttl_ms=1000) as rig:
        sid = await rig.new_session()
        killed: dict[str, float] = {}

        def killer(delay_s: float, owner: str) -> WhileSpeaking:
            async def kill(spoken: asyncio.Future[float]) -> None:
                await asyncio.sleep(0.3 + delay_s)  # the lead-in silence, then into the line
                assert not spoken.done()
                rig.stack.procs[owner].kill()
                killed[owner] = time.perf_counter()

            return kill

        async with Caller(rig.url, sid) as caller:
            normal = await caller.turn(line)
            first_owner = await rig.lease_holder(sid)
            assert first_owner in ("stt-1", "stt-2", "stt-3"), first_owner
            mid = await caller.turn(line, while_speaking=killer(1.0, first_owner), limit_s=15)
            second_owner = await rig.lease_holder(sid)
            assert second_owner not in (None, first_owner), second_owner
            late = await caller.turn(
                line, while_speaking=killer(line_s - 0.05, second_owner), limit_s=15
            )
            third_owner = await rig.lease_holder(sid)  # (the call's end releases it)

        log = rig.stack.log("transport")
        for turn, owner, how in (
            (mid, first_owner, "1 s into the line"),
            (late, second_owner, "as the caller stopped speaking"),
        ):
            print(
                f"\n[STT owner SIGKILL {how} ({turn.speech_end - killed[owner]:.1f} s before the "
                f"end of speech): end of speech -> first bot audio {turn.gap_ms:.0f} ms, normal "
                f"turn {normal.gap_ms:.0f} ms, extra {turn.gap_ms - normal.gap_ms:+.0f} ms]"
            )
            assert {"fox", "forest"} <= set(words(turn.user_text)), turn.user_text
            assert turn.bot_text == SCRIPTED_REPLY and turn.at("bot_done") is not None
        replays = re.findall(r"stt owner changed: replayed|the STT owner is gone; replaying", log)
        print(f"[transport log: {replays}]")
        assert mid.speech_end - killed[first_owner] > 1.5
        assert third_owner not in (None, first_owner, second_owner), third_owner
        assert len(replays) == 2, log
        assert mid.gap_ms - normal.gap_ms < 2000, "the owner's death cost more than 2 s"
        assert late.gap_ms - normal.gap_ms < 3000, "the owner's death cost more than 3 s"


# --- 2. NATS restarted between two turns of one call ------------------------------------------


async def test_nats_restart_between_turns_every_role_reconnects(
    tmp_path: Path, wavs: dict[str, Path]
) -> None:
    async with open_rig(tmp_path) as rig:
        sid = await rig.new_session()
        measured: dict[str, float] = {}

        async def restart_nats(turn_no: int, turn: TurnResult) -> None:
            t0 = time.perf_counter()
            await asyncio.to_thread(rig.nats.restart)
            measured["down_ms"] = (time.perf_counter() - t0) * 1000
            # every instance of every role must find the new server by itself
            measured["recover_ms"] = await rig.answering(limit_s=15) * 1000

        line = wavs[SHORT_LINE]
        result = await call_over_websocket(
            rig.url,
            [line, line],
            None,
            session_id=sid,
            after_turn=restart_nats,
            turn_timeout=20,
            api_key=API_KEY,
        )
        first_turn, second = result.turns
        print(
            f"\n[NATS restart: server down {measured['down_ms']:.0f} ms, every role answering "
            f"again {measured['recover_ms']:.0f} ms after it was back; turn latency "
            f"{first_turn.latency_ms:.0f} ms before, {second.latency_ms:.0f} ms after]"
        )
        assert "sunny" in words(second.user_text), second.user_text
        assert second.bot_text == SCRIPTED_REPLY
        assert measured["recover_ms"] < 3000
        for name in rig.names:
            assert "nats: reconnected" in rig.stack.log(name), name


# --- 3. Valkey restarted: state survives, and a turn while it is down -------------------------


async def test_valkey_restart_keeps_agents_sessions_and_context(
    tmp_path: Path, wavs: dict[str, Path]
) -> None:
    """Valkey is SIGKILLed (a crash, not a clean shutdown) and started again between two turns:
    the agent, the session and its context come back from the AOF and the call goes on."""
    async with open_rig(tmp_path) as rig:
        sid = await rig.new_session()
        measured: dict[str, float] = {}
        aof = await rig.store.client.config_get("append*")
        assert aof["appendonly"] == "yes" and aof["appendfsync"] == "everysec", aof

        async def crash_valkey(turn_no: int, turn: TurnResult) -> None:
            before = await rig.store.get_context(sid)
            await asyncio.sleep(1.1)  # appendfsync everysec: the last writes are on disk
            t0 = time.perf_counter()
            rig.valkey.proc.kill()
            rig.valkey.proc.wait()
            await asyncio.to_thread(rig.valkey.restart)
            measured["down_ms"] = (time.perf_counter() - t0) * 1000
            assert [a.name for a in await rig.store.list_agents()] == ["faults"]
            assert (await rig.store.get_default_agent()).name == "faults"  # type: ignore[union-attr]
            stored = await rig.store.get_config(sid)
            assert stored is not None and stored.version == 1
            assert await rig.store.get_context(sid) == before
            assert [m["role"] for m in before] == ["user", "assistant"]

        line = wavs[SHORT_LINE]
        result = await call_over_websocket(
            rig.url,
            [line, line],
            None,
            session_id=sid,
            after_turn=crash_valkey,
            turn_timeout=20,
            api_key=API_KEY,
        )
        first_turn, second = result.turns
        print(
            f"\n[Valkey SIGKILL + restart: down {measured['down_ms']:.0f} ms; turn latency "
            f"{first_turn.latency_ms:.0f} ms before, {second.latency_ms:.0f} ms after]"
        )
        assert (first_turn.epoch, second.epoch) == (1, 2)
        assert second.bot_text == SCRIPTED_REPLY
        context = await rig.store.get_context(sid)
        assert [(m["role"], m["epoch"]) for m in context] == [
            ("user", 1),
            ("assistant", 1),
            ("user", 2),
            ("assistant", 2),
        ]


async def test_turn_while_valkey_is_down_gets_its_reply(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """After a first turn every role has the session's config cached, so a turn needs Valkey only
    for its turn number, its work claims and the conversation context, all of which it can do
    without for a while. The caller speaks while Valkey is down, and Valkey comes back while the
    reply (2 s, streamed by the slow loopback LLM) is still being generated: the reply is complete
    and said once, and the call goes on."""
    async with (
        KeyedChatServer([SLOW_REPLY], chunk_delay_s=WORD_DELAY_S) as server,
        open_rig(tmp_path, llm_env=llm_key) as rig,
    ):
        assert isinstance(server, KeyedChatServer)
        sid = await rig.new_session(agent_config(llm=slow_llm(server)))
        line = lines[SHORT_LINE]
        async with Caller(rig.url, sid) as caller:
            normal = await caller.turn(line)
            rig.valkey.proc.kill()
            rig.valkey.proc.wait()
            t0 = time.perf_counter()
            running = asyncio.create_task(caller.turn(line, limit_s=20))
            try:
                await caller.until(
                    lambda: any(
                        ev["type"] == "transcript"
                        and ev["role"] == "assistant"
                        and ev["epoch"] > normal.epoch
                        for _, ev in caller.events
                    ),
                    20,
                    "the first sentence of the reply during the outage",
                )
            except BaseException:
                running.cancel()
                raise
            finally:
                await asyncio.to_thread(rig.valkey.restart)
                down_ms = (time.perf_counter() - t0) * 1000
            outage = await running
            after = await caller.turn(line, limit_s=20)
        print(
            f"\n[turn during a {down_ms:.0f} ms Valkey outage: gap {outage.gap_ms:.0f} ms (normal "
            f"{normal.gap_ms:.0f} ms); the next turn after the restart {after.gap_ms:.0f} ms]"
        )
        assert "sunny" in words(outage.user_text), outage.user_text
        indexes = [i for i, _ in outage.sentences]
        assert indexes == list(range(len(SLOW_SENTENCES))), f"said twice? {outage.sentences}"
        assert words(outage.bot_text) == words(SLOW_REPLY), outage.bot_text
        assert words(after.bot_text) == words(SLOW_REPLY), after.bot_text
        assert normal.epoch < outage.epoch < after.epoch


async def test_first_turn_of_a_call_while_valkey_is_down(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """Valkey dies as soon as the call is up, before its first turn: no stage has seen the
    session yet. The transport assigned the STT stream when the call started and has the config
    cached; the stages get the config from it over `vm.config.get`. The first turn is answered,
    whole, and the call goes on once Valkey is back."""
    async with (
        KeyedChatServer([SLOW_REPLY], chunk_delay_s=WORD_DELAY_S) as server,
        open_rig(tmp_path, llm_env=llm_key) as rig,
    ):
        assert isinstance(server, KeyedChatServer)
        sid = await rig.new_session(agent_config(llm=slow_llm(server)))
        line = lines[SHORT_LINE]
        async with Caller(rig.url, sid) as caller:

            async def stt_owner() -> bytes | None:
                return await rig.store.client.get(rig.store.keys.lease("stt", sid))

            holder = await first(stt_owner, 10, "the STT stream assigned when the call started")
            rig.valkey.proc.kill()
            rig.valkey.proc.wait()
            t0 = time.perf_counter()
            try:
                outage = await caller.turn(line, limit_s=20)
            finally:
                await asyncio.to_thread(rig.valkey.restart)
                down_ms = (time.perf_counter() - t0) * 1000
            after = await caller.turn(line, limit_s=20)
        print(
            f"\n[first turn during a {down_ms:.0f} ms Valkey outage (STT owner {holder!r} known "
            f"from the call's start): end of speech -> first bot audio {outage.gap_ms:.0f} ms; "
            f"the next turn {after.gap_ms:.0f} ms]"
        )
        assert "sunny" in words(outage.user_text), outage.user_text
        assert [i for i, _ in outage.sentences] == list(range(len(SLOW_SENTENCES)))
        assert words(outage.bot_text) == words(SLOW_REPLY), outage.bot_text
        assert words(after.bot_text) == words(SLOW_REPLY), after.bot_text
        assert outage.epoch < after.epoch
        transport_log = rig.stack.log("transport")
        assert "config of" not in transport_log  # the transport itself never had to ask
        stage_logs = rig.stack.log("llm-1") + rig.stack.log("tts-1")
        assert "config of " + sid + " from the transport" in stage_logs


# --- 4. graceful shutdown ---------------------------------------------------------------------


async def test_sigterm_stt_owner_releases_lease_at_once(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """Lease TTL 3 s: a SIGTERMed idle owner deletes its lease on the way out, so the next turn
    goes to the other instance at once, not after the TTL."""
    line = lines[SHORT_LINE]
    async with open_rig(tmp_path, stt=2, lease_ttl_ms=3000) as rig:
        sid = await rig.new_session()
        async with Caller(rig.url, sid) as caller:
            normal = await caller.turn(line)
            owner = await rig.lease_holder(sid)
            assert owner in ("stt-1", "stt-2"), owner
            other = "stt-2" if owner == "stt-1" else "stt-1"
            t0 = time.perf_counter()
            rig.stack.procs[owner].send_signal(signal.SIGTERM)
            exited = asyncio.create_task(rig.stack.watch_exit(owner))

            async def released() -> bool:
                return await rig.lease_holder(sid) is None

            await first(released, 3.0, "lease deleted", step=0.005)
            released_ms = (time.perf_counter() - t0) * 1000
            exit_ms = (await asyncio.wait_for(exited, 15) - t0) * 1000
            turn = await caller.turn(line, limit_s=15)
            new_owner = await rig.lease_holder(sid)  # (the call's end releases it)
        print(
            f"\n[SIGTERM idle STT owner: lease deleted after {released_ms:.0f} ms (TTL 3000), "
            f"process exited after {exit_ms:.0f} ms; next turn {turn.gap_ms:.0f} ms vs "
            f"{normal.gap_ms:.0f} ms]"
        )
        assert released_ms < 1000
        assert rig.stack.procs[owner].returncode == 0
        assert "stt stage draining" in rig.stack.log(owner)
        assert new_owner == other
        assert "sunny" in words(turn.user_text) and turn.bot_text == SCRIPTED_REPLY
        assert turn.gap_ms - normal.gap_ms < 1000


async def test_sigterm_llm_finishes_the_reply_in_flight(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """SIGTERM reaches the LLM instance that is streaming a 4 s reply: it stops taking work but
    finishes that reply (every sentence, bot_done) and only then exits."""
    async with (
        KeyedChatServer([SLOW_REPLY], chunk_delay_s=WORD_DELAY_S) as server,
        open_rig(tmp_path, llm=2, llm_env=llm_key) as rig,
    ):
        assert isinstance(server, KeyedChatServer)
        sid = await rig.new_session(agent_config(llm=slow_llm(server)))
        async with Caller(rig.url, sid) as caller:
            running, busy = await start_slow_reply(rig, caller, server, lines[SHORT_LINE])
            t0 = time.perf_counter()
            rig.stack.procs[busy].send_signal(signal.SIGTERM)
            exited = asyncio.create_task(rig.stack.watch_exit(busy))
            turn = await running
            exit_at = await asyncio.wait_for(exited, 15)
        done_at = turn.at("bot_done")
        assert done_at is not None
        print(
            f"\n[SIGTERM LLM mid-reply: bot_done {(done_at - t0) * 1000:.0f} ms later, process "
            f"exit {(exit_at - t0) * 1000:.0f} ms later]"
        )
        assert [i for i, _ in turn.sentences] == list(range(len(SLOW_SENTENCES)))
        assert [s for _, s in turn.sentences] == SLOW_SENTENCES
        assert server.keys == [busy], server.keys  # nobody else generated any of it
        assert rig.stack.procs[busy].returncode == 0
        log = rig.stack.log(busy)
        finished = re.search(rf"turn {turn.epoch}: \d+ sentences from openai", log)
        assert finished is not None, log
        # the reply completed while the instance was draining, and only then did it exit
        assert 0 <= log.find("llm stage draining") < finished.start(), log


# --- 5. LLM or TTS instance SIGKILLed mid-work -----------------------------------------------
# (Written before redelivery existed, as a strict xfail on TurnLost: "redelivery of LLM/TTS units is
# not built yet". Redelivery landed in 90379db and these pass; a lost turn fails them as TurnLost.)


async def test_llm_killed_mid_reply_reply_still_completes(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """After the LLM instance generating a reply dies, the reply still completes (bot_done)
    within 5 s, and its text is not duplicated (neither what the caller is told nor the
    conversation context)."""
    async with (
        KeyedChatServer([SLOW_REPLY], chunk_delay_s=WORD_DELAY_S) as server,
        open_rig(tmp_path, llm=2, llm_env=llm_key) as rig,
    ):
        assert isinstance(server, KeyedChatServer)
        sid = await rig.new_session(agent_config(llm=slow_llm(server)))
        async with Caller(rig.url, sid) as caller:
            running, busy = await start_slow_reply(rig, caller, server, lines[SHORT_LINE])
            t0 = time.perf_counter()
            rig.stack.procs[busy].kill()
            turn = await within(running, 15, "bot_done after the LLM instance died", caller)
            done_at = turn.at("bot_done")
            assert done_at is not None
            # the gap: from the kill to the next sentence of the reply (generated by the other
            # instance, after the claim lapsed and the supervisor resent the turn)
            resumed, text = next(
                (t, ev["text"])
                for t, ev in caller.events
                if t > t0 and ev["type"] == "transcript" and ev["role"] == "assistant"
            )
            # a sentence takes its words' time to generate even without a failure
            gap = resumed - t0 - len(words(text)) * WORD_DELAY_S
            print(
                f"\n[SIGKILL LLM mid-reply: next sentence {(resumed - t0) * 1000:.0f} ms after the "
                f"kill, of which {gap * 1000:.0f} ms lost to the failure; bot_done "
                f"{(done_at - t0) * 1000:.0f} ms (includes playing the rest); "
                f"chat requests by {server.keys}]"
            )
        assert gap < 2, f"the dead LLM instance cost {gap:.1f} s"
        assert done_at - t0 < 8, f"bot_done only {done_at - t0:.1f} s after the kill"
        indexes = [i for i, _ in turn.sentences]
        assert sorted(set(indexes)) == indexes, f"sentences sent twice: {turn.sentences}"
        assert words(turn.bot_text) == words(SLOW_REPLY), turn.bot_text
        replies = [m for m in await rig.store.get_context(sid) if m["role"] == "assistant"]
        assert [words(m["content"]) for m in replies] == [words(SLOW_REPLY)], replies


async def within(running: asyncio.Task[Turn], limit_s: float, what: str, caller: Caller) -> Turn:
    """The turn's result; TurnLost if it has not completed within `limit_s`."""
    try:
        return await asyncio.wait_for(asyncio.shield(running), limit_s)
    except TimeoutError:
        got = [text for _, ev in caller.events if (text := ev.get("text"))]
        print(f"\n[{what}: nothing within {limit_s} s; the caller got {got}]")
        raise TurnLost(f"{what}: nothing within {limit_s} s") from None
    finally:
        if not running.done():
            running.cancel()


class KeyedSpeechServer(OpenAISpeechServer):
    """The OpenAI speech loopback server streaming at twice real time (a 100 ms chunk every
    50 ms, as a cloud voice does), noting the API key (= the TTS instance) of each request."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.keys: list[str] = []

    async def _speech(self, request: Request) -> Any:
        self.keys.append(request.headers.get("authorization", "").partition(" ")[2])
        response = await super()._speech(request)
        if isinstance(response, PCMStream):
            response.delay = 0.05
        return response


#: One sentence of 20 words: 2.4 s of audio at the loopback voice's 120 ms a word.
LONG_SENTENCE = (
    "This single sentence is long enough to keep the speech server streaming audio for a "
    "couple of seconds at least"
)


async def test_tts_killed_mid_sentence_reply_still_completes(
    tmp_path: Path, lines: dict[str, bytes]
) -> None:
    """After the TTS instance synthesizing the reply's only sentence dies 1 s into its audio,
    the reply still completes (bot_done) within 5 s, and its audio is not repeated."""
    async with (
        KeyedSpeechServer(ms_per_word=120) as server,
        open_rig(tmp_path, tts=2, tts_env=lambda name: {"FAULTS_TTS_KEY": name}) as rig,
    ):
        assert isinstance(server, KeyedSpeechServer)
        tts = {
            "primary": "openai",
            "config": {"openai": {"base_url": f"{server.url}/v1", "api_key": "${FAULTS_TTS_KEY}"}},
        }
        llm = {"primary": "scripted", "config": {"replies": [LONG_SENTENCE]}}
        sid = await rig.new_session(agent_config(llm=llm, tts=tts))
        async with Caller(rig.url, sid) as caller:
            running = asyncio.create_task(caller.turn(lines[SHORT_LINE], limit_s=60))
            await caller.until(
                lambda: any(len(t.audio) > 32000 for t in caller.turns.values()),  # 1 s heard
                30,
                "first second of bot audio",
            )
            busy = server.keys[0]
            t0 = time.perf_counter()
            rig.stack.procs[busy].kill()
            turn = await within(running, 15, "bot_done after the TTS instance died", caller)
            done_at = turn.at("bot_done")
            assert done_at is not None
        heard_s, expected_s = len(turn.audio) / 32000, 20 * 0.120
        print(
            f"\n[SIGKILL TTS mid-sentence: bot_done {(done_at - t0) * 1000:.0f} ms later; "
            f"{heard_s:.2f} s of audio for a {expected_s:.2f} s sentence; "
            f"synthesis requests by {server.keys}]"
        )
        assert turn.bot_text == LONG_SENTENCE
        assert done_at - t0 < 5, f"bot_done only {done_at - t0:.1f} s after the kill"
        assert abs(heard_s - expected_s) < 0.3, f"{heard_s:.2f} s heard, {expected_s} expected"
