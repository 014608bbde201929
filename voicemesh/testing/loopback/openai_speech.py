"""A loopback OpenAI speech API: raw 24 kHz PCM16 mono of a deterministic tone, OpenAI-shaped
errors, and the models list used as a probe.

    POST /v1/audio/speech   header Authorization: Bearer <key>
         body {"model", "input", "voice", "response_format": "pcm", "instructions"?}
         ->  200, chunked raw PCM16 mono at 24 kHz
    GET  /v1/models, GET /v1/models/{model}
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voicemesh.testing.loopback.audio import PCMStream, SpeechServer
from voicemesh.testing.loopback.base import Failure, hang

SAMPLE_RATE = 24000
MODELS = ["gpt-4o-mini-tts", "tts-1", "tts-1-hd"]


class OpenAISpeechServer(SpeechServer):
    name = "openai-speech"

    default_frequency_hz = 700.0

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/audio/speech", self._speech, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model}", self._model, methods=["GET"]),
            ]
        )

    @staticmethod
    def error(
        status: int, message: str, type_: str, code: str | None = None, **headers: str
    ) -> JSONResponse:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return JSONResponse(body, status, headers=headers or None)

    def _refusal(self, request: Request, failure: Failure) -> Response | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if (
            failure.mode == "401"
            or scheme.lower() != "bearer"
            or not key
            or (self.api_key and key != self.api_key)
        ):
            return self.error(
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
        if failure.mode == "429":
            return self.error(
                429,
                "Rate limit reached for requests. Please try again in 1s.",
                "requests",
                "rate_limit_exceeded",
                **{"Retry-After": "1"},
            )
        if failure.mode in ("error", "500"):
            return self.error(
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
            )
        return None

    async def _speech(self, request: Request) -> Response | PCMStream:
        failure = self.take_failure()
        try:
            body = await request.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        self.last = {
            "body": body,
            "text": body.get("input"),
            "model": body.get("model"),
            "voice": body.get("voice"),
            "response_format": body.get("response_format"),
            "instructions": body.get("instructions"),
            "headers": dict(request.headers),
        }
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        for field in ("model", "input", "voice"):
            if not body.get(field):
                return self.error(
                    400, f"Missing required parameter: '{field}'.", "invalid_request_error"
                )
        if body.get("response_format") != "pcm":
            return self.error(
                400,
                "The loopback serves only response_format 'pcm'.",
                "invalid_request_error",
                "unsupported_format",
            )
        return self.speak(
            body["input"], SAMPLE_RATE, failure, headers={"x-request-id": f"req_{self.requests}"}
        )

    def _model_json(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}

    async def _models(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        return JSONResponse({"object": "list", "data": [self._model_json(m) for m in MODELS]})

    async def _model(self, request: Request) -> Response:
        failure = self.take_failure()
        if failure.mode == "hang":
            await hang()
        if (refused := self._refusal(request, failure)) is not None:
            return refused
        model = request.path_params["model"]
        if model not in MODELS:
            return self.error(
                404,
                f"The model '{model}' does not exist",
                "invalid_request_error",
                "model_not_found",
            )
        return JSONResponse(self._model_json(model))
