"""Streaming chat completions on the official openai SDK, for OpenAI or any compatible server
(Groq, Ollama, vLLM, llama.cpp's server) through `base_url`.

The SDK's own retries are off: the fallback chain decides what happens after a failure, and a
retry hidden inside one attempt would both mask the failure and outlast the attempt timeout. Every
SDK failure leaves as a classified ConnectorError (429 with its Retry-After, 5xx, 401...).

A trailing assistant message (the partial reply of a connector that died mid-stream) is sent as
is: compatible servers continue it. OpenAI's own API starts a new reply instead, and
`continue_reply` drops the restated prefix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import openai

from voicemesh.config.connectors import OpenAILLMOptions
from voicemesh.connectors.base import NO_KEY, LLMConnector, Message, SDKClient, ToolCall
from voicemesh.connectors.errors import (
    ConnectorError,
    FailureKind,
    connector_cause,
    error_detail,
    from_status,
    retry_after_s,
    transport_kind,
)
from voicemesh.connectors.http import EgressGuard, sdk_http_client

#: Per-operation SDK timeout (connect, each read). The chain's attempt timeout is the real
#: limit on a turn; this only ends requests nobody waits for any more.
SDK_TIMEOUT_S = 60.0
if TYPE_CHECKING:
    from voicemesh.config.tools import ToolSpec


def to_openai(m: Message) -> dict[str, Any]:
    """One message in the chat completions shape (tool calls as functions)."""
    if m.get("role") == "tool":
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]}
    if "tool_calls" in m:
        return {
            "role": "assistant",
            "content": m.get("content") or None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in m["tool_calls"]
            ],
        }
    return {"role": m["role"], "content": m["content"]}


#: Sent as the key to servers that need none (a local llama.cpp or Ollama): the SDK insists on
#: one, and must not fall back to this process's OPENAI_API_KEY for a third-party base_url.


class OpenAILLM(SDKClient, LLMConnector):
    name = "openai"
    options: OpenAILLMOptions
    can_probe = True

    def make_client(self) -> openai.AsyncOpenAI:
        guard = EgressGuard("openai")  # no redirects, no other host
        client = openai.AsyncOpenAI(
            api_key=self.options.api_key or NO_KEY,
            base_url=self.options.base_url,
            organization=self.options.organization,
            max_retries=0,
            timeout=SDK_TIMEOUT_S,
            http_client=sdk_http_client(openai, guard),
        )
        guard.pin(client.base_url)
        return client

    tools = True

    def _request(
        self,
        messages: list[Message],
        tools: Sequence[ToolSpec] | None = None,
        choose: bool = True,
    ) -> dict[str, Any]:
        opts = self.options
        kwargs: dict[str, Any] = {
            "model": opts.model,
            "messages": [to_openai(m) for m in messages],
            "stream": True,
        }
        if tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in tools
            ]
            kwargs["tool_choice"] = "auto" if choose else "none"
        if opts.temperature is not None:
            kwargs["temperature"] = opts.temperature
        if opts.max_tokens is not None:
            kwargs["max_tokens"] = opts.max_tokens
        return kwargs

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        async for piece in self._run(self._request(messages)):
            if isinstance(piece, str):
                yield piece

    def stream_tools(
        self, messages: list[Message], tools: Sequence[ToolSpec], *, choose: bool = True
    ) -> AsyncIterator[str | ToolCall]:
        return self._run(self._request(messages, tools, choose))

    async def _run(self, request: dict[str, Any]) -> AsyncIterator[str | ToolCall]:
        """Text as it streams; the tool calls (their `tool_calls` deltas put together by index:
        id and name come first, the arguments in pieces) once the model has finished."""
        try:
            response = await self.client.chat.completions.create(**request)
        except Exception as exc:
            raise self.error(exc) from exc
        finished = False
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        try:
            async with response:  # closes the HTTP response however the stream ends
                async for chunk in response:
                    for choice in chunk.choices:
                        if choice.index != 0:
                            continue
                        if choice.finish_reason:
                            finished = True
                        delta = choice.delta
                        if delta is None:
                            continue
                        if delta.content:
                            yield delta.content
                        for part in delta.tool_calls or ():
                            call = calls.setdefault(part.index, ["", "", ""])
                            if part.id:
                                call[0] = part.id
                            if part.function is not None:
                                call[1] += part.function.name or ""
                                call[2] += part.function.arguments or ""
        except Exception as exc:
            raise self.error(exc) from exc
        if not finished:
            # A body that ends cleanly but early (a proxy gave up) would pass for a whole reply.
            raise ConnectorError(FailureKind.STREAM, "openai: the stream ended without finishing")
        for i in sorted(calls):
            cid, name, arguments = calls[i]
            yield ToolCall(id=cid or f"call_{i}", name=name, arguments=arguments)

    async def probe(self) -> None:
        """The same streamed request as a turn, closed at its first chunk: it proves the model
        answers (a models listing can succeed while completions fail)."""
        request = self._request([{"role": "user", "content": "ping"}])
        try:
            response = await self.client.chat.completions.create(**request)
            async with response:
                async for _ in response:
                    return
        except Exception as exc:
            raise self.error(exc) from exc
        raise ConnectorError(FailureKind.STREAM, "openai: the probe stream was empty")

    def error(self, exc: BaseException) -> ConnectorError:
        """A classified failure whose message names the provider's error but never the key."""
        if (wrapped := connector_cause(exc)) is not None:
            return wrapped
        if isinstance(exc, openai.APIStatusError):
            kind, message = error_detail(exc.body, ("code", "type"))
            err = from_status(
                exc.status_code,
                self._text(kind, message or exc.message),
                retry_after_s=retry_after_s(exc.response.headers),
            )
        elif isinstance(exc, openai.APITimeoutError):
            err = ConnectorError(FailureKind.TIMEOUT, self._text(None, "request timed out"))
        elif isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            err = ConnectorError(
                FailureKind.NETWORK, self._text(None, f"{type(cause).__name__}: {cause}")
            )
        elif isinstance(exc, openai.APIError):  # an error event inside a 200 stream
            kind, message = error_detail(exc.body, ("code", "type"))
            err = ConnectorError(
                FailureKind.RATE_LIMIT if kind and "rate_limit" in kind else FailureKind.SERVER,
                self._text(kind, message or exc.message),
            )
        else:
            err = ConnectorError(
                transport_kind(exc), self._text(None, f"{type(exc).__name__}: {exc}")
            )
        return err

    def _text(self, kind: str | None, message: str) -> str:
        text = f"openai: {kind}: {message}" if kind else f"openai: {message}"
        key = self.options.api_key
        return text.replace(key, "***") if key and key != NO_KEY else text
