"""OpenAI text-to-speech on the official openai SDK: `audio.speech` with response_format "pcm",
streamed as it is produced (raw PCM16 mono at 24 kHz). `base_url` points it at any compatible
server. The SDK does not retry (max_retries 0): the fallback chain decides what happens after a
failure. Its status errors carry `status_code` and the response (Retry-After included), which
`errors.classify` reads as they are; a body cut mid-stream is turned into a network failure here.
Its HTTP client follows no redirect, sends to no other host and refuses a 200 that is not audio
(http.EgressGuard).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from voicemesh.config.connectors import OpenAITTSOptions
from voicemesh.connectors.audio import whole_samples
from voicemesh.connectors.base import NO_KEY, SDKClient, TTSConnector
from voicemesh.connectors.errors import map_transport_errors
from voicemesh.connectors.http import EgressGuard, sdk_http_client

if TYPE_CHECKING:
    from openai import AsyncOpenAI

SAMPLE_RATE = 24000  # what the speech API's "pcm" format is
TIMEOUT_S = 30.0


class OpenAITTS(SDKClient, TTSConnector):
    name = "openai"
    options: OpenAITTSOptions
    can_probe = True

    def __init__(self, options: OpenAITTSOptions):
        super().__init__(options)
        if not options.api_key and not options.base_url:
            raise ValueError(
                'openai tts needs api_key (e.g. "${OPENAI_API_KEY}") for api.openai.com'
            )

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def make_client(self) -> AsyncOpenAI:
        import openai

        guard = EgressGuard("openai", audio_path="/audio/speech")
        client = openai.AsyncOpenAI(
            api_key=self.options.api_key or NO_KEY,
            base_url=self.options.base_url,
            max_retries=0,
            timeout=TIMEOUT_S,
            http_client=sdk_http_client(openai, guard),
        )
        guard.pin(client.base_url)
        return client

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        if not text.strip():
            return
        opts = self.options
        extra: dict[str, Any] = {"instructions": opts.instructions} if opts.instructions else {}
        # the SDK's own errors leave as they are: errors.classify reads their status
        with map_transport_errors():
            async with self.client.audio.speech.with_streaming_response.create(
                model=opts.model, voice=opts.voice, input=text, response_format="pcm", **extra
            ) as response:
                # closed at once on an early stop too (a fallback, a barge-in)
                async with contextlib.aclosing(whole_samples(response.iter_bytes())) as aligned:
                    async for chunk in aligned:
                        yield chunk

    async def probe(self) -> None:
        """GET /v1/models: the key works and the server answers."""
        with map_transport_errors():
            await self.client.models.list()
