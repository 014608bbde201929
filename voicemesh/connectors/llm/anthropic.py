"""Claude through the streaming Messages API on the official anthropic SDK.

The system prompt goes in `system`; the conversation is reshaped to what the API accepts (user and
assistant turns, no empty ones, starting with the user). A trailing assistant message is a prefill:
Claude continues it, so after a fallback mid-reply only the rest of the reply comes back. The API
rejects a prefill that ends in whitespace, so that whitespace is cut from the prefill and dropped
from the start of the continuation (the text already delivered holds it).

SDK retries are off (the fallback chain retries elsewhere); failures leave as ConnectorErrors,
including the `error` events Anthropic sends inside a 200 stream (overloaded_error mid-reply),
which the SDK raises with the stream's status 200.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import anthropic
import orjson

from voicemesh.config.connectors import AnthropicOptions
from voicemesh.connectors.base import LLMConnector, Message, SDKClient, ToolCall
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

#: Per-operation SDK timeout (connect, each read); the chain's attempt timeout is the real limit.
SDK_TIMEOUT_S = 60.0

#: Status of each error type Anthropic can send inside a stream (whose HTTP status is 200).
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


if TYPE_CHECKING:
    from voicemesh.config.tools import ToolSpec


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = orjson.loads(call["arguments"] or "{}")
    except orjson.JSONDecodeError:
        arguments = {}  # a malformed call was answered with an error result already
    if not isinstance(arguments, dict):
        arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": call["name"], "input": arguments}


def to_anthropic(messages: list[Message]) -> tuple[str, list[dict[str, Any]], bool]:
    """(system, messages, whether trailing whitespace was cut from the prefill). Tool calls
    become `tool_use` blocks of the assistant turn, results `tool_result` blocks of the user
    turn after it; a turn of plain text stays a string."""
    system = "\n\n".join(
        str(m.get("content") or "").strip() for m in messages if m.get("role") == "system"
    ).strip()
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "system":
            continue
        content: str | list[dict[str, Any]]
        if m.get("role") == "tool":
            role = "user"
            content = [
                {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
            ]
        elif "tool_calls" in m:
            role = "assistant"
            said = str(m.get("content") or "")
            content = _blocks(said) if said.strip() else []
            content += [_tool_use(c) for c in m["tool_calls"]]
        else:
            role = "assistant" if m.get("role") == "assistant" else "user"
            content = str(m.get("content") or "")
            if not content.strip():
                continue  # the API rejects empty text blocks
        if turns and turns[-1]["role"] == role:
            last = turns[-1]["content"]
            if isinstance(last, str) and isinstance(content, str):
                turns[-1]["content"] = last + "\n\n" + content
            else:
                turns[-1]["content"] = _blocks(last) + _blocks(content)
        else:
            turns.append({"role": role, "content": content})
    # A history cut to its last N messages may open with the assistant: the API wants the user.
    while len(turns) > 1 and turns[0]["role"] == "assistant":
        turns.pop(0)
    # ...and a tool_result whose tool_use was cut off with it would be refused
    if turns and isinstance(turns[0]["content"], list):
        kept = [b for b in turns[0]["content"] if b.get("type") != "tool_result"]
        if kept:
            turns[0]["content"] = kept
        elif len(turns) > 1:
            turns.pop(0)
    cut = False
    if turns and turns[-1]["role"] == "assistant" and isinstance(turns[-1]["content"], str):
        prefill = turns[-1]["content"].rstrip()
        cut = prefill != turns[-1]["content"]
        turns[-1]["content"] = prefill
    return system, turns, cut


class AnthropicLLM(SDKClient, LLMConnector):
    name = "anthropic"
    options: AnthropicOptions
    can_probe = True

    def make_client(self) -> anthropic.AsyncAnthropic:
        guard = EgressGuard("anthropic")  # no redirects (x-api-key survives them), no other host
        client = anthropic.AsyncAnthropic(
            api_key=self.options.api_key,
            base_url=self.options.base_url,
            max_retries=0,
            timeout=SDK_TIMEOUT_S,
            http_client=sdk_http_client(anthropic, guard),
        )
        guard.pin(client.base_url)
        return client

    tools = True

    def _request(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        tools: Sequence[ToolSpec] | None = None,
        choose: bool = True,
    ) -> tuple[dict[str, Any], bool]:
        """The SDK call's arguments, and whether the prefill lost trailing whitespace."""
        system, turns, cut = to_anthropic(messages)
        kwargs: dict[str, Any] = {
            "model": self.options.model,
            "max_tokens": max_tokens or self.options.max_tokens,
            "messages": turns,
        }
        if system:
            kwargs["system"] = system
        if self.options.temperature is not None:
            kwargs["temperature"] = self.options.temperature
        if tools:
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in tools
            ]
            kwargs["tool_choice"] = {"type": "auto" if choose else "none"}
        return kwargs, cut

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        async for piece in self._run(*self._request(messages)):
            if isinstance(piece, str):
                yield piece

    def stream_tools(
        self, messages: list[Message], tools: Sequence[ToolSpec], *, choose: bool = True
    ) -> AsyncIterator[str | ToolCall]:
        return self._run(*self._request(messages, tools=tools, choose=choose))

    async def _run(
        self, request: dict[str, Any], skip_space: bool
    ) -> AsyncIterator[str | ToolCall]:
        """Text as it streams; each `tool_use` block (its input streamed as partial JSON) as a
        call once the message has stopped."""
        calls: dict[int, list[str]] = {}  # block index -> [id, name, input JSON]
        try:
            response = await self.client.messages.create(**request, stream=True)
        except Exception as exc:
            raise self.error(exc) from exc
        finished = False
        try:
            async with response:
                async for event in response:
                    if (
                        event.type == "content_block_start"
                        and event.content_block.type == "tool_use"
                    ):
                        block = event.content_block
                        calls[event.index] = [block.id, block.name, ""]
                    elif (
                        event.type == "content_block_delta"
                        and event.delta.type == "input_json_delta"
                        and event.index in calls
                    ):
                        calls[event.index][2] += event.delta.partial_json
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text = event.delta.text
                        if skip_space:
                            text = text.lstrip()
                            skip_space = not text
                        if text:
                            yield text
                    elif event.type == "message_stop":
                        finished = True
        except Exception as exc:
            raise self.error(exc) from exc
        if not finished:
            raise ConnectorError(
                FailureKind.STREAM, "anthropic: the stream ended without message_stop"
            )
        for i in sorted(calls):
            cid, name, arguments = calls[i]
            yield ToolCall(id=cid, name=name, arguments=arguments or "{}")

    async def probe(self) -> None:
        """A one-token message: proves the key, the model and the API answer."""
        try:
            await self.client.messages.create(
                **self._request([{"role": "user", "content": "ping"}], max_tokens=1)[0]
            )
        except Exception as exc:
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> ConnectorError:
        if (wrapped := connector_cause(exc)) is not None:
            return wrapped
        if isinstance(exc, anthropic.APIStatusError):
            kind, message = error_detail(exc.body)
            status = exc.status_code
            if status < 400:  # an error event inside the stream: its type tells what happened
                status = ERROR_TYPE_STATUS.get(kind or "", 500)
            return from_status(
                status,
                self._text(kind, message or exc.message),
                retry_after_s=retry_after_s(exc.response.headers),
            )
        if isinstance(exc, anthropic.APITimeoutError):
            return ConnectorError(FailureKind.TIMEOUT, self._text(None, "request timed out"))
        if isinstance(exc, anthropic.APIConnectionError):
            cause = exc.__cause__ or exc
            return ConnectorError(
                FailureKind.NETWORK, self._text(None, f"{type(cause).__name__}: {cause}")
            )
        return ConnectorError(transport_kind(exc), self._text(None, f"{type(exc).__name__}: {exc}"))

    def _text(self, kind: str | None, message: str) -> str:
        text = f"anthropic: {kind}: {message}" if kind else f"anthropic: {message}"
        key = self.options.api_key
        return text.replace(key, "***") if key else text
