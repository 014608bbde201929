"""Azure AI Speech text-to-speech over its REST API (SSML in, raw PCM16 mono out) on httpx.

The Speech SDK is a native, callback-driven library and no maintained asyncio client for the REST
API exists, so this talks to the documented endpoint directly:

    POST {base}/cognitiveservices/v1
         Ocp-Apim-Subscription-Key, Content-Type: application/ssml+xml,
         X-Microsoft-OutputFormat: raw-16khz-16bit-mono-pcm (24/48 kHz too), User-Agent
    GET  {base}/cognitiveservices/voices/list   (the probe)

with base https://{region}.tts.speech.microsoft.com unless `base_url` is set (both checked against
the egress policy before this connector is built). The body streams as Azure produces it; chunks
are re-aligned to whole samples. The client follows no redirect and refuses a 200 that is not
audio (http.EgressGuard).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from xml.sax.saxutils import escape, quoteattr

import httpx

from voicemesh.config.connectors import AzureTTSOptions
from voicemesh.connectors.audio import whole_samples
from voicemesh.connectors.base import TTSConnector
from voicemesh.connectors.errors import (
    ConnectorError,
    from_status,
    map_transport_errors,
    retry_after_s,
)
from voicemesh.connectors.http import TIMEOUT, EgressGuard

USER_AGENT = "voicemesh"
RAW_FORMAT = re.compile(r"raw-(\d+)(k?)hz-16bit-mono-pcm")  # raw-16khz-…, raw-22050hz-…
LOCALE = re.compile(r"^([a-z]{2,3}-[A-Z]{2})-")


def ssml(text: str, voice: str, rate: str | None = None) -> str:
    """The SSML document for one sentence; the text is XML-escaped, attributes are quoted."""
    lang = m.group(1) if (m := LOCALE.match(voice)) else "en-US"
    body = escape(text)
    if rate:
        body = f"<prosody rate={quoteattr(rate)}>{body}</prosody>"
    return (
        f"<speak version='1.0' xml:lang={quoteattr(lang)}>"
        f"<voice name={quoteattr(voice)}>{body}</voice></speak>"
    )


def _error(response: httpx.Response, body: bytes) -> ConnectorError:
    """Azure answers errors with an empty body, plain text, or {"error": {"code", "message"}}."""
    message = body.decode("utf-8", "replace").strip()
    try:
        data = response.json() if body else None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = str(data["error"].get("message") or data["error"].get("code") or message)
    except ValueError:
        pass
    return from_status(
        response.status_code,
        f"Azure TTS: {message[:300] or response.reason_phrase or 'no error body'}",
        retry_after_s=retry_after_s(response.headers, delta_seconds_only=True),
    )


class AzureTTS(TTSConnector):
    name = "azure"
    options: AzureTTSOptions
    can_probe = True

    def __init__(self, options: AzureTTSOptions):
        super().__init__(options)
        if options.base_url:
            self.base_url = options.base_url.rstrip("/")
        elif options.region:
            self.base_url = f"https://{options.region}.tts.speech.microsoft.com"
        else:
            raise ValueError("azure tts needs `region` or `base_url`")
        fmt = RAW_FORMAT.fullmatch(options.output_format)
        if fmt is None:
            raise ValueError(f"output_format {options.output_format!r} is not raw PCM")
        self._rate = int(fmt.group(1)) * (1000 if fmt.group(2) else 1)
        self._http: httpx.AsyncClient | None = None
        # no redirects, no other host, and a 200 that is not audio is a failure
        self.guard = EgressGuard("azure", self.base_url, audio_path="/cognitiveservices/v1")

    @property
    def sample_rate(self) -> int:
        return self._rate

    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = self.guard.client(
                timeout=TIMEOUT,
                headers={
                    "Ocp-Apim-Subscription-Key": self.options.api_key,
                    "User-Agent": USER_AGENT,
                },
            )
        return self._http

    async def warmup(self) -> None:
        self.http()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        if not text.strip():
            return
        opts = self.options
        with map_transport_errors():
            async with self.http().stream(
                "POST",
                f"{self.base_url}/cognitiveservices/v1",
                content=ssml(text, opts.voice, opts.rate).encode(),
                headers={
                    "Content-Type": "application/ssml+xml",
                    "X-Microsoft-OutputFormat": opts.output_format,
                },
            ) as response:
                if response.status_code >= 400:
                    raise _error(response, await response.aread())
                # closed at once on an early stop too (a fallback, a barge-in)
                async with contextlib.aclosing(whole_samples(response.aiter_bytes())) as aligned:
                    async for chunk in aligned:
                        yield chunk

    async def probe(self) -> None:
        """GET the voices list: the key works for this region (only the status is read)."""
        with map_transport_errors():
            async with self.http().stream(
                "GET", f"{self.base_url}/cognitiveservices/voices/list"
            ) as response:
                if response.status_code >= 400:
                    raise _error(response, await response.aread())
