"""A turn never waits forever for a stage that is not there (voicemesh/transport/call/supervisor.py
and the call's hand-over): when no instance of the next stage takes the turn's work within
`stage_wait_ms`, the caller gets an `error` event naming the stage, the log says so once, and the
next turn starts clean. Over a real WebSocket and a real WebRTC peer, on the real servers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.support import Services, loopback_agent, serving
from voicemesh.callers.script import CallResult, TurnResult
from voicemesh.callers.webrtc import AUDIBLE_DBFS, call_over_webrtc
from voicemesh.callers.websocket import call_over_websocket
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.connectors.registry import connector_class
from voicemesh.pipeline import LLMService, STTService, TTSService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.api.service import TransportService

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

RATE = 16000
WAIT_MS = 1500
STAGES = {"stt": STTService, "llm": LLMService, "tts": TTSService}


@pytest.fixture(scope="module")
def transcript() -> str:
    return "hello there"


@pytest.fixture(scope="module", autouse=True)
def imported() -> None:
    """The stages here share the test's event loop: import their connectors' SDKs up front, or
    the first import (over a second) stalls the loop and the transport's own clock with it."""
    for stage, name in (("stt", "openai"), ("llm", "scripted"), ("tts", "tone")):
        connector_class(stage, name)


@pytest.fixture
def waiting(settings: Settings) -> Settings:
    return settings.model_copy(update={"stage_wait_ms": WAIT_MS, "lease_ttl_ms": 1000})


def db(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return 20 * np.log10(max(float(np.sqrt(np.mean(x * x))) if x.size else 0.0, 1e-9) / 32768)


def tone_wav(tmp_path: Path, name: str) -> Path:
    t = np.arange(RATE * 700 // 1000) / RATE
    path = tmp_path / f"{name}.wav"
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 400 * t)).astype(np.float32), RATE)
    return path


async def call(transport: str, url: str, wavs: list[Path], **kw: object) -> CallResult:
    if transport == "webrtc":
        return await call_over_webrtc(url, wavs, None, agent="waits", turn_timeout=20, **kw)  # type: ignore[arg-type]
    return await call_over_websocket(url, wavs, None, agent="waits", turn_timeout=20, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
@pytest.mark.parametrize("missing", ["stt", "llm", "tts"])
async def test_a_turn_with_no_instance_of_a_stage_gets_an_error_naming_it_and_the_next_is_answered(
    transport: str,
    missing: str,
    waiting: Settings,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = loopback_agent(agent_json, transport=transport, stt_url=transcriber.base_url)
    await store.create_agent("waits", parse_agent_config(data))
    services = Services(waiting)
    for stage, cls in STAGES.items():
        if stage != missing:
            await services.start(cls)
    service = TransportService(waiting.model_copy(update={"auth": "off", "webrtc_loopback": True}))
    await service.start()

    async def bring_it_up(_: int, turn: TurnResult) -> None:
        # The error can come while the call still hands the utterance over (a missing STT is
        # found from the turn's start): let that give up too, so turn 1 stays unanswered.
        await asyncio.sleep(WAIT_MS / 1000 + 0.5)
        await services.start(STAGES[missing])

    try:
        caplog.set_level(logging.INFO)
        async with serving(service) as url:
            result = await call(
                transport,
                url,
                [tone_wav(tmp_path, "a"), tone_wav(tmp_path, "b")],
                after_turn=bring_it_up,
            )
    finally:
        await service.stop()
        for svc in list(services.running):
            await services.stop(svc)
        await store.delete_agent("waits")
    first, second = result.turns
    assert first.error == f"no {missing} instance is running", first.error
    assert first.latency_ms is None and db(bytes(first.bot_audio)) < AUDIBLE_DBFS  # silence
    if missing != "tts":  # with no TTS, the LLM's sentence still shows in the transcript
        assert not first.bot_text
    # within the bound (plus a supervision period and the health ping), counted from the end
    # of the caller's speech; a missing STT is found from the turn's start, so even sooner
    assert first.error_ms is not None and first.error_ms < WAIT_MS + 2500, first.error_ms
    # the next turn starts clean: not a barge-in into the abandoned one, and it is answered
    assert second.error is None and second.bot_text == "You said hello there."
    assert second.latency_ms is not None
    given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert given_up == [f"turn {first.epoch} given up: no {missing} instance is running"]
    resent = [r for r in caplog.records if "sending it again" in r.getMessage()]
    assert len(resent) <= 1, [r.getMessage() for r in resent]  # once, not once per lease TTL
