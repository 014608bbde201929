"""Connector health shared by every instance: a failed connector is marked down in Valkey (with a
TTL) and announced on NATS, so every instance of the stage skips it at once; the instance that saw
it fail probes it in the background and marks it up when it answers again. If that instance dies,
the mark lapses by itself and the connector is simply tried again.

A connector is identified by stage, name and a fingerprint of its options (the stored form, with
"${ENV}" references), so two sessions using one provider with different keys or endpoints have
separate health.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from voicemesh.config.connectors import ConnectorOptions
from voicemesh.connectors.errors import ConnectorError
from voicemesh.state import ConfigStore

log = logging.getLogger(__name__)

ConnectorId = tuple[str, str, str]  # stage, name, options fingerprint


def fingerprint(options: ConnectorOptions) -> str:
    return hashlib.sha1(options.model_dump_json().encode()).hexdigest()[:12]


class HealthBoard:
    def __init__(
        self,
        *,
        store: ConfigStore,
        nc: Client,
        key_prefix: str,
        subject: str,
        stage: str,
        instance: str,
        refresh_s: float = 1.0,
    ):
        # The marks are this board's own keys (under `key_prefix`, which a benchmark varies per
        # run), not part of the store's session layout: it shares the store's connection only.
        self.client = store.client
        self.nc, self.subject, self.instance = nc, subject, instance
        #: a board holds one stage's marks: its instances only ever run that stage's connectors,
        #: and its Valkey user may touch only that stage's health keys (voicemesh.state.acl)
        self.stage = stage
        self.key_prefix = key_prefix
        self.refresh_s = refresh_s
        self._down: dict[ConnectorId, float] = {}  # id -> local expiry (monotonic)
        self._probes: dict[ConnectorId, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    def key(self, cid: ConnectorId) -> str:
        return f"{self.key_prefix}:health:{':'.join(cid)}"

    async def start(self) -> None:
        # hop: <- HealthBoard.mark_down and mark_up of every instance (vm.connector.health.<stage>)
        await self.nc.subscribe(self.subject, cb=self._on_news)
        own = f"{self.key_prefix}:health:{self.stage}:*"
        async for key in self.client.scan_iter(match=own, count=500):
            stage, name, fp = key.decode().rsplit(":", 3)[1:]
            ttl = await self.client.pttl(key)
            if ttl > 0:
                self._down[(stage, name, fp)] = time.monotonic() + ttl / 1000
        self._tasks.append(asyncio.ensure_future(self._refresh_forever()))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._probes.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._probes.values(), return_exceptions=True)

    def stop_probe(self, cid: ConnectorId) -> asyncio.Task[None] | None:
        """Stop probing a connector this process no longer holds (the pool evicted it): its
        down mark then lapses by itself and the connector is tried again on use."""
        task = self._probes.pop(cid, None)
        if task is not None:
            task.cancel()
        return task

    def is_down(self, cid: ConnectorId) -> bool:
        until = self._down.get(cid)
        if until is None:
            return False
        if until < time.monotonic():
            self._down.pop(cid, None)
            return False
        return True

    async def mark_down(
        self,
        cid: ConnectorId,
        error: ConnectorError,
        *,
        hold_ms: int,
        probe: Callable[[], Awaitable[None]] | None,
        probe_interval_ms: int,
    ) -> None:
        """Announce a failure; start probing it from here unless someone already does."""
        body = {
            "state": "down",
            "stage": cid[0],
            "connector": cid[1],
            "fp": cid[2],
            "by": self.instance,
            "error": error.to_dict(),
            "hold_ms": hold_ms,
        }
        await self.client.set(self.key(cid), orjson.dumps(body), px=hold_ms)
        self._down[cid] = time.monotonic() + hold_ms / 1000
        # hop: -> HealthBoard._on_news of every instance (vm.connector.health.<stage>)
        await self.nc.publish(self.subject, orjson.dumps(body))
        if probe is not None and cid not in self._probes:
            self._probes[cid] = asyncio.ensure_future(
                self._probe_forever(cid, probe, probe_interval_ms, hold_ms)
            )

    async def mark_up(self, cid: ConnectorId) -> None:
        await self.client.delete(self.key(cid))
        self._down.pop(cid, None)
        body = {
            "state": "up",
            "stage": cid[0],
            "connector": cid[1],
            "fp": cid[2],
            "by": self.instance,
        }
        # hop: -> HealthBoard._on_news of every instance (vm.connector.health.<stage>)
        await self.nc.publish(self.subject, orjson.dumps(body))

    async def _probe_forever(
        self, cid: ConnectorId, probe: Callable[[], Awaitable[None]], interval_ms: int, hold_ms: int
    ) -> None:
        try:
            while True:
                await asyncio.sleep(interval_ms / 1000)
                if not self.is_down(cid):  # healed elsewhere, or the mark lapsed
                    return
                try:
                    async with asyncio.timeout(max(1.0, interval_ms / 1000)):
                        await probe()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.info("probe of %s/%s still failing: %s", cid[0], cid[1], exc)
                    await self.client.pexpire(self.key(cid), hold_ms)
                    self._down[cid] = time.monotonic() + hold_ms / 1000
                    continue
                log.info("%s connector %s is healthy again", cid[0], cid[1])
                await self.mark_up(cid)
                return
        finally:
            if self._probes.get(cid) is asyncio.current_task():
                del self._probes[cid]

    async def _on_news(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
            cid = (body["stage"], body["connector"], body["fp"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if cid[0] != self.stage:  # news of another stage's connector is not this board's to take
            return
        if body.get("state") == "down":
            self._down[cid] = time.monotonic() + int(body.get("hold_ms", 5000)) / 1000
        elif body.get("state") == "up":
            self._down.pop(cid, None)

    async def _refresh_forever(self) -> None:
        """Reconcile with Valkey: a mark whose prober died lapses there, and here too."""
        while True:
            await asyncio.sleep(self.refresh_s)
            ids = list(self._down)
            if not ids:
                continue
            with contextlib.suppress(Exception):
                ttls = [await self.client.pttl(self.key(c)) for c in ids]
                now = time.monotonic()
                for cid, ttl in zip(ids, ttls, strict=True):
                    if ttl <= 0:
                        self._down.pop(cid, None)
                    else:
                        self._down[cid] = now + ttl / 1000
