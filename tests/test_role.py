"""The Role base (voicemesh/role.py), on a tiny role of its own against the test's real NATS and
Valkey: it answers health only once its setup is done, and stops in order (closers, the drain of
in-flight work, release, Valkey); run_role drains it on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from typing import Any

import orjson
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from voicemesh.bus import Bus, Subjects
from voicemesh.config.settings import Settings
from voicemesh.role import Role, run_role


class Probe(Role):
    """A role whose setup waits for the test, and which writes down what happens when."""

    role = "probe"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.events: list[str] = []
        self.in_setup = asyncio.Event()
        self.go = asyncio.Event()

    async def prepare(self) -> None:
        self.events.append("prepare")

    async def setup(self) -> None:
        self.events.append("setup")
        self.in_setup.set()
        await self.go.wait()

    def health_body(self) -> dict[str, Any]:
        return {**super().health_body(), "extra": 1}

    async def release(self) -> None:
        self.events.append(f"release (bus closed: {self.bus.nc.is_closed})")


async def ping(bus: Bus, subjects: Subjects) -> dict[str, Any] | None:
    try:
        reply = await bus.nc.request(subjects.health("probe"), b"{}", timeout=0.5)
    except (NoRespondersError, NatsTimeout):
        return None
    return orjson.loads(reply.data)  # type: ignore[no-any-return]


async def test_health_answers_only_once_setup_is_done(
    settings: Settings, bus: Bus, subjects: Subjects
) -> None:
    probe = Probe(settings)
    starting = asyncio.ensure_future(probe.start())
    await asyncio.wait_for(probe.in_setup.wait(), 10)
    assert await ping(bus, subjects) is None  # connected, but not ready
    probe.go.set()
    await asyncio.wait_for(starting, 10)
    body = await ping(bus, subjects)
    assert body == {"role": "probe", "instance": settings.instance_id, "extra": 1}
    assert probe.events == ["prepare", "setup"]
    await probe.stop()


async def test_stop_runs_closers_then_drains_then_releases_then_closes_valkey(
    settings: Settings,
) -> None:
    probe = Probe(settings)
    probe.go.set()
    await probe.start()

    async def closer(name: str, *, fail: bool = False) -> None:
        probe.events.append(name)
        if fail:
            raise RuntimeError(f"{name} failed")

    async def in_flight() -> None:
        await asyncio.sleep(0.2)
        probe.events.append("in-flight work done")

    probe.closers += [lambda: closer("closer 1", fail=True), lambda: closer("closer 2")]
    probe.bus.spawn(in_flight())
    store_close = probe.store.close

    async def closing_store() -> None:
        probe.events.append("valkey closed")
        await store_close()

    probe.store.close = closing_store  # type: ignore[method-assign]
    await probe.stop()
    assert probe.events[2:] == [
        "closer 1",  # its failure is logged; the rest of the stop still happens
        "closer 2",
        "in-flight work done",
        "release (bus closed: True)",
        "valkey closed",
    ]


async def test_a_role_needs_nats_and_valkey(settings: Settings) -> None:
    with pytest.raises(ValueError, match="probe: NATS_URL and VALKEY_URL must be set"):
        Probe(settings.model_copy(update={"nats_url": None}))


async def test_run_role_drains_on_sigterm(
    settings: Settings, bus: Bus, subjects: Subjects, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe(settings)
    probe.go.set()
    frozen = gc.get_freeze_count()
    running = asyncio.ensure_future(run_role(probe))
    for _ in range(100):
        if await ping(bus, subjects) is not None:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the role never became ready")
    await asyncio.sleep(0.1)
    # the process's startup heap is out of the collector's walks once the role is up
    assert gc.get_freeze_count() > frozen
    caplog.set_level("INFO", logger="voicemesh.role")
    os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler, installed by run_role, takes it
    await asyncio.wait_for(running, 10)
    assert probe.events[-1] == "release (bus closed: True)"
    assert "probe draining" in caplog.text
