"""A headless caller for the WebSocket carrier (`/ws/call`): the simplest way to call the
transport from a terminal or a test, with nothing but a socket. It plays WAV files as a microphone
would (paced in real time, silence between turns), records the bot and reports each turn's latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

import websockets

from voicemesh.bus.events import End, ErrorEvent
from voicemesh.callers.script import CallResult, Script, TurnResult, load_pcm16


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
    barge_in_after_s: float | None = None,
) -> CallResult:
    """Say each WAV as one turn and wait for the complete reply before the next; `after_turn` runs
    between turns while the call stays open (tests swap providers there). `api_key` goes in an
    Authorization header (not the URL, which servers and proxies may log)."""
    utterances = [load_pcm16(w) for w in wavs]
    script = Script()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with websockets.connect(
        ws_url(url, agent=agent, session_id=session_id), max_size=None, additional_headers=headers
    ) as ws:
        hello = script.on_event(await asyncio.wait_for(ws.recv(), 10))
        if isinstance(hello, ErrorEvent):
            raise RuntimeError(hello.error)

        async def receive() -> None:
            async for msg in ws:
                if isinstance(msg, bytes):
                    script.on_audio(msg)
                else:
                    script.on_event(msg)

        receiver = asyncio.create_task(receive())
        try:
            await script.speak(
                utterances,
                ws.send,
                pause_s=pause_s,
                turn_timeout=turn_timeout,
                after_turn=after_turn,
                alive=lambda: not receiver.done(),
                barge_in_after_s=barge_in_after_s,
            )
            await ws.send(End().wire_json().decode())
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    return script.result(out)
