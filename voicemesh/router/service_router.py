"""ServiceRouter: each stage's view of a session (its config, cached by version) and its next hop.

The hot path never waits on Valkey: a session's config is read once, cached with its version, and
dropped when `vm.config.update` announces a newer version, so a live change applies on the next unit
of work. There is no orchestrator: the next hop is computed here from the session's own flow.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.msg import Msg

from voicemesh.bus.bus import Bus
from voicemesh.bus.codec import Frame
from voicemesh.bus.subjects import Subjects
from voicemesh.config.connectors import STAGE_IO
from voicemesh.config.models import AgentConfig, StageConnectors, parse_agent_config
from voicemesh.errors import VoicemeshError
from voicemesh.state.store import UNREACHABLE, ConfigStore, NotFound

log = logging.getLogger(__name__)

CONFIG_GET_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class CachedConfig:
    config: AgentConfig
    version: int


class NoRoute(VoicemeshError, LookupError):
    """The session's flow has no edge out of this stage for the stream."""


class ServiceRouter:
    def __init__(
        self,
        *,
        bus: Bus,
        store: ConfigStore,
        stage: str,
        subjects: Subjects | None = None,
        cache_size: int = 10_000,
    ):
        self.bus, self.store, self.stage = bus, store, stage
        self.subjects = subjects or Subjects()
        self._cache: OrderedDict[str, CachedConfig] = OrderedDict()
        # Versions announced while a first read of the session was in flight: that read may
        # return the older config, which must then not be cached.
        self._announced: dict[str, int] = {}
        self._loading: dict[str, int] = {}
        self._cache_size = cache_size
        self.hits = self.misses = 0

    async def start(self) -> None:
        # hop: <- publish_config_update below, sent by the transport service (vm.config.update)
        await self.bus.nc.subscribe(self.subjects.config_update, cb=self._on_update)

    async def _on_update(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
            session, version = body["session_id"], int(body.get("version", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignored malformed config update on %s", msg.subject)
            return
        cached = self._cache.get(session)
        if cached is not None and (version == 0 or cached.version < version):
            self._cache.pop(session, None)
        if session in self._loading:
            self._announced[session] = max(self._announced.get(session, 0), version or 1 << 62)

    def forget(self, session_id: str) -> None:
        self._cache.pop(session_id, None)

    # --- what stages call ---------------------------------------------------------------------

    async def load_config(self, session_id: str) -> AgentConfig:
        return (await self.load(session_id)).config

    async def load(self, session_id: str) -> CachedConfig:
        cached = self._cache.get(session_id)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(session_id)
            return cached
        self.misses += 1
        self._loading[session_id] = self._loading.get(session_id, 0) + 1
        try:
            try:
                found = await self.store.get_config(session_id)
                stored = CachedConfig(found.config, found.version) if found else None
            except UNREACHABLE as exc:
                stored = await self._ask_transport(session_id, exc)
        finally:
            self._loading[session_id] -= 1
            announced = self._announced.get(session_id, 0)
            if not self._loading[session_id]:
                del self._loading[session_id]
                self._announced.pop(session_id, None)
        if stored is None:
            raise NotFound(f"session {session_id} not found or expired")
        cached = stored
        if stored.version >= announced:  # else a newer version exists: read it next time
            self._cache[session_id] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return cached

    async def _ask_transport(self, session_id: str, down: Exception) -> CachedConfig | None:
        """Valkey is unreachable: the transport carrying the call has the config cached, so ask
        it (`vm.config.get`, request/reply). A stage that never saw the session can
        then still serve a turn during an outage. Raises `down` when no transport knows it."""
        # hop: -> transport.api.service.TransportService._on_config_get (vm.config.get.<sid>)
        try:
            reply = await self.bus.nc.request(
                self.subjects.config_get(session_id), b"", timeout=CONFIG_GET_TIMEOUT_S
            )
            body = orjson.loads(reply.data)
        except Exception:
            raise down from None
        if body.get("status") != "success":
            raise down
        config = parse_agent_config(body["configurations"])
        log.warning("Valkey unreachable: config of %s from the transport", session_id)
        return CachedConfig(config, int(body["version"]))

    def cached_entry(self, session_id: str) -> CachedConfig | None:
        return self._cache.get(session_id)

    def peek(self, session_id: str) -> AgentConfig | None:
        """The cached config, or None: the per-frame fast path, with no await."""
        cached = self._cache.get(session_id)
        return cached.config if cached is not None else None

    def cached(self, session_id: str) -> AgentConfig:
        try:
            return self._cache[session_id].config
        except KeyError:
            raise NotFound(f"config of session {session_id} is not loaded") from None

    def next_subject(self, session_id: str, stream: str | None = None) -> str:
        """Subject of the next hop for a session whose config is loaded."""
        return self.next_subject_of(self.cached(session_id), session_id, stream)

    def next_subject_of(
        self, config: AgentConfig, session_id: str, stream: str | None = None
    ) -> str:
        """Subject of the next hop under a config the caller already holds (a unit of work keeps
        the config it started with, even if a live update drops the cached copy meanwhile)."""
        return self.subjects.data(self._target(session_id, config, stream), session_id)

    async def route_to_next(self, frame: Frame, session_id: str, stream: str | None = None) -> str:
        """Publish the frame to the next stage of the session's flow; returns the subject."""
        subject = self.next_subject_of(await self.load_config(session_id), session_id, stream)
        await self.bus.publish(subject, frame)
        return subject

    async def next_stage(self, session_id: str, stream: str | None = None) -> str:
        """The stage after this one in the session's flow (loading the config if needed)."""
        return self._target(session_id, await self.load_config(session_id), stream)

    def _target(self, session_id: str, config: AgentConfig, stream: str | None) -> str:
        stream = stream or STAGE_IO[self.stage][1]
        target = config.next_hop(self.stage, stream)
        if target is None:
            raise NoRoute(f"flow of session {session_id} has no {stream} edge out of {self.stage}")
        return target

    def get_connector_config(self, session_id: str) -> StageConnectors:
        return self.cached(session_id).stage(self.stage)

    def get_system_prompt(self, session_id: str) -> str:
        return self.cached(session_id).system_prompt


async def publish_config_update(
    bus: Bus, subjects: Subjects, session_id: str, version: int, updated_keys: list[str]
) -> None:
    """Seed 000's `config.update` broadcast, keyed by session."""
    body: dict[str, Any] = {
        "session_id": session_id,
        "version": version,
        "updated_keys": updated_keys,
        "timestamp": time.time(),
    }
    # hop: -> ServiceRouter._on_update above, in every stage and transport (vm.config.update)
    await bus.nc.publish(subjects.config_update, orjson.dumps(body))
    await bus.nc.flush()
