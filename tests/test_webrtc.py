"""WebRTC calls with a real peer: the headless aiortc caller (voicemesh/callers/webrtc.py)
against the transport on a real uvicorn, real NATS and Valkey, and the stage services in-process.

The caller speaks tones whose pitch stands for a word (Opus keeps pitch, so the loopback STT can
'hear' them after two codec passes); the bot answers with scripted text spoken as a tone.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from aiortc import RTCConfiguration, RTCPeerConnection

from tests.support import TransportApp, heard, loopback_agent
from voicemesh.callers.webrtc import AUDIBLE_DBFS, call_over_webrtc
from voicemesh.config.connectors import WebRTCTransportOptions
from voicemesh.config.models import parse_agent_config
from voicemesh.config.secrets import SecretResolutionError
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript
from voicemesh.transport.carriers.rtc import jitter_buffer
from voicemesh.transport.carriers.webrtc import ice_servers

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

RATE = 16000
WORDS = {300.0: "apple", 500.0: "banana", 700.0: "cherry"}
LONG_REPLY = (
    "One two three four five six seven eight. Nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen. Seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three. Twenty-four "
    "twenty-five twenty-six twenty-seven twenty-eight twenty-nine thirty."
)


def tone(hz: float, ms: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(RATE * ms // 1000) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def db(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return 20 * np.log10(max(float(np.sqrt(np.mean(x * x))) if x.size else 0.0, 1e-9) / 32768)


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    """The word whose pitch dominates the utterance."""
    return functools.partial(heard, min_samples=1024, words=WORDS, window=False, rate=RATE)


@dataclass
class Server:
    url: str
    store: ConfigStore
    agent: dict


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    return {"auth": "off", "webrtc_loopback": True}


@pytest.fixture
async def server(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> AsyncIterator[Server]:
    data = loopback_agent(
        agent_json,
        transport="webrtc",
        stt_url=transcriber.base_url,
        replies=["You said {user}.", LONG_REPLY],
        ms_per_word=90,
        jitter_buffer_ms=20,
    )
    data["connectors"]["llm"]["config"]["scripted"]["chunk_words"] = 2
    await store.create_agent("webrtc-test", parse_agent_config(data))
    try:
        yield Server(transport_app.url, store, data)
    finally:
        await store.delete_agent("webrtc-test")


def wav(tmp_path: Path, name: str, audio: np.ndarray) -> Path:
    path = tmp_path / f"{name}.wav"
    sf.write(str(path), audio, RATE, subtype="PCM_16")
    return path


async def test_two_turns_over_webrtc(server: Server, tmp_path: Path) -> None:
    turns = [wav(tmp_path, "a", tone(300, 700)), wav(tmp_path, "b", tone(500, 700))]
    result = await call_over_webrtc(
        server.url, turns, tmp_path / "bot.wav", agent="webrtc-test", turn_timeout=20
    )
    assert [t.user_text for t in result.turns] == ["apple", "banana"]
    assert result.turns[0].bot_text == "You said apple."
    for turn in result.turns:
        assert turn.latency_ms is not None and 0 < turn.latency_ms < 5000, turn.latency_ms
        assert db(bytes(turn.bot_audio)) > AUDIBLE_DBFS + 10  # the reply was heard, not silence
    recorded, rate = sf.read(str(tmp_path / "bot.wav"), dtype="int16")
    assert rate == RATE and recorded.size == len(result.bot_audio) // 2


async def test_barge_in_cuts_the_bot_off(server: Server, tmp_path: Path) -> None:
    """The caller speaks 1 s into the bot's long reply: the bot's audio stops within 100 ms of the
    transport's decision, nothing of the old reply comes after, and the context holds what was
    heard of it, not the whole reply."""
    frames: list[tuple[float, bytes]] = []
    turns = [
        wav(tmp_path, "a", tone(300, 600)),
        wav(tmp_path, "b", tone(700, 600)),
        wav(tmp_path, "c", tone(500, 600)),
    ]
    # turn 1: "You said apple."; turn 2 gets LONG_REPLY, and turn 3 cuts into it
    result = await call_over_webrtc(
        server.url,
        turns,
        None,
        agent="webrtc-test",
        turn_timeout=30,
        on_audio=lambda t, pcm: frames.append((t, pcm)),
        barge_in_after_s=1.0,
    )
    assert [t.user_text for t in result.turns] == ["apple", "cherry", "banana"]
    # "You said apple." is shorter than 1 s of tone: it ends before the caller speaks again, so
    # the one interruption is of turn 2's long reply
    assert [ev["epoch"] for ev in result.interrupts] == [result.turns[1].epoch]
    cut = result.interrupts[0]
    at = float(cut["at"])  # type: ignore[arg-type]
    heard_text = str(cut["heard"])
    assert heard_text and LONG_REPLY.startswith(heard_text.rstrip(".")), heard_text
    assert len(heard_text.split()) < len(LONG_REPLY.split())

    # bot audio stops within 100 ms of the decision (the event travels on the data channel, the
    # audio on RTP through both jitter buffers: the measure includes both paths)
    audible = [t for t, pcm in frames if db(pcm) > AUDIBLE_DBFS]
    before_new_reply = [t for t in audible if at - 2 < t < at + 1.0]
    last_old = max(t for t in before_new_reply if t < at + 0.5)
    print(f"barge-in: last bot audio {1000 * (last_old - at):.0f} ms after the interrupted event")
    assert last_old - at < 0.1, f"bot audio went on {1000 * (last_old - at):.0f} ms after the cut"
    # and no old audio after that: the next sound is the new reply, after the caller's turn ended
    third = result.turns[2]
    later = [t for t in audible if t > at + 0.1]
    assert later, "the reply to the barge-in was never heard"
    assert third.latency_ms is not None

    context = await server.store.get_context(result.session_id)
    cut_reply = [
        m for m in context if m.get("epoch") == result.turns[1].epoch and m["role"] == "assistant"
    ]
    assert cut_reply == [
        {
            "role": "assistant",
            "content": heard_text,
            "interrupted": True,
            "epoch": result.turns[1].epoch,
        }
    ]
    roles = [(m["role"], m.get("epoch")) for m in context]
    assert roles.index(("assistant", result.turns[1].epoch)) < roles.index(
        ("user", result.turns[2].epoch)
    )


async def audio_offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_offer_errors_are_clear(server: Server) -> None:
    sessions_before = sorted(await server.store.list_configs())
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/api/offer", json={"sdp": "v=0", "type": "offer"})
        assert r.status_code == 400 and "no audio" in r.json()["detail"], r.text
        r = await http.post("/api/offer", json={"type": "offer"})
        assert r.status_code == 422 and "sdp" in r.text
        r = await http.post("/api/offer", json={"sdp": "v=0", "type": "answer"})
        assert r.status_code == 422 and "type" in r.text
        offer = await audio_offer()
        r = await http.post(
            "/api/offer", json={"sdp": offer, "type": "offer", "request_data": {"agent": "nobody"}}
        )
        assert r.status_code == 404 and "nobody" in r.json()["detail"]
        r = await http.post(
            "/api/offer", json={"sdp": offer, "type": "offer", "requestData": {"session_id": "x1"}}
        )
        assert r.status_code == 404 and "x1" in r.json()["detail"]
        r = await http.post("/api/offer", json={"sdp": offer, "type": "offer", "pc_id": "gone"})
        assert r.status_code == 404 and "gone" in r.json()["detail"]
        r = await http.patch("/api/offer", json={"pc_id": "gone", "candidates": []})
        assert r.status_code == 404
    # no refused offer left a session behind
    assert sorted(await server.store.list_configs()) == sessions_before


def test_jitter_buffer_prefetch_follows_the_setting() -> None:
    assert jitter_buffer(0)._prefetch == 0
    assert jitter_buffer(20)._prefetch == 1
    assert jitter_buffer(80)._prefetch == 4  # aiortc's own default
    big = jitter_buffer(400)
    assert big._prefetch == 20 and big.capacity >= 40


def test_turn_credentials_are_resolved_only_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "transport.webrtc:VM_TEST_TURN_SECRET")
    # the TURN host gets the credential: the operator names it
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "webrtc:turn.example.com:3478")
    options = WebRTCTransportOptions(
        ice_servers=["turn:turn.example.com:3478"],
        ice_username="vm",
        ice_credential="${VM_TEST_TURN_SECRET}",
    )
    assert options.ice_credential == "${VM_TEST_TURN_SECRET}"  # the stored config: a reference
    with pytest.raises(SecretResolutionError, match="VM_TEST_TURN_SECRET"):
        ice_servers(options)
    monkeypatch.setenv("VM_TEST_TURN_SECRET", "s3cret")
    (server,) = ice_servers(options)
    assert (server.urls, server.username, server.credential) == (
        "turn:turn.example.com:3478",
        "vm",
        "s3cret",
    )
    assert ice_servers(WebRTCTransportOptions()) == []
