"""Helpers shared by the tests that run stage services in-process on the real servers."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import uvicorn

from voicemesh.bus import Bus, Flag, Frame, Kind
from voicemesh.config.settings import Settings
from voicemesh.pipeline import StageService

if TYPE_CHECKING:
    from voicemesh.transport.api.service import TransportService


async def until(cond: Callable[[], Any], limit_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class Inbox:
    """Collects the frames published on a subject."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Frame]] = []
        self._changed = asyncio.Event()

    async def __call__(self, subject: str, frame: Frame) -> None:
        self.items.append((subject, frame))
        self._changed.set()

    @property
    def frames(self) -> list[Frame]:
        return [f for _, f in self.items]

    def of(self, kind: Kind) -> list[Frame]:
        return [f for f in self.frames if f.kind is kind]

    async def wait_for(
        self, pred: Callable[[list[Frame]], bool], limit_s: float = 5.0
    ) -> list[Frame]:
        deadline = time.monotonic() + limit_s
        while not pred(self.frames):
            left = deadline - time.monotonic()
            if left <= 0:
                summary = [(f.kind.name, f.epoch, f.index, f.seq, f.flags) for f in self.frames]
                raise AssertionError(f"timed out; received {summary[:20]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return self.frames


async def settle(bus: Bus) -> None:
    """Make sure this connection's subscriptions are on the server. nats-py 2.16's flush() writes
    its PING straight to the socket, ahead of a SUB still queued for the flusher task, so one round
    trip can come back before the SUB is sent (about 1 in 25 on loopback); a second one cannot."""
    await bus.nc.flush()
    await bus.nc.flush()


async def listen(bus: Bus, subject: str) -> Inbox:
    inbox = Inbox()
    await bus.subscribe(subject, inbox)
    await settle(bus)
    return inbox


def has_last(frames: list[Frame], epoch: int | None = None) -> bool:
    return any(f.has(Flag.LAST) and (epoch is None or f.epoch == epoch) for f in frames)


class Services:
    """Starts stage services on the test's settings; stops whatever is left at teardown."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.running: list[StageService] = []

    async def start(self, cls: type[StageService], **overrides: Any) -> Any:
        overrides.setdefault("instance_id", f"{cls.role}-{len(self.running) + 1}")
        svc = cls(self.settings.model_copy(update=overrides))
        await svc.start()
        await settle(svc.bus)  # start() flushes once, which does not prove its SUBs arrived
        self.running.append(svc)
        return svc

    async def stop(self, svc: StageService) -> None:
        self.running.remove(svc)
        await svc.stop()


@contextlib.asynccontextmanager
async def serving(service: TransportService) -> AsyncIterator[str]:
    """The transport's app on a real uvicorn on a free loopback port, in the test's event loop
    (for WebSockets and WebRTC), logging through the root logger (caplog sees it); yields its
    http:// base URL. The service must be started already (lifespan off)."""
    from voicemesh.transport.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(service),
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_config=None,
        log_level="info",
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def loopback_agent(
    agent_json: dict,
    *,
    transport: str,
    stt_url: str,
    replies: list[str] | None = None,
    ms_per_word: int = 100,
    **transport_options: Any,
) -> dict:
    """An agent that needs no engine: energy VAD with short turns on `transport`, the OpenAI STT
    protocol against a loopback transcriber, scripted replies, a tone for a voice."""
    data = copy.deepcopy(agent_json)
    options = {
        "vad": "energy",
        "start_speech_ms": 60,
        "end_of_turn_silence_ms": 200,
        "preroll_ms": 100,
        **transport_options,
    }
    data["connectors"]["transport"] = {"primary": transport, "config": {transport: options}}
    data["connectors"]["stt"] = {"primary": "openai", "config": {"openai": {"base_url": stt_url}}}
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {"scripted": {"replies": replies or ["You said {user}."]}},
    }
    data["connectors"]["tts"] = {
        "primary": "tone",
        "config": {"tone": {"ms_per_word": ms_per_word}},
    }
    return data
