"""ElevenLabs streaming text-to-speech on the official elevenlabs SDK, raw PCM16 mono out.

One AsyncElevenLabs client (with its own httpx pool) serves every session of the process.
`text_to_speech.stream` yields the body as it arrives, so chunks may split a 16-bit sample;
`whole_samples` re-aligns them. The SDK's errors carry the status but no `response`, so they are
turned into ConnectorErrors here (Retry-After included); the SDK does not retry (max_retries 0):
the fallback chain decides what happens after a failure. Its httpx client follows no redirect,
sends to no other host and refuses a 200 that is not audio (http.EgressGuard).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import httpx

from voicemesh.config.connectors import ElevenLabsOptions
from voicemesh.connectors.audio import whole_samples
from voicemesh.connectors.base import TTSConnector
from voicemesh.connectors.errors import (
    ConnectorError,
    FailureKind,
    from_status,
    map_transport_errors,
    retry_after_s,
)
from voicemesh.connectors.http import TIMEOUT, EgressGuard

if TYPE_CHECKING:
    from elevenlabs.client import AsyncElevenLabs


def _detail(body: Any) -> str:
    """ElevenLabs errors: {"detail": {"status", "message"}} (or a string, or a 422 list)."""
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        status, message = detail.get("status"), detail.get("message")
        if status or message:
            return ": ".join(str(p) for p in (status, message) if p)
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)[:300] if detail not in (None, "") else "no error body"


def _api_error(exc: Exception) -> ConnectorError:
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        return ConnectorError(FailureKind.ERROR, f"ElevenLabs: {type(exc).__name__}")
    return from_status(
        status,
        f"ElevenLabs: {_detail(getattr(exc, 'body', None))}",
        retry_after_s=retry_after_s(getattr(exc, "headers", None), delta_seconds_only=True),
    )


class ElevenLabsTTS(TTSConnector):
    name = "elevenlabs"
    options: ElevenLabsOptions
    can_probe = True

    def __init__(self, options: ElevenLabsOptions):
        super().__init__(options)
        self._client: AsyncElevenLabs | None = None
        self._http: httpx.AsyncClient | None = None
        codec, _, rate = options.output_format.partition("_")
        if codec != "pcm" or not rate.isdigit():
            raise ValueError(f"output_format {options.output_format!r} is not raw PCM")
        self._rate = int(rate)

    @property
    def sample_rate(self) -> int:
        return self._rate

    def client(self) -> AsyncElevenLabs:
        if self._client is None:
            from elevenlabs.client import AsyncElevenLabs
            from elevenlabs.environment import ElevenLabsEnvironment

            base = self.options.base_url or ElevenLabsEnvironment.PRODUCTION.value
            guard = EgressGuard("elevenlabs", base, audio_path="/text-to-speech/")
            self._http = guard.client(timeout=TIMEOUT)
            self._client = AsyncElevenLabs(
                api_key=self.options.api_key,
                base_url=self.options.base_url,  # None: the SDK's production environment
                httpx_client=self._http,
            )
        return self._client

    async def warmup(self) -> None:
        await asyncio.to_thread(self.client)  # a cold SDK import is not for the event loop

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._client = self._http = None

    @staticmethod
    def _request_options() -> Any:
        # chunk_size None: hand on the body as it arrives instead of waiting for 1 KiB pieces.
        return cast(Any, {"max_retries": 0, "chunk_size": None})

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        if not text.strip():
            return
        from elevenlabs.core.api_error import ApiError

        opts = self.options
        audio = self.client().text_to_speech.stream(
            opts.voice_id,
            text=text,
            model_id=opts.model_id,
            output_format=cast(Any, opts.output_format),
            request_options=self._request_options(),
        )
        aligned = whole_samples(audio)
        try:
            with map_transport_errors():
                async for chunk in aligned:
                    yield chunk
        except ApiError as exc:
            raise _api_error(exc) from None
        finally:  # on an early stop too (a fallback, a barge-in): release the connection now
            await aligned.aclose()
            await audio.aclose()

    async def probe(self) -> None:
        """GET /v1/voices/{voice_id}: the key works and the configured voice exists."""
        from elevenlabs.core.api_error import ApiError

        try:
            with map_transport_errors():
                await self.client().voices.get(
                    self.options.voice_id, request_options=self._request_options()
                )
        except ApiError as exc:
            raise _api_error(exc) from None
