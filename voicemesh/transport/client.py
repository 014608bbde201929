"""A headless caller for the WebSocket transport: plays WAV files as a microphone would (paced in
real time, silence between turns), records the bot and reports each turn's latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import orjson
import soundfile as sf
import soxr
import websockets

from voicemesh.transport.vad import FRAME_BYTES, FRAME_MS, RATE


@dataclass
class TurnResult:
    epoch: int = 0
    user_text: str = ""
    bot_text: str = ""
    connectors: set[str] = field(default_factory=set)
    latency_ms: float | None = None
    server_latency_ms: float | None = None
    bot_audio: bytearray = field(default_factory=bytearray)
    indexes: list[int] = field(default_factory=list)
    #: the transport's per-phase figures for the turn (eou, stt, llm_ttft, tts_ttfb, v2v, ...)
    phases: dict[str, float | None] = field(default_factory=dict)


@dataclass
class CallResult:
    session_id: str
    turns: list[TurnResult]
    bot_audio: bytes

    @property
    def bot_seconds(self) -> float:
        return len(self.bot_audio) / 2 / RATE


def load_pcm16(path: Path) -> bytes:
    """Any WAV/FLAC that soundfile reads, as 16 kHz mono PCM16."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != RATE:
        mono = soxr.resample(mono, rate, RATE)
    return (np.clip(mono, -1, 1) * 32767).astype(np.int16).tobytes()


def ws_url(base: str, **params: str | None) -> str:
    base = base.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    query = urlencode({k: v for k, v in params.items() if v})
    return f"{base}/ws/call" + (f"?{query}" if query else "")


async def call_over_websocket(
    url: str,
    wavs: list[Path],
    out: Path | None,
    *,
    agent: str | None = None,
    session_id: str | None = None,
    turn_timeout: float = 60.0,
    pause_s: float = 0.3,
    after_turn: Callable[[int, TurnResult], Awaitable[None]] | None = None,
    api_key: str | None = None,
) -> CallResult:
    """Say each WAV as one turn and wait for the complete reply before the next; `after_turn` runs
    between turns while the call stays open (tests swap providers there). `api_key` goes in an
    Authorization header (not the URL, which servers and proxies may log)."""
    utterances = [load_pcm16(w) for w in wavs]
    silence = bytes(FRAME_BYTES)
    turns: list[TurnResult] = []
    audio = bytearray()
    done = asyncio.Event()
    state: dict[str, object] = {"turn": None, "speech_end": None}

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with websockets.connect(
        ws_url(url, agent=agent, session_id=session_id), max_size=None, additional_headers=headers
    ) as ws:
        hello = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if hello.get("type") == "error":
            raise RuntimeError(hello.get("error"))
        sid = hello["session_id"]

        async def receive() -> None:
            async for msg in ws:
                turn = state["turn"]
                if isinstance(msg, bytes):
                    audio.extend(msg)
                    if isinstance(turn, TurnResult):
                        turn.bot_audio.extend(msg)
                    continue
                ev = orjson.loads(msg)
                kind = ev.get("type")
                if kind == "turn":
                    turn = TurnResult(epoch=ev["epoch"])
                    turns.append(turn)
                    state["turn"] = turn
                elif not isinstance(turn, TurnResult) or ev.get("epoch", turn.epoch) != turn.epoch:
                    continue
                elif kind == "transcript" and ev["role"] == "user":
                    turn.user_text = ev["text"]
                    if not ev["text"]:
                        done.set()
                elif kind == "transcript" and ev["role"] == "assistant":
                    turn.bot_text = (turn.bot_text + " " + ev["text"]).strip()
                    turn.connectors.add(ev.get("connector", ""))
                    turn.indexes.append(ev.get("index", -1))
                elif kind == "bot_started":
                    end = state["speech_end"]
                    if isinstance(end, float):
                        turn.latency_ms = (time.perf_counter() - end) * 1000
                    turn.server_latency_ms = ev.get("latency_ms")
                elif kind == "turn_metrics":
                    turn.phases = {k: v for k, v in ev.items() if k.endswith("_ms")}
                elif kind == "bot_done":
                    done.set()

        receiver = asyncio.create_task(receive())
        frame_s = FRAME_MS / 1000
        clock = time.perf_counter()

        async def send_paced(frame: bytes) -> None:
            nonlocal clock
            await ws.send(frame)
            clock += frame_s
            delay = clock - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

        try:
            for n, pcm in enumerate(utterances):
                if n and after_turn is not None and isinstance(state["turn"], TurnResult):
                    await after_turn(n - 1, state["turn"])
                done.clear()
                for _ in range(int(pause_s / frame_s)):
                    await send_paced(silence)
                pcm += bytes(-len(pcm) % FRAME_BYTES)
                for i in range(0, len(pcm), FRAME_BYTES):
                    await send_paced(pcm[i : i + FRAME_BYTES])
                state["speech_end"] = time.perf_counter()
                deadline = time.perf_counter() + turn_timeout
                while not done.is_set():
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"no complete reply within {turn_timeout:.0f} s")
                    if receiver.done():
                        raise RuntimeError("the transport closed the call")
                    await send_paced(silence)
            await ws.send(orjson.dumps({"type": "end"}).decode())
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out), np.frombuffer(bytes(audio), dtype=np.int16), RATE, subtype="PCM_16")
    return CallResult(sid, turns, bytes(audio))
