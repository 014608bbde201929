"""A loopback ElevenLabs text-to-speech API: the streaming endpoint the official SDK calls, raw PCM
of a deterministic tone, ElevenLabs-shaped errors, and the voices endpoints used as probes.

    POST /v1/text-to-speech/{voice_id}/stream?output_format=pcm_16000   header xi-api-key
         body {"text": ..., "model_id": ...}  ->  200, chunked raw PCM16 mono
    GET  /v1/voices, GET /v1/voices/{voice_id}
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voicemesh.testing.loopback.audio import PCMStream, SpeechServer
from voicemesh.testing.loopback.base import Failure, hang


class ElevenLabsServer(SpeechServer):
    name = "elevenlabs"

    default_frequency_hz = 300.0

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/text-to-speech/{voice_id}/stream", self._stream, methods=["POST"]),
                Route("/v1/voices", self._voices, methods=["GET"]),
                Route("/v1/voices/{voice_id}", self._voice, methods=["GET"]),
            ]
        )

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
        return JSONResponse(
            {"detail": {"status": code, "message": message}}, status, headers=headers or None
        )

    def _refusal(self, request: Request, failure: Failure) -> Response | None:
        """The answer for an unauthorized request or an injected HTTP failure, if any."""
        key = request.headers.get("xi-api-key")
        if failure.mode == "401" or not key or (self.api_key and key != self.api_key):
            return self.error(401, "invalid_api_key", "Invalid API key")
        if failure.mode == "429":
            return self.error(
                429,
                "too_many_concurrent_requests",
                "Too many concurrent requests for your subscription.",
                **{"Retry-After": "1"},
            )
        if failure.mode in ("error", "500"):
            return self.error(500, "internal_server_error", "An internal error occurred.")
        return None

    # --- endpoints ---------------------------------------------------------------------------

    async def _stream(self, request: Request) -> Response | PCMStream:
        failure = self.take_failure()
        try:
            body = await request.json()
        except ValueError:
            body = None
        output_format = request.query_params.get("output_format", "mp3_44100_128")
        self.last = {
            "voice_id": request.path_params["voice_id"],
            "output_format": output_format,
            "body": body,
            "text": body.get("text") if isinstance(body, dict) else None,
            "model_id": body.get("model_id") if isinstance(body, dict) else None,
            "headers": dict(request.headers),
        }
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        text = self.last["text"]
        if not isinstance(text, str) or not text.strip():
            return JSONResponse(
                {"detail": [{"loc": ["body", "text"], "msg": "field required", "type": "missing"}]},
                422,
            )
        codec, _, rate = output_format.partition("_")
        if codec != "pcm" or not rate.isdigit():
            return self.error(
                400, "invalid_output_format", f"the loopback serves only pcm_*, not {output_format}"
            )
        sample_rate = int(rate)
        return self.speak(
            text, sample_rate, failure, headers={"request-id": f"req-{self.requests}"}
        )

    def _voice_json(self, voice_id: str) -> dict[str, Any]:
        return {"voice_id": voice_id, "name": "Loopback", "category": "premade"}

    async def _voices(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        return JSONResponse({"voices": [self._voice_json("loopback-voice")]})

    async def _voice(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        return JSONResponse(self._voice_json(request.path_params["voice_id"]))
