"""OpenAI's transcriptions API (or any compatible server: speaches, faster-whisper-server, vLLM) on
the official openai SDK.

The API has no streaming input: the stage buffers an utterance and calls `transcribe` once at its
end, which uploads it as a WAV file. The SDK's own retries are off (max_retries=0): the fallback
chain decides what happens after a failure, and a retry inside the SDK would only eat the attempt
timeout. SDK errors are left as they are: `errors.classify` reads their `status_code` (429 →
rate_limit with Retry-After, 5xx → server, 401/400 → permanent) and their class names
(APITimeoutError → timeout, APIConnectionError → network).
"""

from __future__ import annotations

import io
import wave
from typing import Any

from voicemesh.config.connectors import OpenAISTTOptions
from voicemesh.connectors.base import NO_KEY, SDKClient, STTConnector
from voicemesh.connectors.http import EgressGuard, sdk_http_client

#: Sent when the config names no key: local OpenAI-compatible servers ignore it, and the SDK
#: must not fall back to the process's OPENAI_API_KEY behind the config's back.
#: Shorter utterances are not sent (OpenAI rejects audio under 0.1 s with a 400).
MIN_AUDIO_MS = 100


def pcm16_to_wav(pcm: bytes, sample_rate: int, channels: int = 1) -> bytes:
    """PCM16 little-endian samples wrapped in a RIFF/WAV container (no copy of the samples
    beyond the one into the buffer)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


class OpenAISTT(SDKClient, STTConnector):
    name = "openai"
    options: OpenAISTTOptions
    can_probe = True

    def make_client(self) -> Any:
        import openai

        guard = EgressGuard("openai")  # no redirects, no other host
        client = openai.AsyncOpenAI(
            api_key=self.options.api_key or NO_KEY,
            base_url=self.options.base_url,
            max_retries=0,
            http_client=sdk_http_client(openai, guard),
        )
        guard.pin(client.base_url)
        return client

    async def transcribe(self, pcm: bytes, sample_rate: int) -> str:
        if len(pcm) < sample_rate * 2 * MIN_AUDIO_MS // 1000:
            return ""
        return await self._request(pcm, sample_rate)

    async def _request(self, pcm: bytes, sample_rate: int) -> str:
        o = self.options
        extra: dict[str, Any] = {}
        if o.language:
            extra["language"] = o.language
        if o.prompt:
            extra["prompt"] = o.prompt
        result = await self.client.audio.transcriptions.create(
            model=o.model,
            file=("utterance.wav", pcm16_to_wav(pcm, sample_rate), "audio/wav"),
            response_format="json",
            **extra,
        )
        text = result if isinstance(result, str) else getattr(result, "text", "")
        return (text or "").strip()

    async def probe(self) -> None:
        """A real transcription of 200 ms of silence: exercises the very endpoint (and key) that
        failed, unlike models.list, which may be fine while transcription answers 429/5xx."""
        await self._request(bytes(2 * 16000 // 5), 16000)
