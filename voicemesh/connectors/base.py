"""Connector interfaces per stage. A connector turns one unit of work into a result stream; it
holds no session state, so one instance (and one loaded model) serves every session of a process.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

from voicemesh.config.connectors import ConnectorOptions
from voicemesh.config.stages import Stage

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}


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

    @abstractmethod
    def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        """Reply text in pieces as they are produced."""


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
