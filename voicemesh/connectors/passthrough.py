"""`passthrough`: a stage whose primary connector is this relays every frame to its next hop
unchanged (StageService.relay), so the whole loop can be measured with no engine in it. The
classes exist so the registry knows the name; the stage never calls them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from voicemesh.connectors.base import LLMConnector, Message, STTConnector, TTSConnector

_WHY = "passthrough relays frames in the stage; it has no engine to call"


class PassthroughSTT(STTConnector):
    name = "passthrough"

    async def transcribe(self, pcm: bytes, sample_rate: int) -> str:
        raise NotImplementedError(_WHY)


class PassthroughLLM(LLMConnector):
    name = "passthrough"

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        raise NotImplementedError(_WHY)
        yield ""  # pragma: no cover


class PassthroughTTS(TTSConnector):
    name = "passthrough"

    @property
    def sample_rate(self) -> int:
        return 16000

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        raise NotImplementedError(_WHY)
        yield b""  # pragma: no cover
