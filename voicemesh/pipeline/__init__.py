"""The stage services (stt, llm, tts) on one StageService base (a Role, voicemesh/role.py); llm
and tts are QueuedStages."""

from voicemesh.pipeline.base import QueuedStage, StageService
from voicemesh.pipeline.llm import LLMService
from voicemesh.pipeline.stt import STTService
from voicemesh.pipeline.tts import TTSService

SERVICES: dict[str, type[StageService]] = {
    "stt": STTService,
    "llm": LLMService,
    "tts": TTSService,
}

__all__ = ["SERVICES", "LLMService", "QueuedStage", "STTService", "StageService", "TTSService"]
