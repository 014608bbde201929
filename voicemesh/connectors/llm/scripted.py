"""Deterministic LLMs: `scripted` answers from a list, `echo` repeats the user. They let tests and
benchmarks check routing, ordering and live swaps without depending on a model's wording."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from voicemesh.config.connectors import EchoOptions, ScriptedOptions
from voicemesh.connectors.base import LLMConnector, Message, last_user_text


async def _words(text: str, per_chunk: int) -> AsyncIterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), per_chunk):
        yield (" " if i else "") + " ".join(words[i : i + per_chunk])
        await asyncio.sleep(0)


class ScriptedLLM(LLMConnector):
    name = "scripted"
    options: ScriptedOptions

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        turn = sum(1 for m in messages if m.get("role") == "assistant")
        reply = self.options.replies[turn % len(self.options.replies)]
        reply = reply.replace("{user}", last_user_text(messages).strip().rstrip(".?!"))
        async for piece in _words(reply, self.options.chunk_words):
            yield piece


class EchoLLM(LLMConnector):
    name = "echo"
    options: EchoOptions

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        said = last_user_text(messages).strip().rstrip(".?!")
        async for piece in _words(f"{self.options.prefix} {said}.".strip(), 1):
            yield piece
