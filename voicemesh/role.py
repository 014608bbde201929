"""Role: what every role process shares (the stages and the transport).

A role connects to Valkey (ConfigStore, checked at once so a wrong URL or password is one clear
error) and to NATS (Bus), keeps the session config cache (ServiceRouter), serves Prometheus
metrics when a port is configured, and answers the health ping on `vm.health.<role>` only once it
is ready. It stops in order: what brings or holds live work first (`closers`), then in-flight work
drains on the bus, then what that work used (`release`), then Valkey.

Start-up order, with the hooks a subclass fills in:

    connect (Valkey, NATS, router) → metrics → prepare() → setup() → health → ready

`prepare` is for a family of roles (StageService: claims, ctl, engines), `setup` for one role's own
subscriptions. `run_role` runs a role until SIGINT/SIGTERM, then drains it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import orjson
from nats.aio.msg import Msg

from voicemesh.bus import Bus, Subjects, tracing
from voicemesh.config.logging import bind
from voicemesh.config.settings import Settings, otel_env
from voicemesh.router import ServiceRouter
from voicemesh.state import ConfigStore

log = logging.getLogger(__name__)


class Role:
    role: ClassVar[str]
    #: False for a role whose own HTTP app serves /metrics (the transport)
    serves_metrics: ClassVar[bool] = True

    store: ConfigStore
    bus: Bus
    router: ServiceRouter

    def __init__(self, settings: Settings):
        if not settings.nats_url or not settings.valkey_url:
            raise ValueError(f"{self.role}: NATS_URL and VALKEY_URL must be set")
        self.nats_url: str = settings.nats_url
        self.valkey_url: str = settings.valkey_url
        self.settings = settings
        self.instance = settings.instance_id
        self.subjects = Subjects(settings.subject_prefix)
        self.started_at = time.time()
        #: run first on stop, in order: what brings new work or holds live work (a stage's
        #: intake, the transport's calls); one that fails is logged and the rest still run
        self.closers: list[Callable[[], Awaitable[None]]] = []

    @property
    def title(self) -> str:
        """The role as its log lines name it ("llm stage", "transport")."""
        return self.role

    # --- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        bind(role=self.role, instance=self.instance)
        self.tracing = await tracing.start(otel_env(self.settings))
        await self.connect()
        if self.serves_metrics and self.settings.metrics_port is not None:
            self.serve_metrics(self.settings.metrics_port)
        await self.prepare()
        await self.setup()
        # Health answers only once engines are loaded and work is subscribed: ready means ready.
        # hop: <- voicemesh.launcher.Stack.wait_ready (vm.health.<role>)
        await self.bus.nc.subscribe(self.subjects.health(self.role), cb=self._on_health)
        await self.bus.settle()
        log.info("%s ready", self.title)

    async def connect(self) -> None:
        self.store = ConfigStore.from_url(
            self.valkey_url,
            settings=self.settings,
            key_prefix=self.settings.key_prefix,
            default_ttl_s=self.settings.session_ttl_s,
        )
        await self.store.check()
        self.bus = await Bus.connect(
            self.nats_url,
            name=f"voicemesh-{self.role}-{self.instance}",
            settings=self.settings,
        )
        self.router = ServiceRouter(
            bus=self.bus, store=self.store, stage=self.role, subjects=self.subjects
        )
        await self.router.start()

    def serve_metrics(self, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=self.settings.http_host)
        except OSError as exc:  # metrics are worth a warning, not a dead role
            log.error("cannot serve metrics on port %d: %s", port, exc)
        log.info("metrics on http://%s:%d/metrics", self.settings.http_host, port)

    async def prepare(self) -> None:
        """What a family of roles needs before a role's own setup (a base class's hook)."""

    async def setup(self) -> None:
        """Subscribe to this role's own work; health answers only after this returns."""

    # --- health ------------------------------------------------------------------------------

    def health_body(self) -> dict[str, Any]:
        return {"role": self.role, "instance": self.instance}

    async def _on_health(self, msg: Msg) -> None:
        if msg.reply:
            await self.bus.nc.publish(msg.reply, orjson.dumps(self.health_body()))

    # --- stop --------------------------------------------------------------------------------

    async def stop(self) -> None:
        for close in self.closers:
            try:
                await close()
            except Exception:  # the drain below must still happen, or in-flight work is lost
                log.exception("%s: stopping %s failed", self.title, close)
        await self.bus.drain()
        await self.release()
        await self.store.close()
        if self.tracing:
            await tracing.stop()  # the last role of the process posts the spans left

    async def release(self) -> None:
        """After the drain: let go of what in-flight work used (claims, engines)."""


def freeze_startup_heap() -> None:
    """Once a role's process is up: what startup made (modules, engines, the app, ~90 000
    objects with the offline engines) lives as long as the process, yet each full collection
    walked it, stalling the loop ~25 ms mid-call. Frozen out of the collector, it is not walked
    again (refcounting still frees it); what was garbage by then is collected first."""
    gc.collect()
    gc.freeze()


async def run_role(role: Role) -> None:
    """Run until SIGINT/SIGTERM, then drain in-flight work and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await role.start()
    freeze_startup_heap()
    await stop.wait()
    log.info("%s draining", role.title)
    await role.stop()
