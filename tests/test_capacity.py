"""voicemesh/transport/api/capacity.py: a transport past VOICEMESH_MAX_CALLS refuses new calls
cleanly on every way in (WebSocket close 1013, WebRTC offer 503 with Retry-After), reports
itself not ready on /readyz while staying alive on /healthz, and the call it carries goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import soundfile as sf
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection

from tests.support import TransportApp, loopback_agent, until
from voicemesh.callers.websocket import call_over_websocket
from voicemesh.config.models import parse_agent_config
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.api.capacity import WS_AT_CAPACITY, AtCapacity, CallCapacity
from voicemesh.transport.carriers import webrtc as webrtc_carrier

RATE = 16000

# the calls transcribe on a loopback OpenAI-compatible server
pytestmark = pytest.mark.usefixtures("private_egress")


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    return {"auth": "off", "max_calls": 1}


def test_the_count_refuses_past_its_limit_and_zero_means_none() -> None:
    capacity = CallCapacity(2)
    capacity.take()
    capacity.take()
    assert not capacity.ready
    with pytest.raises(AtCapacity, match=r"at capacity \(2 calls at once\); retry in 5 s"):
        capacity.take()
    capacity.give()
    assert capacity.ready and capacity.refused == 1
    unlimited = CallCapacity(0)
    for _ in range(1000):
        unlimited.take()
    assert unlimited.ready


async def readiness(http: httpx.AsyncClient) -> tuple[int, int, dict[str, Any]]:
    ready, alive = await http.get("/readyz"), await http.get("/healthz")
    return ready.status_code, alive.status_code, ready.json()


async def test_a_full_transport_refuses_new_calls_and_keeps_its_own(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    """max_calls 1: while one WebSocket call runs, a second WebSocket call is closed 1013 after
    an error event naming the limit, a WebRTC offer gets 503 with Retry-After, /readyz says not
    ready (503) and /healthz alive (200). The first call still gets its reply; once it hangs
    up, the transport is ready again and takes a call."""
    data = loopback_agent(agent_json, transport="websocket", stt_url=transcriber.base_url)
    await store.create_agent("cap", parse_agent_config(data))
    async with httpx.AsyncClient(base_url=transport_app.url, timeout=10) as http:
        assert (await readiness(http))[:2] == (200, 200)
        async with websockets.connect(transport_app.ws("/ws/call?agent=cap")) as first:
            await until(lambda: transport_app.service.capacity.active == 1, 5, "the first call")
            ready, alive, body = await readiness(http)
            assert (ready, alive, body["ready"]) == (503, 200, False), body["calls"]
            assert body["calls"]["active"] == 1 and body["calls"]["limit"] == 1

            async with websockets.connect(transport_app.ws("/ws/call?agent=cap")) as second:
                event = orjson.loads(await second.recv())
                assert event["type"] == "error" and "at capacity (1 calls" in event["error"]
                assert event["retry_after_s"] == 5
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await second.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == WS_AT_CAPACITY

            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            try:
                pc.addTransceiver("audio", direction="sendrecv")
                await pc.setLocalDescription(await pc.createOffer())
                offer = {
                    "sdp": pc.localDescription.sdp,
                    "type": "offer",
                    "request_data": {"agent": "cap"},
                }
                r = await http.post("/api/offer", json=offer)
            finally:
                await pc.close()
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert "at capacity" in r.json()["detail"]
            assert transport_app.service.capacity.refused == 2

            # the call let in is not touched: it still talks
            pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(RATE // 2) / RATE) * 32767).astype(
                "<i2"
            )
            frame = 640
            audio = np.concatenate([np.zeros(RATE // 5, "<i2"), pcm, np.zeros(RATE, "<i2")])
            data = audio.tobytes()
            for i in range(0, len(data), frame):
                await first.send(data[i : i + frame])
            got: list[dict[str, Any]] = []
            while not any(e.get("type") == "bot_done" for e in got):
                msg = await first.recv()
                if isinstance(msg, str):
                    got.append(orjson.loads(msg))
        await until(lambda: transport_app.service.capacity.active == 0, 5, "the call to end")
        assert (await readiness(http))[:2] == (200, 200)
    wav = tmp_path / "a.wav"
    sf.write(str(wav), np.concatenate([pcm, np.zeros(RATE, "<i2")]), RATE, subtype="PCM_16")
    result = await call_over_websocket(transport_app.url, [wav], None, agent="cap")
    assert [t.bot_text for t in result.turns] == ["You said tone 220."]


async def test_a_full_transport_refuses_an_offer_before_parsing_its_sdp(
    transport_app: TransportApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At capacity, a new call's offer gets its 503 before anything parses the SDP (a 100 KB
    offer takes milliseconds of the loop the admitted calls share: a flood of them would slow
    the calls the limit protects, bench_overload.py). Both offer routes are covered; an offer
    naming a peer connection (a live call renegotiating) still reaches its route."""
    parsed: list[str] = []
    real_parse = webrtc_carrier.sdp.SessionDescription.parse

    def counting(text: str) -> Any:
        parsed.append(text)
        return real_parse(text)

    monkeypatch.setattr(webrtc_carrier.sdp.SessionDescription, "parse", counting)
    capacity = transport_app.service.capacity
    capacity.active = capacity.limit  # full, as if its calls were up
    no_audio = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n" + "a=x\r\n" * 10_000
    async with httpx.AsyncClient(base_url=transport_app.url, timeout=10) as http:
        for path in ("/api/offer", "/sessions/s0000000000000000000000/api/offer"):
            r = await http.post(path, json={"sdp": no_audio, "type": "offer"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5", (path, r.text)
            assert "at capacity (1 calls" in r.json()["detail"]
        assert parsed == [] and capacity.refused == 2
        renegotiation = {"sdp": no_audio, "type": "offer", "pc_id": "pc-of-no-call"}
        r = await http.post("/api/offer", json=renegotiation)
        assert r.status_code == 404 and "pc-of-no-call" in r.text, r.text
        capacity.active = 0  # room again: the offer is the route's to judge (no audio: 400)
        r = await http.post("/api/offer", json={"sdp": no_audio, "type": "offer"})
        assert r.status_code == 400 and "no audio" in r.text, r.text
        assert len(parsed) == 1 and capacity.refused == 2
