"""RTVI (pipecat's client protocol) on the WebRTC data channel, with a real aiortc peer against the
transport on a real uvicorn, real NATS and Valkey, and the stage services in-process; and the
pipecat way to start a call: `POST /start`, then `/sessions/{id}/api/offer`.

The peer plays what `@pipecat-ai/client-js` does on the wire: it offers audio, opens a data
channel, sends `client-ready` and other labelled RTVI messages, and reads what comes back. The
caller's tones stand for words (see test_webrtc.py); the bot answers with scripted text.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from pydantic import SecretStr

from tests.support import heard, loopback_agent
from voicemesh.bus.events import Transcript, TurnMetrics
from voicemesh.callers.webrtc import Microphone
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.call.audio import FRAME_BYTES
from voicemesh.transport.call.rtvi import PROTOCOL_VERSION, Rtvi, metrics
from voicemesh.transport.carriers.rtc import offer_loopback_candidates

pytestmark = pytest.mark.usefixtures("private_egress")

RATE = 16000
WORDS = {300.0: "apple", 500.0: "banana", 700.0: "cherry"}
ADMIN, ACME, BETA = "rtvi-admin-key-1", "rtvi-acme-key-2", "rtvi-beta-key-3"
WAIT_S = 20


@pytest.fixture(scope="module")
def transcript() -> Any:
    return functools.partial(heard, min_samples=1024, words=WORDS, window=False, rate=RATE)


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    return {
        "webrtc_loopback": True,
        "api_keys": (SecretStr(ADMIN),),
        "tenant_keys": (("acme", SecretStr(ACME)), ("beta", SecretStr(BETA))),
        "rtvi_max_text_chars": 200,
    }


@pytest.fixture
async def url(
    transport_app: Any, store: ConfigStore, agent_json: dict, transcriber: OpenAITranscribeServer
) -> AsyncIterator[str]:
    data = loopback_agent(
        agent_json,
        transport="webrtc",
        stt_url=transcriber.base_url,
        replies=["You said {user}."],
        ms_per_word=90,
        jitter_buffer_ms=20,
    )
    await store.create_agent("rtvi-test", parse_agent_config(data))
    try:
        yield transport_app.url
    finally:
        await store.delete_agent("rtvi-test")


def tone(hz: float, ms: int) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16).tobytes()


def rtvi(type_: str, data: Any = None, id_: str = "m1") -> dict[str, Any]:
    return {"label": "rtvi-ai", "type": type_, "id": id_, "data": data}


class Client:
    """What client-js with small-webrtc-transport puts on the wire, in aiortc."""

    def __init__(self, url: str, key: str = ACME):
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = Microphone()
        self.pc.addTransceiver(self.mic, direction="sendrecv")
        self.channel = self.pc.createDataChannel("chat")
        self.messages: list[Any] = []
        self.arrived = asyncio.Event()
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.audible_frames = 0
        self.session_id = ""
        self._tasks: list[asyncio.Task[None]] = []
        self.channel.on("open", self.opened.set)
        self.channel.on("message", self._message)
        self.pc.on("track", self._track)
        self.pc.on("connectionstatechange", self._state)

    def _message(self, message: Any) -> None:
        self.messages.append(json.loads(message))
        self.arrived.set()

    def _state(self) -> None:
        if self.pc.connectionState in ("closed", "failed"):
            self.closed.set()

    def _track(self, track: MediaStreamTrack) -> None:
        async def listen() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                if np.abs(frame.to_ndarray()).max() > 300:  # type: ignore[union-attr]
                    self.audible_frames += 1

        if track.kind == "audio":
            self._tasks.append(asyncio.create_task(listen()))

    async def start(self, body: dict[str, Any] | None = None) -> str:
        offer_loopback_candidates()
        start = {"createDailyRoom": False, "enableDefaultIceServers": True, "transport": "webrtc"}
        if body is not None:
            start["body"] = body
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers) as http:
            r = await http.post("/start", json=start)
            assert r.status_code == 200, r.text
            self.session_id = r.json()["sessionId"]
            await self.pc.setLocalDescription(await self.pc.createOffer())
            offer = {
                "sdp": self.pc.localDescription.sdp,
                "type": "offer",
                "pc_id": None,
                "restart_pc": False,
            }
            r = await http.post(f"/sessions/{self.session_id}/api/offer", json=offer)
            assert r.status_code == 200, r.text
            answer = r.json()
        assert answer["session_id"] == self.session_id
        self.pc_id = answer["pc_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await asyncio.wait_for(self.opened.wait(), 15)
        return self.session_id

    def send(self, message: Any) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def ready(self) -> dict[str, Any]:
        self.send(rtvi("client-ready", {"version": "2.0.0", "about": {"library": "test"}}, "r1"))
        return await self.wait_for(lambda m: m.get("type") == "bot-ready")

    async def wait_for(self, want: Callable[[dict[str, Any]], bool], after: int = 0) -> dict:
        async with asyncio.timeout(WAIT_S):
            while True:
                for m in self.messages[after:]:
                    if want(m):
                        return m
                self.arrived.clear()
                await self.arrived.wait()

    async def say(self, pcm: bytes, silence_ms: int = 600) -> None:
        pcm += bytes(RATE * 2 * silence_ms // 1000)
        for i in range(0, len(pcm), FRAME_BYTES):
            await self.mic.say(pcm[i : i + FRAME_BYTES].ljust(FRAME_BYTES, b"\0"))

    def types(self, after: int = 0) -> list[str]:
        return [m.get("type") for m in self.messages[after:]]

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def client(url: str) -> AsyncIterator[Client]:
    c = Client(url)
    try:
        yield c
    finally:
        await c.close()


def bot_text(c: Client, after: int = 0) -> str:
    return " ".join(m["data"]["text"] for m in c.messages[after:] if m["type"] == "bot-llm-text")


async def test_client_ready_then_a_spoken_turn_in_rtvi(client: Client, store: ConfigStore) -> None:
    """client-ready → bot-ready (its id, our protocol, the session); then a spoken turn comes as
    RTVI only: speaking start/stop both ways, the transcript, the reply sentence as llm and tts
    text, metrics with per-stage ttfb and processing."""
    sid = await client.start({"agent": "rtvi-test"})
    ready = await client.ready()
    assert ready["id"] == "r1" and ready["label"] == "rtvi-ai"
    assert ready["data"]["version"] == PROTOCOL_VERSION
    assert ready["data"]["about"]["session_id"] == sid
    mark = len(client.messages)
    await client.say(tone(300, 700))
    await client.wait_for(lambda m: m["type"] == "bot-stopped-speaking", mark)
    after = client.messages[mark:]
    assert all(m.get("label") == "rtvi-ai" for m in after), after  # no JSON of our own now
    types = client.types(mark)
    for wanted in (
        "user-started-speaking",
        "user-stopped-speaking",
        "user-transcription",
        "bot-llm-text",
        "bot-tts-text",
        "bot-output",
        "bot-started-speaking",
        "metrics",
        "bot-stopped-speaking",
    ):
        assert wanted in types, (wanted, types)
    assert types.index("user-started-speaking") < types.index("user-stopped-speaking")
    assert types.index("bot-started-speaking") < types.index("bot-stopped-speaking")
    heard_ = [m["data"] for m in after if m["type"] == "user-transcription"]
    assert heard_[-1]["text"] == "apple" and heard_[-1]["final"] is True
    assert bot_text(client, mark) == "You said apple."
    tts = [m["data"]["text"] for m in after if m["type"] == "bot-tts-text"]
    assert tts == ["You said apple."]
    # bot-output (2.x): the sentence when it is generated, and again once it has been played
    outputs = [
        (m["data"]["spoken_status"], m["data"]["text"]) for m in after if m["type"] == "bot-output"
    ]
    assert outputs == [("new", "You said apple."), ("completed", "You said apple.")]
    data = next(m["data"] for m in after if m["type"] == "metrics")
    ttfb = {x["processor"]: x["value"] for x in data["ttfb"]}
    processing = {x["processor"]: x["value"] for x in data["processing"]}
    assert {"llm", "tts"} <= set(ttfb) and {"stt", "voice-to-voice"} <= set(processing), data
    assert all(0 <= v < 10 for v in [*ttfb.values(), *processing.values()]), data
    assert client.audible_frames > 5  # the reply was heard too (~270 ms of tone)


async def test_send_text_is_a_typed_turn_through_llm_and_tts(
    client: Client, store: ConfigStore
) -> None:
    sid = await client.start({"agent": "rtvi-test"})
    await client.ready()
    mark, frames = len(client.messages), client.audible_frames
    client.send(rtvi("send-text", {"content": "banana", "options": {"run_immediately": True}}))
    await client.wait_for(lambda m: m["type"] == "bot-stopped-speaking", mark)
    assert bot_text(client, mark) == "You said banana."
    said = [m["data"] for m in client.messages[mark:] if m["type"] == "user-transcription"]
    assert [s["text"] for s in said] == ["banana"] and said[0]["final"]
    assert "metrics" in client.types(mark)
    assert client.audible_frames - frames > 5  # spoken, through TTS, over RTP
    context = await store.get_context(sid)
    assert [(m["role"], m["content"]) for m in context] == [
        ("user", "banana"),
        ("assistant", "You said banana."),
    ]


async def test_append_to_context_client_messages_and_refusals(
    client: Client, store: ConfigStore
) -> None:
    """append-to-context lands in Valkey; client-message `session` is answered, an unknown one
    refused; unknown types, malformed and oversized messages get RTVI errors; and the call goes
    on (a typed turn still gets its reply)."""
    sid = await client.start({"agent": "rtvi-test"})
    await client.ready()

    def reply_to(id_: str) -> Callable[[dict[str, Any]], bool]:
        return lambda m: m.get("id") == id_ and m["type"] in ("error-response", "server-response")

    client.send(rtvi("append-to-context", {"role": "user", "content": "I like pears"}, "a1"))
    client.send(rtvi("client-message", {"t": "session", "d": {}}, "c1"))
    answer = await client.wait_for(reply_to("c1"))
    assert answer["type"] == "server-response" and answer["data"]["d"]["session_id"] == sid
    context = await store.get_context(sid)
    assert [(m["role"], m["content"]) for m in context] == [("user", "I like pears")]

    client.send(rtvi("client-message", {"t": "launch-missiles", "d": {}}, "c2"))
    refused = await client.wait_for(reply_to("c2"))
    assert refused["type"] == "error-response" and "launch-missiles" in refused["data"]["error"]

    client.send(rtvi("make-coffee", {}, "u1"))
    unknown = await client.wait_for(reply_to("u1"))
    assert unknown["type"] == "error-response"
    assert "Unsupported type make-coffee" in unknown["data"]["error"]

    client.send(rtvi("send-text", {"nothing": 1}, "s1"))  # no content
    bad = await client.wait_for(reply_to("s1"))
    assert bad["type"] == "error-response" and "content" in bad["data"]["error"]

    client.send(rtvi("send-text", {"content": "x" * 201}, "s2"))
    long_ = await client.wait_for(reply_to("s2"))
    assert "VOICEMESH_RTVI_MAX_TEXT_CHARS" in long_["data"]["error"]

    mark = len(client.messages)
    client.send({"label": "rtvi-ai", "type": "send-text"})  # no id
    no_id = await client.wait_for(lambda m: m["type"] == "error", mark)
    assert "id" in no_id["data"]["error"] and no_id["data"]["fatal"] is False

    mark = len(client.messages)
    client.send("{this is not json")
    junk = await client.wait_for(lambda m: m["type"] == "error", mark)
    assert "malformed" in junk["data"]["error"]
    client.send("ping: 12345")  # the client transport's keep-alive is not an error

    mark = len(client.messages)
    client.send(rtvi("send-text", {"content": "cherry"}, "s3"))
    await client.wait_for(lambda m: m["type"] == "bot-stopped-speaking", mark)
    assert bot_text(client, mark) == "You said cherry."
    # only the keep-alive came after the junk: no error for it
    assert not [m for m in client.messages[mark:] if m["type"] == "error"]
    context = await store.get_context(sid)
    assert [m["content"] for m in context][:2] == ["I like pears", "cherry"]


async def test_disconnect_bot_ends_the_call(client: Client, url: str) -> None:
    sid = await client.start({"agent": "rtvi-test"})
    await client.ready()
    client.send(rtvi("disconnect-bot", None, "d1"))
    await asyncio.wait_for(client.closed.wait(), 10)
    async with httpx.AsyncClient(base_url=url, headers=client.headers) as http:
        # the pc is gone: renegotiating it is a 404
        r = await http.patch(
            f"/sessions/{sid}/api/offer", json={"pc_id": client.pc_id, "candidates": []}
        )
        assert r.status_code == 404, r.text


async def test_a_client_that_never_sends_client_ready_gets_no_rtvi(client: Client) -> None:
    """The page at / and the headless callers: our own JSON events, never an RTVI message, and
    the call works."""
    await client.start({"agent": "rtvi-test"})
    await client.say(tone(500, 700))
    await client.wait_for(lambda m: m.get("type") == "bot_done")
    assert client.messages[0]["type"] == "session"
    assert not [m for m in client.messages if "label" in m], client.messages
    said = [m for m in client.messages if m["type"] == "transcript"]
    assert [(m["role"], m["text"]) for m in said] == [
        ("user", "banana"),
        ("assistant", "You said banana."),
    ]
    # an RTVI message from such a client is still answered
    client.send(rtvi("make-coffee", {}, "u1"))
    refused = await client.wait_for(lambda m: m.get("id") == "u1")
    assert refused["type"] == "error-response"


async def test_start_and_session_offer_keep_the_tenant_rules(url: str, store: ConfigStore) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/start", json={"transport": "webrtc"})
        assert r.status_code == 401  # no key
        acme = {"Authorization": f"Bearer {ACME}"}
        beta = {"X-API-Key": BETA}
        r = await http.post("/start", json={"body": {"agent": "nobody"}}, headers=acme)
        assert r.status_code == 404 and "nobody" in r.text
        r = await http.post(
            "/start",
            json={"enableDefaultIceServers": True, "body": {"agent": "rtvi-test"}},
            headers=acme,
        )
        assert r.status_code == 200, r.text
        sid = r.json()["sessionId"]
        assert r.json()["iceConfig"] == {"iceServers": []}  # no STUN configured; TURN never
        assert (await store.get_owner(sid)) == "acme"
        offer = await _offer()
        r = await http.post(f"/sessions/{sid}/api/offer", json=offer, headers=beta)
        assert r.status_code == 404, r.text  # another tenant's session does not exist
        r = await http.post("/sessions/no-such/api/offer", json=offer, headers=acme)
        assert r.status_code == 404, r.text
        r = await http.post("/start", json={"transport": "daily"}, headers=acme)
        assert r.status_code == 422 and "/api/daily/calls" in r.text
        # the pipecat clients' fields we do not use are ignored; a default agent answers
        r = await http.post("/start", json={"dailyRoomProperties": {}}, headers=acme)
        assert r.status_code == 200 and "iceConfig" not in r.json()
        # a path's session cannot be swapped for another through request_data
        r = await http.post(
            f"/sessions/{sid}/api/offer",
            json={**offer, "request_data": {"session_id": "someone-elses"}},
            headers=acme,
        )
        assert r.status_code == 200 and r.json()["session_id"] == sid


async def _offer() -> dict[str, Any]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return {"sdp": sdp, "type": "offer"}


# --- the mapping, without a call --------------------------------------------------------------


def test_metrics_carry_each_stage_in_seconds() -> None:
    event = TurnMetrics(
        epoch=1,
        trace_id="t",
        eou_ms=200.0,
        stt_ms=150.0,
        llm_ttft_ms=80.0,
        tts_ttfb_ms=120.0,
        first_audio_ms=None,
        v2v_ms=700.0,
    )
    assert metrics(event) == {
        "ttfb": [{"processor": "llm", "value": 0.08}, {"processor": "tts", "value": 0.12}],
        "processing": [
            {"processor": "turn", "value": 0.2},
            {"processor": "stt", "value": 0.15},
            {"processor": "voice-to-voice", "value": 0.7},
        ],
    }


async def test_a_legacy_client_gets_its_version_and_v1_bot_output() -> None:
    sent: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    r = Rtvi(send, lambda: None)
    await r.on_message(rtvi("client-ready", {"version": "1.2.0", "about": {"library": "x"}}))
    assert sent[-1]["type"] == "bot-ready" and sent[-1]["data"]["version"] == "1.2.0"
    await r.deliver(Transcript(role="assistant", text="Hi.", epoch=1, index=0))
    out = next(m for m in sent if m["type"] == "bot-output")
    assert out["data"]["spoken"] is True and "spoken_status" not in out["data"]


async def test_messages_past_the_rate_are_refused() -> None:
    sent: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    r = Rtvi(send, lambda: None, message_rate=3)
    for i in range(5):
        await r.on_message(rtvi("client-message", {"t": "session"}, f"x{i}"))
    errors = [m["data"]["error"] for m in sent]
    assert sum("too many" in e for e in errors) == 2, errors


def test_settings_of_rtvi_and_daily_rooms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_RTVI_MAX_TEXT_CHARS", "50")
    monkeypatch.setenv("VOICEMESH_RTVI_MESSAGE_RATE", "2.5")
    s = Settings()
    assert (s.rtvi_max_text_chars, s.rtvi_message_rate) == (50, 2.5)
    assert (Settings.model_fields["rtvi_max_text_chars"].default, 20.0) == (2000, 20.0)
    monkeypatch.delenv("DAILY_API_KEY", raising=False)
    monkeypatch.delenv("VOICEMESH_DAILY_API_KEY", raising=False)
    assert Settings().daily_api_key is None
    monkeypatch.setenv("DAILY_API_KEY", "dk-1")
    monkeypatch.setenv("VOICEMESH_DAILY_API_URL", "http://127.0.0.1:9/v1")
    s = Settings()
    assert s.daily_api_key is not None and s.daily_api_key.get_secret_value() == "dk-1"
    assert s.daily_api_url == "http://127.0.0.1:9/v1"
    assert "dk-1" not in repr(s)


def test_each_caller_event_maps_to_its_rtvi_message() -> None:
    """The mapping table of docs/wire-protocol.md#rtvi, event by event."""
    from voicemesh.bus.events import (
        BotDone,
        BotStarted,
        ErrorEvent,
        Hop,
        Interrupted,
        Session,
        ToolCallEvent,
        ToolResultEvent,
        TurnStarted,
        UserStopped,
        WarningEvent,
    )

    async def send(_: dict[str, Any]) -> None:
        return None

    r = Rtvi(send, lambda: None)

    def out(event: Any) -> list[tuple[str, Any]]:
        return [(m["type"], m.get("data")) for m in r.to_rtvi(event)]

    assert all(m["label"] == "rtvi-ai" for m in r.to_rtvi(TurnStarted(epoch=1)))
    assert out(TurnStarted(epoch=1)) == [("user-started-speaking", None)]
    assert out(UserStopped(epoch=1)) == [("user-stopped-speaking", None)]
    interim = out(Transcript(role="user", text="what is", epoch=1, final=False))
    assert interim[0][0] == "user-transcription" and interim[0][1]["final"] is False
    assert interim[0][1]["text"] == "what is" and interim[0][1]["timestamp"]
    assert out(Transcript(role="user", text="", epoch=1, final=True)) == []  # nothing heard
    assert [t for t, _ in out(Transcript(role="assistant", text="Hi.", epoch=1, index=0))] == [
        "bot-llm-text",
        "bot-tts-text",
        "bot-output",
    ]
    assert out(BotStarted(epoch=1, latency_ms=900.0)) == [("bot-started-speaking", None)]
    done = out(BotDone(epoch=1))
    assert [t for t, _ in done] == ["bot-output", "bot-stopped-speaking"]
    assert done[0][1]["spoken_status"] == "completed"
    assert out(BotDone(epoch=1)) == []  # not speaking: no second stop
    out(BotStarted(epoch=2, latency_ms=None))
    cut = out(Interrupted(epoch=2, heard="The"))
    assert [t for t, _ in cut] == ["bot-interrupted", "bot-stopped-speaking", "server-message"]
    assert cut[2][1] == {"type": "interrupted", "epoch": 2, "heard": "The"}
    assert out(ErrorEvent(error="no llm instance is running", stage="llm", epoch=3)) == [
        ("error", {"error": "no llm instance is running", "fatal": False})
    ]
    call = ToolCallEvent(epoch=3, call_id="c9", name="weather", arguments='{"city": "Paris"}')
    assert out(call) == [
        ("llm-function-call-started", {"function_name": "weather"}),
        (
            "llm-function-call-in-progress",
            {"tool_call_id": "c9", "function_name": "weather", "arguments": {"city": "Paris"}},
        ),
    ]
    cut_args = ToolCallEvent(epoch=3, call_id="c10", name="weather", arguments='{"city": "Par')
    assert out(cut_args)[1][1]["arguments"] == {"arguments": '{"city": "Par'}
    done = ToolResultEvent(
        epoch=3, call_id="c9", name="weather", status="cancelled", duration_ms=12.0
    )
    assert out(done) == [
        (
            "llm-function-call-stopped",
            {"tool_call_id": "c9", "cancelled": True, "function_name": "weather"},
        ),
        ("server-message", done.wire()),
    ]
    for event in (
        Session(session_id="s" * 22, version=1),
        Hop(stage="tts", epoch=1, ttfb_ms=120.0),
        WarningEvent(code="reply_truncated", message="cut", stage="llm", epoch=1),
    ):
        assert out(event) == [("server-message", event.wire())]


