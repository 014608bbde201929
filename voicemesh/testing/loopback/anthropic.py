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

import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voicemesh.testing.loopback.base import Failure
from voicemesh.testing.loopback.chat import ChatServer, content_text, sse


class AnthropicServer(ChatServer):
    name = "anthropic"
    default_reply = "Hello from the Anthropic loopback server."

    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        tool_rounds: list[list[dict[str, Any]]] | None = None,
        **kw: Any,
    ) -> None:
        """`tool_rounds`: with tools in the request, each turn first makes these rounds of calls
        ({"name", "arguments": JSON text, "say"?}), streamed as `tool_use` blocks whose input
        comes as `input_json_delta` pieces, stop_reason "tool_use"; "{result}" in a reply is
        replaced by the `tool_result` blocks of the last user turn."""
        self.tool_rounds = tool_rounds or []
        super().__init__(replies, **kw)

    def build(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    def tool_round(self, body: dict[str, Any]) -> list[dict[str, Any]] | None:
        if not body.get("tools") or (body.get("tool_choice") or {}).get("type") == "none":
            return None
        messages = body.get("messages") or []

        def asked(m: dict[str, Any]) -> bool:
            content = m.get("content")
            return isinstance(content, list) and any(b.get("type") == "tool_use" for b in content)

        def spoke(m: dict[str, Any]) -> bool:  # a user turn that is not only tool results
            content = m.get("content")
            return m.get("role") == "user" and (
                isinstance(content, str)
                or any(b.get("type") != "tool_result" for b in content or [])
            )

        last_user = max((i for i, m in enumerate(messages) if spoke(m)), default=-1)
        done = sum(1 for m in messages[last_user + 1 :] if asked(m))
        return self.tool_rounds[done] if done < len(self.tool_rounds) else None

    def answer(self, messages: list[dict[str, Any]]) -> str:
        text = super().answer(messages)
        last = messages[-1] if messages else {}
        content = last.get("content") if isinstance(last, dict) else None
        results = []
        if isinstance(content, list):
            results = [str(b.get("content")) for b in content if b.get("type") == "tool_result"]
        return text.replace("{result}", " ".join(results))

    def tool_events(self, calls: list[dict[str, Any]], start: dict[str, Any]) -> list[bytes]:
        """A message of text (the calls' `say`) then one tool_use block per call."""
        events = [
            sse({"type": "message_start", "message": start}, "message_start"),
            sse({"type": "ping"}, "ping"),
        ]
        index = 0
        say = " ".join(str(c["say"]) for c in calls if c.get("say"))
        if say:
            text = {"type": "text", "text": ""}
            events.append(
                sse(
                    {"type": "content_block_start", "index": 0, "content_block": text},
                    "content_block_start",
                )
            )
            for piece in self.pieces(say):
                delta = {"type": "text_delta", "text": piece}
                events.append(
                    sse(
                        {"type": "content_block_delta", "index": 0, "delta": delta},
                        "content_block_delta",
                    )
                )
            events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
            index = 1
        for c in calls:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": f"toolu_{uuid.uuid4().hex[:20]}",
                "name": c["name"],
                "input": {},
            }
            events.append(
                sse(
                    {"type": "content_block_start", "index": index, "content_block": block},
                    "content_block_start",
                )
            )
            args = str(c.get("arguments", "{}"))
            step = max(1, len(args) // 3)
            for at in range(0, len(args), step):
                delta = {"type": "input_json_delta", "partial_json": args[at : at + step]}
                events.append(
                    sse(
                        {"type": "content_block_delta", "index": index, "delta": delta},
                        "content_block_delta",
                    )
                )
            events.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
            index += 1
        stop = {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 10},
        }
        events += [sse(stop, "message_delta"), sse({"type": "message_stop"}, "message_stop")]
        return events

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
        failure, body = await self.receive(request)
        if (refused := await self.refusal(request, failure)) is not None:
            return refused
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
        calls = self.tool_round(body) if body.get("stream") else None
        text = self.answer(messages) if calls is None else ""
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
        pieces = self.pieces(text)
        start: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        if calls is not None:
            events = self.tool_events(calls, start)

            async def replay() -> Any:
                for event in events:
                    yield event

            return self.event_stream(replay())
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }

        def delta(piece: str) -> bytes:
            return sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
                "content_block_delta",
            )

        def tail() -> list[bytes]:
            stop = {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len("".join(pieces).split())},
            }
            return [
                sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                sse(stop, "message_delta"),
                sse({"type": "message_stop"}, "message_stop"),
            ]

        # Anthropic's mid-stream error; a "clean" death ends with no message_stop
        overloaded = {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
        return self.event_stream(
            self.stream(
                pieces,
                failure,
                head=[
                    sse({"type": "message_start", "message": start}, "message_start"),
                    sse(block, "content_block_start"),
                    sse({"type": "ping"}, "ping"),
                ],
                delta=delta,
                tail=tail,
                error_event=sse(overloaded, "error"),
                unit="deltas",
            )
        )
