"""OpenAI chat completions on the wire: POST /v1/chat/completions (streamed as SSE
`chat.completion.chunk` events ending with `data: [DONE]`, or one `chat.completion` object) and
GET /v1/models, answering from a scripted list of replies.

A request whose last message is an assistant message that starts one of the replies is continued
after that prefix, as OpenAI-compatible servers (llama.cpp, Ollama, Groq) continue a trailing
assistant message: that is what a fallback connector gets after a stream died mid-reply.

Failure injection (`server.fail(mode, after=N, times=K)`), per request, models included:
"error"/"500" → 500 server_error; "429" → 429 rate_limit_exceeded with Retry-After;
"401" → 401 invalid_api_key; "hang" → no answer until the client goes away; "die" → `after`
content chunks, then (`die_how`) "cut": the connection closes mid-body, "clean": the body ends
without finish_reason or [DONE], "error_event": a `data: {"error": ...}` event.
With `api_key` set, any other bearer token is a 401.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from voicemesh.testing.loopback.base import Failure, LoopbackServer, StreamCut, wait_for_disconnect
from voicemesh.testing.loopback.chat import (
    DieHow,
    content_text,
    continue_prefill,
    credential,
    split_pieces,
    sse,
)


class OpenAIChatServer(LoopbackServer):
    name = "openai"

    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        model: str = "loopback-gpt",
        chunk_words: int = 1,
        space_after: bool = False,
        chunk_delay_s: float = 0.0,
        retry_after_s: int = 2,
        die_how: DieHow = "cut",
        api_key: str | None = None,
    ) -> None:
        self.replies = list(replies or ["Hello from the OpenAI loopback server."])
        self.model = model
        self.chunk_words = chunk_words
        self.space_after = space_after
        self.chunk_delay_s = chunk_delay_s
        self.retry_after_s = retry_after_s
        self.die_how: DieHow = die_how
        self.served = 0
        self.last_request: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        #: When set, requests without this key are refused with the provider's 401.
        self.api_key = api_key
        super().__init__()

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
            ]
        )

    # --- replies -----------------------------------------------------------------------------

    def answer(self, messages: list[dict[str, Any]]) -> str:
        """The text to send: the next scripted reply, or the rest of one the request prefills."""
        reply = self.replies[self.served % len(self.replies)]
        self.served += 1
        return continue_prefill(reply, self.replies, messages)

    # --- failures ----------------------------------------------------------------------------

    def error_response(self, failure: Failure) -> Response | None:
        if failure.mode in ("error", "500"):
            return self.error(
                500, "The server had an error while processing your request.", "server_error"
            )
        if failure.mode == "429":
            return self.error(
                429,
                "Rate limit reached for requests. Please try again in 2s.",
                "requests",
                code="rate_limit_exceeded",
                headers={"retry-after": str(self.retry_after_s)},
            )
        if failure.mode == "401":
            return self.error(
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                code="invalid_api_key",
            )
        return None

    @staticmethod
    def error(
        status: int,
        message: str,
        type_: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    # --- endpoints ---------------------------------------------------------------------------

    def take(self, request: Request) -> Failure:
        """The failure for this request (a wrong key is a 401); records its headers."""
        failure = self.take_failure()
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        if self.api_key is not None and credential(request) != self.api_key:
            return Failure("401")
        return failure

    async def models(self, request: Request) -> Response:
        failure = self.take(request)
        if failure.mode == "hang":
            await wait_for_disconnect(request)
            return Response(status_code=499)
        if (err := self.error_response(failure)) is not None:
            return err
        return JSONResponse(
            {"object": "list", "data": [self._model_obj()]},
        )

    async def model_info(self, request: Request) -> Response:
        failure = self.take(request)
        if failure.mode == "hang":
            await wait_for_disconnect(request)
            return Response(status_code=499)
        if (err := self.error_response(failure)) is not None:
            return err
        return JSONResponse({**self._model_obj(), "id": request.path_params["model"]})

    def _model_obj(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 1700000000, "owned_by": "loopback"}

    async def chat(self, request: Request) -> Response:
        failure = self.take(request)
        body = orjson.loads(await request.body())
        self.last_request = body
        if failure.mode == "hang":
            await wait_for_disconnect(request)
            return Response(status_code=499)
        if (err := self.error_response(failure)) is not None:
            return err
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not body.get("model"):
            return self.error(400, "'model' and 'messages' are required", "invalid_request_error")
        text = self.answer(messages)
        model = str(body["model"])
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(messages, text),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = split_pieces(text, self.chunk_words, space_after=self.space_after)
        die_after = failure.after if failure.mode == "die" else None
        return StreamingResponse(
            self._chunks(cid, created, model, pieces, die_after, include_usage, messages, text),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _chunks(
        self,
        cid: str,
        created: int,
        model: str,
        pieces: list[str],
        die_after: int | None,
        include_usage: bool,
        messages: list[dict[str, Any]],
        text: str,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    ],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        for i, piece in enumerate(pieces):
            if die_after is not None and i >= die_after:
                break
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            yield chunk({"content": piece})
        else:
            die_after = None
        if die_after is not None:
            if self.die_how == "cut":
                raise StreamCut(f"loopback cut the stream after {die_after} chunks")
            if self.die_how == "error_event":
                yield sse(
                    {
                        "error": {
                            "message": "The server had an error while processing your request.",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
            return  # "clean": the body ends with no finish_reason and no [DONE]
        yield chunk({}, "stop")
        if include_usage:
            yield sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(messages, text),
                }
            )
        yield sse(b"[DONE]")


def _usage(messages: list[dict[str, Any]], text: str) -> dict[str, int]:
    prompt = sum(
        len(content_text(m.get("content")).split()) for m in messages if isinstance(m, dict)
    )
    completion = len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