async def test_send_text_while_the_caller_speaks_is_refused(client: Client) -> None:
    """Its audio would run on under the typed turn's epoch: refused, and the spoken turn is
    answered as usual."""
    await client.start({"agent": "rtvi-test"})
    await client.ready()
    mark = len(client.messages)
    speaking = asyncio.create_task(client.say(tone(700, 1500)))
    await client.wait_for(lambda m: m["type"] == "user-started-speaking", mark)
    client.send(rtvi("send-text", {"content": "banana"}, "s1"))
    refused = await client.wait_for(lambda m: m.get("id") == "s1", mark)
    assert refused["type"] == "error-response" and "speaking" in refused["data"]["error"]
    await speaking
    await client.wait_for(lambda m: m["type"] == "bot-stopped-speaking", mark)
    assert bot_text(client, mark) == "You said cherry."


async def test_start_at_capacity_makes_no_session(
    url: str, transport_app: Any, store: ConfigStore
) -> None:
    """A full transport (VOICEMESH_MAX_CALLS) would refuse the offer that follows /start: /start
    is refused first (503, Retry-After), and no session is left for the call that never comes."""
    capacity = transport_app.service.capacity
    limit, active = capacity.limit, capacity.active
    capacity.limit, capacity.active = 1, 1  # as if one call ran
    try:
        before = sorted(await store.list_configs())
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                "/start", json={"body": {"agent": "rtvi-test"}}, headers={"X-API-Key": ACME}
            )
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert sorted(await store.list_configs()) == before
    finally:
        capacity.limit, capacity.active = limit, active
