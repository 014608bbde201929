"""The stage services (stt, llm, tts) on one StageService base (a Role, voicemesh/role.py); llm
and tts are QueuedStages."""

from voicemesh.config.stages import Stage
from voicemesh.pipeline.base import QueuedStage, StageService
from voicemesh.pipeline.llm import LLMService
from voicemesh.pipeline.stt import STTService
from voicemesh.pipeline.tts import TTSService

SERVICES: dict[str, type[StageService]] = {
    Stage.STT: STTService,
    Stage.LLM: LLMService,
    Stage.TTS: TTSService,
}

__all__ = ["SERVICES", "LLMService", "QueuedStage", "STTService", "StageService", "TTSService"]
