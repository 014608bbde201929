"""Connector classes by stage and name, imported lazily so a process loads only the engines its
sessions use; instances are cached per (stage, name, options), so each model loads once."""

from __future__ import annotations

import asyncio
import importlib

from voicemesh.config.connectors import CONNECTOR_OPTIONS, ConnectorOptions
from voicemesh.config.hosts import check_egress
from voicemesh.config.secrets import resolve_credentials
from voicemesh.config.stages import Stage
from voicemesh.connectors.base import Connector

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


class ConnectorPool:
    """One live instance per (stage, name, options) in this process."""

    def __init__(self) -> None:
        self._instances: dict[tuple[str, str, str], Connector] = {}
        self._lock = asyncio.Lock()

    async def get(self, stage: str, name: str, options: ConnectorOptions) -> Connector:
        key = (stage, name, options.model_dump_json())
        inst = self._instances.get(key)
        if inst is not None:
            return inst
        async with self._lock:
            inst = self._instances.get(key)
            if inst is None:
                # ${ENV} references resolve here, in this process's environment, and only the
                # connector holds the result: the stored config keeps the reference. Only the
                # fields the options model declares as credentials are resolved, and only for
                # allowed names: anything else that looks like a reference stays plain text.
                # The egress policy again, at build time: a config that reached this process
                # without passing validation (or an options object built in code) still
                # cannot point a connector, and the secret it carries, somewhere else.
                check_egress(stage, name, options)
                model = type(options)
                resolved = model.model_validate(
                    resolve_credentials(stage, name, model, options.model_dump())
                )
                inst = connector_class(stage, name)(resolved)
                await inst.warmup()
                self._instances[key] = inst
        return inst

    async def aclose(self) -> None:
        for inst in self._instances.values():
            await inst.aclose()
        self._instances.clear()
