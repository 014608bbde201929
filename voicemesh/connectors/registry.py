"""Connector classes by stage and name, imported lazily so a process loads only the engines its
sessions use; instances are cached per (stage, name, options), so each model loads once, in a
bounded LRU pool."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from voicemesh.config.connectors import CONNECTOR_OPTIONS, ConnectorOptions
from voicemesh.config.hosts import check_egress
from voicemesh.config.secrets import resolve_credentials
from voicemesh.config.stages import Stage
from voicemesh.connectors.base import Connector

log = logging.getLogger(__name__)

_CLASSES: dict[tuple[str, str], str] = {
    (Stage.STT, "whisper"): "voicemesh.connectors.stt.whisper:WhisperSTT",
    (Stage.LLM, "smollm2"): "voicemesh.connectors.llm.smollm2:SmolLM2LLM",
    (Stage.LLM, "scripted"): "voicemesh.connectors.llm.scripted:ScriptedLLM",
    (Stage.LLM, "echo"): "voicemesh.connectors.llm.scripted:EchoLLM",
    (Stage.TTS, "piper"): "voicemesh.connectors.tts.piper:PiperTTS",
    (Stage.TTS, "tone"): "voicemesh.connectors.tts.tone:ToneTTS",
    (Stage.STT, "openai"): "voicemesh.connectors.stt.openai:OpenAISTT",
    (Stage.STT, "deepgram"): "voicemesh.connectors.stt.deepgram:DeepgramSTT",
    (Stage.LLM, "openai"): "voicemesh.connectors.llm.openai:OpenAILLM",
    (Stage.LLM, "anthropic"): "voicemesh.connectors.llm.anthropic:AnthropicLLM",
    (Stage.TTS, "elevenlabs"): "voicemesh.connectors.tts.elevenlabs:ElevenLabsTTS",
    (Stage.TTS, "azure"): "voicemesh.connectors.tts.azure:AzureTTS",
    (Stage.TTS, "openai"): "voicemesh.connectors.tts.openai:OpenAITTS",
    (Stage.STT, "passthrough"): "voicemesh.connectors.passthrough:PassthroughSTT",
    (Stage.LLM, "passthrough"): "voicemesh.connectors.passthrough:PassthroughLLM",
    (Stage.TTS, "passthrough"): "voicemesh.connectors.passthrough:PassthroughTTS",
}

#: Connectors with which the stage relays frames unchanged instead of calling an engine.
RELAYS = frozenset({"passthrough"})

assert {k for k in _CLASSES} == {
    (stage, name)
    for stage, names in CONNECTOR_OPTIONS.items()
    if stage != Stage.TRANSPORT
    for name in names
}, "every connector with options needs a class, and the reverse"


def connector_class(stage: str, name: str) -> type[Connector]:
    try:
        module, _, cls = _CLASSES[(stage, name)].partition(":")
    except KeyError:
        raise LookupError(f"no {stage} connector named {name!r}") from None
    return getattr(importlib.import_module(module), cls)


#: VOICEMESH_CONNECTOR_POOL_SIZE's default (a pool built outside a stage, e.g. in a test, uses it)
DEFAULT_POOL_SIZE = 64

PoolKey = tuple[str, str, str]  # stage, name, options in their stored form (JSON)


@dataclass
class _Entry:
    conn: Connector
    options: ConnectorOptions  # as stored: the health board's fingerprint is made of these
    users: int = 0  # leases held by units of work running on it now
    retired: bool = False  # evicted while in use: closed when the last lease ends


class ConnectorPool:
    """One live instance per (stage, name, options) in this process, at most `size` of them.

    Instances are shared by every session whose config has the same options, so a model or an HTTP
    client is built once. Configs are untrusted and come in unbounded variety, so the pool is an
    LRU: past `size`, the least recently used instance is closed (its HTTP clients) and
    `on_evict` is told (the stage stops its health probe). One that a unit of work holds a lease
    on is taken out of the pool at once but closed only when its last lease ends, so a running
    turn is never cut off; its session's next turn builds a fresh instance.
    """

    def __init__(
        self,
        size: int = DEFAULT_POOL_SIZE,
        *,
        on_evict: Callable[[str, str, ConnectorOptions], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a connector pool holds at least one connector")
        self.size = size
        self.on_evict = on_evict
        self._entries: OrderedDict[PoolKey, _Entry] = OrderedDict()
        self._lock = asyncio.Lock()
        #: instances closed so far because the pool was full (a measure for tests and metrics)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, stage: str, name: str, options: ConnectorOptions) -> Connector:
        """The instance for these options, built on first use. Without a lease (`lease`), it may
        be closed once the pool evicts it: fine for a quick use, not for a unit of work."""
        return (await self._entry(stage, name, options)).conn

    @contextlib.asynccontextmanager
    async def lease(
        self, stage: str, name: str, options: ConnectorOptions
    ) -> AsyncIterator[Connector]:
        """The instance, kept open until the block ends even if the pool evicts it meanwhile."""
        entry = await self._entry(stage, name, options)
        entry.users += 1
        try:
            yield entry.conn
        finally:
            entry.users -= 1
            if entry.retired and entry.users == 0:
                await asyncio.shield(self._close(stage, name, entry))

    async def _entry(self, stage: str, name: str, options: ConnectorOptions) -> _Entry:
        key = (stage, name, options.model_dump_json())
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        async with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            # ${ENV} references resolve here, in this process's environment, and only the
            # connector holds the result: the stored config keeps the reference. Only the
            # fields the options model declares as credentials are resolved, and only for
            # allowed names: anything else that looks like a reference stays plain text.
            # The egress policy again, at build time: a config that reached this process
            # without passing validation (or an options object built in code) still cannot
            # point a connector, and the secret it carries, somewhere else.
            check_egress(stage, name, options)
            model = type(options)
            resolved = model.model_validate(
                resolve_credentials(stage, name, model, options.model_dump())
            )
            # the connector's module may import a provider SDK: not on the event loop
            cls = await asyncio.to_thread(connector_class, stage, name)
            inst = cls(resolved)
            await inst.warmup()
            entry = self._entries[key] = _Entry(inst, options)
            victims: list[tuple[PoolKey, _Entry]] = []
            while len(self._entries) > self.size:
                victims.append(self._entries.popitem(last=False))
        for (v_stage, v_name, _), victim in victims:
            self.evicted += 1
            log.info("connector pool full (%d): evicting %s/%s", self.size, v_stage, v_name)
            if victim.users:
                victim.retired = True
            else:
                await self._close(v_stage, v_name, victim)
        return entry

    async def _close(self, stage: str, name: str, entry: _Entry) -> None:
        if self.on_evict is not None:
            try:
                self.on_evict(stage, name, entry.options)
            except Exception as exc:  # a hook must not stop the close
                log.warning("connector eviction hook failed: %s", exc)
        try:
            await entry.conn.aclose()
        except Exception as exc:
            log.warning("closing evicted %s connector %s failed: %s", stage, name, exc)

    async def aclose(self) -> None:
        entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            await entry.conn.aclose()
