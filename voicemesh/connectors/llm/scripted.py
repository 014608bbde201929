"""Deterministic LLMs: `scripted` answers from a list, `echo` repeats the user. They let tests and
benchmarks check routing, ordering and live swaps without depending on a model's wording."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import orjson

from voicemesh.config.connectors import EchoOptions, ScriptedOptions
from voicemesh.connectors.base import LLMConnector, Message, ToolCall, last_user_text

if TYPE_CHECKING:
    from voicemesh.config.tools import ToolSpec


async def _words(text: str, per_chunk: int) -> AsyncIterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), per_chunk):
        yield (" " if i else "") + " ".join(words[i : i + per_chunk])
        await asyncio.sleep(0)


class ScriptedLLM(LLMConnector):
    name = "scripted"
    options: ScriptedOptions
    tools = True

    def _reply(self, messages: list[Message]) -> str:
        turn = sum(1 for m in messages if m.get("role") == "assistant" and "tool_calls" not in m)
        reply = self.options.replies[turn % len(self.options.replies)]
        return reply.replace("{user}", last_user_text(messages).strip().rstrip(".?!"))

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        async for piece in _words(self._reply(messages), self.options.chunk_words):
            yield piece

    async def stream_tools(
        self, messages: list[Message], tools: Sequence[ToolSpec], *, choose: bool = True
    ) -> AsyncIterator[str | ToolCall]:
        """The turn's next round of `tool_rounds` (counted after the last user message), made
        whether or not tools are offered (a test of the round limit needs one that insists);
        after the last round, the reply."""
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        after = messages[last_user + 1 :]
        done = sum(1 for m in after if m.get("role") == "assistant" and "tool_calls" in m)
        if done < len(self.options.tool_rounds):
            step = self.options.tool_rounds[done]
            if step.say:
                async for piece in _words(step.say, self.options.chunk_words):
                    yield piece
            for i, call in enumerate(step.calls):
                args = call.arguments
                text = args if isinstance(args, str) else orjson.dumps(args).decode()
                yield ToolCall(id=f"call_{done}_{i}", name=call.name, arguments=text)
            return
        results = [str(m.get("content", "")) for m in after if m.get("role") == "tool"]
        # the results of the last round only: those the reply is about
        if done:
            last_round = max(i for i, m in enumerate(after) if "tool_calls" in m)
            results = [
                str(m.get("content", "")) for m in after[last_round:] if m.get("role") == "tool"
            ]
        reply = self._reply(messages).replace("{result}", " ".join(results))
        async for piece in _words(reply, self.options.chunk_words):
            yield piece


class EchoLLM(LLMConnector):
    name = "echo"
    options: EchoOptions

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        said = last_user_text(messages).strip().rstrip(".?!")
        async for piece in _words(f"{self.options.prefix} {said}.".strip(), 1):
            yield piece
