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

import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voicemesh.testing.loopback.base import Failure
from voicemesh.testing.loopback.chat import ChatServer, content_text, sse

SERVER_ERROR = "The server had an error while processing your request."


class OpenAIChatServer(ChatServer):
    name = "openai"
    default_reply = "Hello from the OpenAI loopback server."

    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        model: str = "loopback-gpt",
        tool_rounds: list[list[dict[str, Any]]] | None = None,
        **kw: Any,
    ) -> None:
        """`kw`: ChatServer's (chunk_words, space_after, chunk_delay_s, retry_after_s, die_how,
        api_key). `tool_rounds`: with tools in the request, each turn first makes these rounds
        of calls ({"name", "arguments": JSON text, "say"?: text before the calls}), streamed as
        OpenAI streams `tool_calls` deltas; "{result}" in a reply is replaced by the last
        round's tool results."""
        self.model = model
        self.tool_rounds = tool_rounds or []
        super().__init__(replies, **kw)

    def tool_round(self, body: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The calls to make for this request, or None to answer in words."""
        if not body.get("tools") or body.get("tool_choice") == "none":
            return None
        messages = body.get("messages") or []
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        done = sum(1 for m in messages[last_user + 1 :] if m.get("tool_calls"))
        return self.tool_rounds[done] if done < len(self.tool_rounds) else None

    def answer(self, messages: list[dict[str, Any]]) -> str:
        text = super().answer(messages)
        results: list[str] = []
        for m in reversed(messages):
            if m.get("role") != "tool":
                break
            results.insert(0, content_text(m.get("content")))
        return text.replace("{result}", " ".join(results))

    def build(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
            ]
        )

    # --- failures ----------------------------------------------------------------------------

    def error_response(self, failure: Failure) -> Response | None:
        if failure.mode in ("error", "500"):
            return self.error(500, SERVER_ERROR, "server_error")
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

    async def models(self, request: Request) -> Response:
        if (refused := await self.refusal(request, self.take(request))) is not None:
            return refused
        return JSONResponse({"object": "list", "data": [self._model_obj()]})

    async def model_info(self, request: Request) -> Response:
        if (refused := await self.refusal(request, self.take(request))) is not None:
            return refused
        return JSONResponse({**self._model_obj(), "id": request.path_params["model"]})

    def _model_obj(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 1700000000, "owned_by": "loopback"}

    async def chat(self, request: Request) -> Response:
        failure, body = await self.receive(request)
        if (refused := await self.refusal(request, failure)) is not None:
            return refused
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not body.get("model"):
            return self.error(400, "'model' and 'messages' are required", "invalid_request_error")
        calls = self.tool_round(body) if body.get("stream") else None
        text = self.answer(messages) if calls is None else ""
        if calls is not None:
            text = " ".join(str(c["say"]) for c in calls if c.get("say"))
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

        def tail() -> list[bytes]:
            if calls is not None:
                return [*tool_chunks(), chunk({}, "tool_calls"), sse(b"[DONE]")]
            usage = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(messages, text),
            }
            return [chunk({}, "stop"), *([sse(usage)] if include_usage else []), sse(b"[DONE]")]

        def tool_chunks() -> list[bytes]:
            """One call after another, by index: id, type and name first, then the arguments
            in a few pieces (as OpenAI streams them)."""
            out = []
            for i, c in enumerate(calls or []):
                cid = f"call_{uuid.uuid4().hex[:12]}"
                head = {"index": i, "id": cid, "type": "function"}
                fn = {"name": c["name"], "arguments": ""}
                out.append(chunk({"tool_calls": [{**head, "function": fn}]}))
                args = str(c.get("arguments", "{}"))
                step = max(1, len(args) // 3)
                for at in range(0, len(args), step):
                    piece = {"index": i, "function": {"arguments": args[at : at + step]}}
                    out.append(chunk({"tool_calls": [piece]}))
            return out

        error = {"message": SERVER_ERROR, "type": "server_error", "param": None, "code": None}
        return self.event_stream(
            self.stream(
                self.pieces(text),
                failure,
                head=[chunk({"role": "assistant", "content": ""})],
                delta=lambda piece: chunk({"content": piece}),
                tail=tail,
                # ends with no finish_reason and no [DONE] on a "clean" death
                error_event=sse({"error": error}),
                unit="chunks",
            )
        )


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
