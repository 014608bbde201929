"""A loopback Azure AI Speech text-to-speech REST API: SSML in, raw PCM of a deterministic tone out,
Azure-shaped errors, and the voices list used as a probe.

    POST /cognitiveservices/v1   headers Ocp-Apim-Subscription-Key,
         Content-Type application/ssml+xml, X-Microsoft-OutputFormat raw-16khz-16bit-mono-pcm
         (or 24/48 kHz)  ->  200, chunked raw PCM
    GET  /cognitiveservices/voices/list

The SSML body is parsed as XML, so text that was not escaped fails the request (400) and escaped
text is recorded exactly as the speaker would read it.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voicemesh.testing.loopback.audio import PCMStream, SpeechServer
from voicemesh.testing.loopback.base import Failure, hang

RAW_FORMAT = re.compile(r"raw-(\d+)(k?)hz-16bit-mono-pcm")  # raw-16khz-…, raw-22050hz-…
VOICES = ["en-US-JennyNeural", "en-US-GuyNeural", "en-GB-SoniaNeural"]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # "{namespace}voice" -> "voice"


class AzureSpeechServer(SpeechServer):
    name = "azure"

    default_frequency_hz = 500.0

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/cognitiveservices/v1", self._synthesize, methods=["POST"]),
                Route("/cognitiveservices/voices/list", self._voices, methods=["GET"]),
            ]
        )

    @staticmethod
    def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status, headers=headers or None
        )

    def _refusal(self, request: Request, failure: Failure) -> Response | None:
        key = request.headers.get("ocp-apim-subscription-key")
        if failure.mode == "401" or not key or (self.api_key and key != self.api_key):
            return self.error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource.",
            )
        if failure.mode == "429":
            return self.error(
                429, "429", "Too many requests. Please try again later.", **{"Retry-After": "1"}
            )
        if failure.mode in ("error", "500"):
            return self.error(500, "InternalServerError", "An internal server error occurred.")
        return None

    async def _synthesize(self, request: Request) -> Response | PCMStream:
        failure = self.take_failure()
        body = await request.body()
        output_format = request.headers.get("x-microsoft-outputformat", "")
        self.last = {
            "ssml": body.decode("utf-8", "replace"),
            "output_format": output_format,
            "headers": dict(request.headers),
            "voice": None,
            "text": None,
            "rate": None,
        }
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        if not request.headers.get("content-type", "").startswith("application/ssml+xml"):
            return Response("Content-Type must be application/ssml+xml", 415)
        fmt = RAW_FORMAT.fullmatch(output_format)
        if fmt is None:
            return Response(f"unsupported X-Microsoft-OutputFormat {output_format!r}", 400)
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            return Response(f"invalid SSML: {exc}", 400)
        voice = next((el for el in root.iter() if _local(el.tag) == "voice"), None)
        if _local(root.tag) != "speak" or voice is None or not voice.get("name"):
            return Response("SSML needs <speak> with a named <voice>", 400)
        prosody = next((el for el in voice.iter() if _local(el.tag) == "prosody"), None)
        text = "".join(voice.itertext())
        self.last.update(
            voice=voice.get("name"),
            text=text,
            rate=prosody.get("rate") if prosody is not None else None,
            lang=root.get("{http://www.w3.org/XML/1998/namespace}lang"),
        )
        sample_rate = int(fmt.group(1)) * (1000 if fmt.group(2) else 1)
        return self.speak(
            text,
            sample_rate,
            failure,
            media_type="audio/x-wav",  # what Azure labels raw PCM with
            headers={"X-RequestId": f"req-{self.requests}"},
        )

    async def _voices(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        return JSONResponse(
            [
                {
                    "Name": f"Microsoft Server Speech Text to Speech Voice ({v[:5]}, {v[6:]})",
                    "ShortName": v,
                    "Locale": v[:5],
                    "SampleRateHertz": "24000",
                    "VoiceType": "Neural",
                }
                for v in VOICES
            ]
        )
