"""The transport service: the process that hosts calls (the CallHost the call engine asks for
its bus, store, router and stage owners) and the config manager (HTTP API, `vm.config.get`).

It is the only role that writes configs; stages only read them. Updates are announced on
`vm.config.update` so every stage drops its cached copy at once. Which instance owns each session's
streaming stage is kept here, not in a call, because it outlives any one call of the session.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from voicemesh.bus import Frame, Subjects
from voicemesh.bus.events import End
from voicemesh.config.connectors import TurnOptions
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.config.stages import Stage
from voicemesh.role import Role
from voicemesh.router import publish_config_update
from voicemesh.router.service_router import CachedConfig
from voicemesh.state.store import UNREACHABLE, StoredConfig
from voicemesh.transport.api.capacity import CallCapacity
from voicemesh.transport.call.host import NoInstance
from voicemesh.transport.call.turns import preload

log = logging.getLogger(__name__)


class TransportService(Role):
    """Connecting, health (once ready), draining and stopping come from Role, as for every
    stage; what is the transport's own is its setup and the calls it closes first on stop."""

    role = Stage.TRANSPORT
    serves_metrics = False  # /metrics is served by its own HTTP app (api/app.py)

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self._owners: dict[str, str] = {}
        self.capacity = CallCapacity(settings.max_calls)

    async def setup(self) -> None:
        # the VAD and turn models (Silero, smart-turn) load once here, not in a caller's turn
        await asyncio.to_thread(preload, TurnOptions(vad="silero", turn="smart_turn"))
        if self.settings.default_agent_file:
            await self._seed_default_agent(Path(self.settings.default_agent_file))
        # hop: <- voicemesh.router.service_router.ServiceRouter._ask_transport (vm.config.get.<sid>)
        await self.bus.nc.subscribe(
            self.subjects.config_get_all, queue=Stage.TRANSPORT, cb=self._on_config_get
        )

    async def _seed_default_agent(self, path: Path) -> None:
        config = parse_agent_config(await asyncio.to_thread(path.read_bytes))
        record, created = await self.store.ensure_default_agent(
            "local", config, description=f"from {path}"
        )
        if created:
            log.info("stored default agent %r from %s", record.name, path)

    async def config_changed(self, session_id: str, version: int, keys: list[str]) -> None:
        self.router.forget(session_id)
        # hop: -> voicemesh.router.service_router.ServiceRouter._on_update (vm.config.update)
        await publish_config_update(self.bus, self.subjects, session_id, version, keys)

    async def session_deleted(self, session_id: str) -> None:
        self.router.forget(session_id)
        self._owners.pop(session_id, None)
        # hop: -> voicemesh.pipeline.base.StageService._on_ctl and Call._control (vm.ctl.<sid>)
        await self.bus.publish(self.subjects.ctl(session_id), Frame.event(End()))
        await publish_config_update(self.bus, self.subjects, session_id, 0, ["*"])

    async def _on_config_get(self, msg: Msg) -> None:
        """Answers a stage's `vm.config.get.<session>` request with the session's config; while
        Valkey is unreachable, with the copy cached for a live call."""
        if not msg.reply:
            return
        session = Subjects.session_of(msg.subject)
        stored: StoredConfig | CachedConfig | None  # either way, a config and its version
        try:
            stored = await self.store.get_config(session)
        except UNREACHABLE:  # a live call's config is cached here: a stage can go on with it
            stored = self.router.cached_entry(session)
        body: dict[str, Any]
        if stored is None:
            body = {"status": "error", "error": f"session {session} not found or expired"}
        else:
            body = {
                "status": "success",
                "session_id": session,
                "version": stored.version,
                "configurations": orjson.loads(stored.config.to_json()),
            }
        await self.bus.nc.publish(msg.reply, orjson.dumps(body))

    async def ensure_owner(
        self, stage: str, session: str, *, replay: list[Frame] | None = None
    ) -> bool:
        """Make sure one instance of a streaming stage owns the session; if the owner changed
        since we last looked (its lease lapsed), hand over and resend `replay`. True if replayed."""
        known = self._owners.get(session)
        try:
            holder = await self.store.lease_holder(stage, session)
        except UNREACHABLE as exc:
            if known is None:  # nobody can take a lease now: this turn goes unheard
                raise NoInstance(f"Valkey unreachable: no {stage} owner for {session}") from exc
            # no lease to read: the owner we know keeps the stream (it keeps it too, see stt.py)
            log.warning("Valkey unreachable, %s stream stays with %s: %s", stage, known, exc)
            return False
        if holder is not None and holder == known:
            return False
        owner = await self._assign(stage, session)
        self._owners[session] = owner
        if replay:  # the stream moved (lease lapsed or taken over): resend the open utterance
            subject = self.subjects.data(stage, session)
            for frame in replay:
                # hop: -> voicemesh.pipeline.stt.STTService._on_audio (vm.stt.<sid>, the replay)
                await self.bus.publish(subject, frame)
            return True
        return False

    async def _assign(self, stage: str, session: str) -> str:
        """Ask the stage's instances to take the session, retrying for up to stage_wait_ms: an
        instance being restarted gets that long to come back."""
        payload = orjson.dumps({"session_id": session})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.stage_wait_ms / 1000
        attempt, running = 0, False
        while True:
            left = deadline - loop.time()
            try:
                # hop: -> voicemesh.pipeline.stt.STTService._on_assign (vm.assign.stt)
                reply = await self.bus.nc.request(
                    self.subjects.assign(stage), payload, timeout=max(0.2, min(2.0, left))
                )
                body = orjson.loads(reply.data)
                if "owner" in body:
                    return str(body["owner"])
                raise NoInstance(f"{stage} refused session {session}: {body.get('error')}")
            except NoRespondersError:
                pass
            except NatsTimeout:
                running = True  # someone listens, but did not answer in time
            if loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0, max(0.0, deadline - loop.time())))
            attempt += 1
        wait = self.settings.stage_wait_ms / 1000
        if running:
            raise NoInstance(f"no {stage} instance took session {session} within {wait:g} s")
        raise NoInstance(f"no {stage} instance is running")
