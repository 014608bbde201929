"""The stage services (stt, llm, tts) on one StageService base."""

from voicemesh.pipeline.base import StageService, run_service
from voicemesh.pipeline.llm import LLMService
from voicemesh.pipeline.stt import STTService
from voicemesh.pipeline.tts import TTSService

SERVICES: dict[str, type[StageService]] = {
    "stt": STTService,
    "llm": LLMService,
    "tts": TTSService,
}

__all__ = ["SERVICES", "LLMService", "STTService", "StageService", "TTSService", "run_service"]
