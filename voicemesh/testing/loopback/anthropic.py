"""Anthropic's Messages API on the wire: POST /v1/messages, streamed with the real event sequence
(message_start, content_block_start, ping, content_block_delta/text_delta..., content_block_stop,
message_delta, message_stop) or answered as one `message` object, from scripted replies.

A trailing assistant message is a prefill: when it starts one of the replies, the answer continues
after it, as Claude does (the prefill itself is not repeated).

Failure injection (`server.fail(mode, after=N, times=K)`), per request: "500" → 500 api_error;
"error" → 529 overloaded_error; "429" → 429 rate_limit_error with Retry-After; "401" → 401
authentication_error; "hang" → no answer until the client goes away; "die" → `after` text deltas,
then (`die_how`) "cut": the connection closes mid-body, "clean": the body ends without
message_stop, "error_event": an `event: error` (overloaded_error), as Anthropic sends mid-stream.

With `api_key` set, any other key is a 401. The key is read from x-api-key or from
`Authorization: Bearer` (which is where anthropic SDK 2.x puts an api_key).
"""

from __future__ import annotations

import asyncio
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


class AnthropicServer(LoopbackServer):
    name = "anthropic"

    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        chunk_words: int = 1,
        space_after: bool = False,
        chunk_delay_s: float = 0.0,
        retry_after_s: int = 2,
        die_how: DieHow = "cut",
        api_key: str | None = None,
    ) -> None:
        self.replies = list(replies or ["Hello from the Anthropic loopback server."])
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
        return Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    def answer(self, messages: list[dict[str, Any]]) -> str:
        reply = self.replies[self.served % len(self.replies)]
        self.served += 1
        return continue_prefill(reply, self.replies, messages)

    @staticmethod
    def error(status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        body = {
            "type": "error",
            "error": {"type": type_, "message": message},
            "request_id": f"req_{uuid.uuid4().hex[:24]}",
        }
        return JSONResponse(body, status_code=status, headers=headers)

    def error_response(self, failure: Failure) -> Response | None:
        if failure.mode == "500":
            return self.error(500, "api_error", "Internal server error")
        if failure.mode == "error":
            return self.error(529, "overloaded_error", "Overloaded")
        if failure.mode == "429":
            return self.error(
                429,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization.",
                headers={"retry-after": str(self.retry_after_s)},
            )
        if failure.mode == "401":
            return self.error(401, "authentication_error", "invalid x-api-key")
        return None

    async def messages(self, request: Request) -> Response:
        failure = self.take_failure()
        body = orjson.loads(await request.body())
        self.last_request = body
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        if self.api_key is not None and credential(request) != self.api_key:
            failure = Failure("401")
        if failure.mode == "hang":
            await wait_for_disconnect(request)
            return Response(status_code=499)
        if (err := self.error_response(failure)) is not None:
            return err
        messages = body.get("messages")
        if not isinstance(messages, list) or not body.get("model") or not body.get("max_tokens"):
            return self.error(400, "invalid_request_error", "model, messages, max_tokens required")
        if any(m.get("role") == "system" for m in messages if isinstance(m, dict)):
            return self.error(
                400,
                "invalid_request_error",
                'messages: Unexpected role "system". Use the top-level `system` parameter.',
            )
        last = messages[-1] if messages else {}
        if last.get("role") == "assistant" and content_text(last.get("content")).endswith(
            (" ", "\n", "\t")
        ):
            return self.error(
                400,
                "invalid_request_error",
                "messages: final assistant content cannot end with trailing whitespace",
            )
        text = self.answer(messages)
        model = str(body["model"])
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        input_tokens = sum(len(content_text(m.get("content")).split()) for m in messages)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": len(text.split())},
                }
            )
        pieces = split_pieces(text, self.chunk_words, space_after=self.space_after)
        die_after = failure.after if failure.mode == "die" else None
        return StreamingResponse(
            self._events(mid, model, pieces, die_after, input_tokens),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _events(
        self, mid: str, model: str, pieces: list[str], die_after: int | None, input_tokens: int
    ) -> AsyncIterator[bytes]:
        yield sse(
            {
                "type": "message_start",
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
            "message_start",
        )
        yield sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        yield sse({"type": "ping"}, "ping")
        for i, piece in enumerate(pieces):
            if die_after is not None and i >= die_after:
                break
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            yield sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
                "content_block_delta",
            )
        else:
            die_after = None
        if die_after is not None:
            if self.die_how == "cut":
                raise StreamCut(f"loopback cut the stream after {die_after} deltas")
            if self.die_how == "error_event":
                yield sse(
                    {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                    "error",
                )
            return  # "clean": the body ends with no message_stop
        yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len("".join(pieces).split())},
            },
            "message_delta",
        )
        yield sse({"type": "message_stop"}, "message_stop")
