"""Connector interfaces per stage. A connector turns one unit of work into a result stream; it
holds no session state, so one instance (and one loaded model) serves every session of a process.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from voicemesh.config.connectors import ConnectorOptions
from voicemesh.config.stages import Stage

if TYPE_CHECKING:
    from voicemesh.config.tools import ToolSpec

# {"role": "system" | "user" | "assistant", "content": str}; with tools also an assistant message
# with "tool_calls": [{"id", "name", "arguments": JSON text}] and {"role": "tool",
# "tool_call_id", "name", "content": str} (each connector reshapes these for its provider)
Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the LLM asked for. `arguments` is the JSON text as the model wrote it:
    the stage parses and checks it, so a malformed one becomes an error result, not a crash."""

    id: str
    name: str
    arguments: str


class Connector(ABC):
    stage: ClassVar[str]
    name: ClassVar[str]
    #: The native engine a local connector runs in this process (None for a remote provider):
    #: it is proven on real input at startup (voicemesh.connectors.proof).
    engine: ClassVar[str | None] = None

    def __init__(self, options: ConnectorOptions):
        self.options = options

    async def warmup(self) -> None:
        """Load models or open clients ahead of the first unit of work (off the event loop)."""

    async def aclose(self) -> None:
        pass

    #: Whether `probe` is implemented; without it a failed connector is retried when its down
    #: mark lapses.
    can_probe: ClassVar[bool] = False

    async def probe(self) -> None:
        """A cheap real request that raises if the provider is still failing."""
        raise NotImplementedError


#: The key sent when a config gives none: a local OpenAI-compatible server may want no key, but
#: the SDKs insist on one. Never the process's own OPENAI_API_KEY.
NO_KEY = "no-key"


class SDKClient:
    """For connectors on a provider SDK (mixed in before the stage's connector class): one async
    client per connector instance, built on first use or at warmup, closed with the connector."""

    _client: Any = None

    def make_client(self) -> Any:
        raise NotImplementedError

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.make_client()
        return self._client

    async def warmup(self) -> None:
        # Imports the SDK and builds its HTTP client (no request), off the event loop: a cold
        # `import openai` alone blocks ~0.8 s, a stall for every other call on this instance
        # and long enough for its claims on units of work to lapse.
        if self._client is None:
            self._client = await asyncio.to_thread(self.make_client)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class STTStream(ABC):
    """One utterance streamed to a provider while it is spoken."""

    @abstractmethod
    async def send(self, pcm: bytes) -> None:
        """Audio as it arrives (PCM16 mono at the rate the stream was opened with)."""

    @abstractmethod
    async def finish(self) -> str:
        """End of the utterance: the final transcript of everything sent."""

    async def aclose(self) -> None:
        """Abandon the stream (a newer turn, a failure); must not raise."""


class STTConnector(Connector):
    stage = Stage.STT
    #: Providers that transcribe while the user speaks (Deepgram) implement `open_stream`.
    streaming: ClassVar[bool] = False

    @abstractmethod
    async def transcribe(self, pcm: bytes, sample_rate: int) -> str:
        """Text of one whole utterance of PCM16 mono audio (also the replay path on fallback)."""

    async def open_stream(
        self, sample_rate: int, on_interim: Callable[[str], Awaitable[None]] | None = None
    ) -> STTStream:
        raise NotImplementedError


class LLMConnector(Connector):
    stage = Stage.LLM

    #: whether `stream_tools` offers the tools to the model (else it just talks)
    tools: ClassVar[bool] = False

    @abstractmethod
    def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        """Reply text in pieces as they are produced."""

    def stream_tools(
        self, messages: list[Message], tools: Sequence[ToolSpec], *, choose: bool = True
    ) -> AsyncIterator[str | ToolCall]:
        """Reply text in pieces, then the tool calls of this round (each whole, in order) once
        the model has finished. `choose` False: the model must answer in words (the turn's
        last round). A connector that cannot call tools talks: the tool exchange already in
        `messages` is given to it as text."""
        return self.stream(without_tools(messages))


class TTSConnector(Connector):
    stage = Stage.TTS

    @property
    @abstractmethod
    def sample_rate(self) -> int:
        """Native rate of the PCM16 mono audio that `synthesize` yields."""

    @abstractmethod
    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """PCM16 mono audio of one sentence, in chunks as they are produced."""


def last_user_text(messages: list[Message]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def without_tools(messages: list[Message]) -> list[Message]:
    """`messages` for a model that knows nothing of tools: each result becomes a line of user
    text, so a connector that took over mid-turn (a fallback) still has the answer."""
    out: list[Message] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            out.append({"role": "user", "content": f"[{m.get('name')} returned: {m['content']}]"})
        elif role == "assistant" and "tool_calls" in m:
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
        else:
            out.append(m)
    return out
