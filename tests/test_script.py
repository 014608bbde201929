"""The caller's latency figure (voicemesh/callers/script.py) counts from the end of speech, not
from the end of the WAV: a recording that ends in silence (most do) once made the caller's
figure smaller than the transport's, which cannot be, since the caller's includes both media
paths and its jitter buffer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.support import TransportApp, loopback_agent
from voicemesh.callers.script import last_voiced_frame
from voicemesh.callers.webrtc import call_over_webrtc
from voicemesh.config.models import parse_agent_config
from voicemesh.connectors.proof import utterance
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript
from voicemesh.transport.call.audio import FRAME_BYTES, RATE

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

SILENCE_S = 1.0


def speech() -> bytes:
    """Real speech (the packaged startup utterance), cut to a whole number of frames."""
    pcm, rate = utterance()
    assert rate == RATE
    return pcm[: len(pcm) // FRAME_BYTES * FRAME_BYTES]


def noise(seconds: float, dbfs: float, seed: int = 7) -> bytes:
    """Room noise: white noise at `dbfs` RMS (a quiet office is about -55 dBFS on a phone)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 32768 * 10 ** (dbfs / 20), int(seconds * RATE))
    return np.clip(x, -32768, 32767).astype(np.int16).tobytes()


def test_trailing_silence_does_not_move_the_end_of_speech() -> None:
    pcm = speech()
    end = last_voiced_frame(pcm)
    assert end is not None and end > 10
    assert last_voiced_frame(pcm + bytes(int(SILENCE_S * RATE) * 2)) == end
    # and quiet room noise after it is not speech either (an energy gate would be fooled)
    assert abs(last_voiced_frame(pcm + noise(SILENCE_S, -50)) - end) <= 1  # type: ignore[operator]


def test_silence_has_no_voiced_frame_and_tones_fall_back_to_energy() -> None:
    assert last_voiced_frame(bytes(FRAME_BYTES * 50)) is None
    t = np.arange(RATE // 2) / RATE
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 400 * t)).astype(np.int16).tobytes()
    assert last_voiced_frame(tone + bytes(FRAME_BYTES * 20)) == len(tone) // FRAME_BYTES - 1


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    return "what is the weather like today"


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    return {"auth": "off", "webrtc_loopback": True}


@pytest.fixture
async def agent(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> AsyncIterator[str]:
    # Silero on the transport, as in the default agent: the caller counts with the same VAD
    data = loopback_agent(
        agent_json, transport="webrtc", stt_url=transcriber.base_url, vad="silero"
    )
    await store.create_agent("script-test", parse_agent_config(data))
    try:
        yield transport_app.url
    finally:
        await store.delete_agent("script-test")


async def test_a_wav_ending_in_silence_is_timed_from_its_last_word(
    agent: str, tmp_path: Path
) -> None:
    trailing = tmp_path / "trailing.wav"
    pcm = np.frombuffer(speech() + bytes(int(SILENCE_S * RATE) * 2), np.int16)
    sf.write(str(trailing), pcm, RATE, subtype="PCM_16")
    result = await call_over_webrtc(agent, [trailing], None, agent="script-test", turn_timeout=20)
    [turn] = result.turns
    assert turn.latency_ms is not None and turn.latency_from_file_end_ms is not None, turn
    v2v = turn.phases.get("v2v_ms")
    assert v2v is not None
    # the caller's figure includes both media paths: never below the transport's own
    assert turn.latency_ms >= v2v, (turn.latency_ms, v2v)
    # and the file's end is later than the end of speech by everything after the last voiced
    # frame (the recording's own quiet tail plus the silence added), sent in real time
    after_speech_ms = (len(pcm) * 2 // FRAME_BYTES - 1 - last_voiced_frame(pcm.tobytes())) * 20  # type: ignore[operator]
    assert after_speech_ms >= SILENCE_S * 1000
    gap = turn.latency_ms - turn.latency_from_file_end_ms
    assert abs(gap - after_speech_ms) < 50, (gap, after_speech_ms)
