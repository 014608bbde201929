"""Helpers shared by the tests that run stage services in-process on the real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from voicemesh.config.settings import Settings
from voicemesh.pipeline import StageService
from voicemesh.router import Bus, Flag, Frame, Kind


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
