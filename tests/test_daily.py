"""Daily bots, everything that does not need Daily's servers: request validation, secret
resolution that never leaks the token, the bounded join failure against a room that cannot be
reached (with the real pipecat DailyTransport and daily-python), and the audio bridge: pipecat
frames in and out of a real pipecat pipeline, with a real call behind it on real NATS and Valkey.

Where a room would have to be joined, the test stands in for DailyTransport's network side only:
its input()/output() processors are replaced by processors that feed and collect frames, and
`on_joined` fires once the pipeline is set up, as daily-python's join does.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from loguru import logger as loguru_logger
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import SecretStr

from tests.support import Services, dominant_hz, listen, loopback_agent, until
from voicemesh.bus import Bus, Kind
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.pipeline import LLMService, STTService, TTSService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.api.app import create_app
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.call.call import Call
from voicemesh.transport.carriers import daily
from voicemesh.transport.carriers.daily import DailyBot, DailyPeer

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

TOKEN = "tok-SECRET-4b3a29f1e0"  # what ${VM_TEST_DAILY_TOKEN} resolves to
UNREACHABLE = "https://voicemesh-test.invalid/no-such-room"


@pytest.fixture(autouse=True)
def _unreachable_room_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator lets rooms on the (never resolvable) test host through the egress policy."""
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "daily:voicemesh-test.invalid")


CALLER_HZ, BOT_HZ = 300.0, 440.0


def tone(ms: int, rate: int, hz: float = CALLER_HZ, channels: int = 1) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    mono = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)
    return np.repeat(mono, channels).tobytes()  # interleaved


def silence(ms: int, rate: int, channels: int = 1) -> bytes:
    return bytes(rate * ms // 1000 * 2 * channels)


# --- stand-ins for the network side of DailyTransport ---------------------------------------------


class Feeder(FrameProcessor):
    """Where DailyTransport.input() would push the room's audio."""

    def __init__(self, on_start: Any = None):
        super().__init__(name="feeder")
        self.on_start = on_start

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame) and self.on_start is not None:
            await self.on_start()

    async def feed(self, pcm: bytes, rate: int, channels: int = 1, *, realtime: bool = False):
        step = rate // 50 * 2 * channels  # 20 ms
        clock = time.monotonic()
        for i in range(0, len(pcm), step):
            chunk = pcm[i : i + step]
            await self.push_frame(
                InputAudioRawFrame(audio=chunk, sample_rate=rate, num_channels=channels)
            )
            if realtime:
                clock += 0.02
                await asyncio.sleep(max(0.0, clock - time.monotonic()))


class Collector(FrameProcessor):
    """Where DailyTransport.output() would take the bot's frames."""

    def __init__(self) -> None:
        super().__init__(name="collector")
        self.frames: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame | OutputTransportMessageUrgentFrame):
            self.frames.append((time.monotonic(), frame))
        elif isinstance(frame, InterruptionFrame):
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def audio(self, after: float = 0.0) -> list[OutputAudioRawFrame]:
        return [f for t, f in self.frames if isinstance(f, OutputAudioRawFrame) and t >= after]

    def events(self) -> list[dict[str, Any]]:
        return [
            f.message for _, f in self.frames if isinstance(f, OutputTransportMessageUrgentFrame)
        ]


class FakeDaily:
    """DailyTransport's surface that daily.py uses, with no network behind it."""

    made: ClassVar[list[FakeDaily]] = []

    def __init__(self, room_url: str, token: str, options: Any, peer: DailyPeer):
        self.room_url, self.token, self.bot_name = room_url, token, options.bot_name
        self.handlers: dict[str, Any] = {}
        self.source = Feeder(on_start=self._joined)
        self.sink = Collector()
        FakeDaily.made.append(self)

    async def _joined(self) -> None:
        await self.handlers["on_joined"](self, {"participants": {"local": {"id": "bot"}}})

    def event_handler(self, name: str) -> Any:
        def register(handler: Any) -> Any:
            self.handlers[name] = handler
            return handler

        return register

    def input(self) -> Feeder:
        return self.source

    def output(self) -> Collector:
        return self.sink

    def participants(self) -> dict[str, Any]:
        return {"local": {"id": "bot"}}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the test's own variable names in these connectors' credentials."""
    monkeypatch.setenv(
        "VOICEMESH_SECRET_ENV", "transport.daily:VM_TEST_DAILY_ROOM,VM_TEST_DAILY_TOKEN"
    )


@pytest.fixture
def config(agent_json: dict, transcriber: OpenAITranscribeServer) -> dict:
    return loopback_agent(
        agent_json,
        transport="daily",
        stt_url=transcriber.base_url,
        ms_per_word=150,
        room_url="${VM_TEST_DAILY_ROOM}",
        token="${VM_TEST_DAILY_TOKEN}",
        bot_name="vm-test-bot",
    )


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[TransportService]:
    svc = TransportService(settings.model_copy(update={"auth": "off"}))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def api(service: TransportService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
        yield c


@pytest.fixture
async def stages(services: Services) -> Services:
    await services.start(STTService)
    await services.start(LLMService)
    await services.start(TTSService)
    return services


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VM_TEST_DAILY_TOKEN", TOKEN)
    monkeypatch.setenv("VM_TEST_DAILY_ROOM", UNREACHABLE)


@contextlib.contextmanager
def all_logs(caplog: pytest.LogCaptureFixture) -> Any:
    """Every log line, the standard library's and pipecat's (loguru) alike."""
    lines: list[str] = []
    sink = loguru_logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    caplog.set_level(logging.DEBUG)
    try:
        yield lines
    finally:
        loguru_logger.remove(sink)
        lines.extend(r.getMessage() for r in caplog.records)


def ended(frames: list[Any]) -> bool:
    return any(f.kind is Kind.EVENT and f.as_event.get("type") == "call_end" for f in frames)


def issues(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {i["path"]: i["msg"] for i in r.json()["detail"]}


# --- request validation and secrets ---------------------------------------------------------------


async def test_requests_are_validated_naming_the_field(
    api: httpx.AsyncClient, store: ConfigStore, config: dict, env: None
) -> None:
    bare = copy.deepcopy(config)
    del bare["connectors"]["transport"]["config"]["daily"]["room_url"]
    await store.create_agent("bare", parse_agent_config(bare))
    sid = (await store.create_session(parse_agent_config(bare))).session_id

    r = await api.post("/api/daily/calls", json={"session_id": sid})
    msg = issues(r)["room_url"]
    assert "no Daily room URL" in msg and "connectors.transport.config.daily.room_url" in msg
    # from an agent: same answer, and the session made for the bot is not left behind
    r = await api.post("/api/daily/calls", json={"agent": "bare"})
    assert "room_url" in issues(r)
    assert await store.list_configs() == [sid]

    for body, field in (
        ({"session_id": sid, "room_url": "not a url"}, "room_url"),
        ({"session_id": sid, "room_url": "ftp://x.daily.co/r"}, "room_url"),
        ({"session_id": sid, "agent": "bare", "room_url": UNREACHABLE}, "agent"),
        ({"session_id": sid, "room_url": UNREACHABLE, "join_timeout_s": 0}, "join_timeout_s"),
        ({"session_id": sid, "room_url": UNREACHABLE, "join_timeout_s": 999}, "join_timeout_s"),
        ({"session_id": sid, "room": UNREACHABLE}, "room"),
        ({"session_id": sid, "token": 42}, "token"),
    ):
        r = await api.post("/api/daily/calls", json=body)
        assert field in issues(r), (body, r.text)

    r = await api.post("/api/daily/calls", json={"session_id": "0" * 32, "room_url": UNREACHABLE})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    r = await api.post("/api/daily/calls", json={"agent": "nobody", "room_url": UNREACHABLE})
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    r = await api.delete(f"/api/daily/calls/{sid}")
    assert r.status_code == 404 and "no Daily bot" in r.json()["detail"]


async def test_an_unset_env_reference_names_the_variable_not_a_value(
    api: httpx.AsyncClient,
    store: ConfigStore,
    config: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("VM_TEST_DAILY_TOKEN", raising=False)
    monkeypatch.setenv("VM_TEST_DAILY_ROOM", UNREACHABLE)
    sid = (await store.create_session(parse_agent_config(config))).session_id
    r = await api.post("/api/daily/calls", json={"session_id": sid})
    assert "VM_TEST_DAILY_TOKEN" in issues(r)["token"]
    monkeypatch.delenv("VM_TEST_DAILY_ROOM")
    r = await api.post("/api/daily/calls", json={"session_id": sid})
    assert "VM_TEST_DAILY_ROOM" in issues(r)["room_url"]


async def test_a_name_not_allowed_gives_one_answer_whether_or_not_it_is_set(
    api: httpx.AsyncClient,
    store: ConfigStore,
    config: dict,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A room URL or token naming a variable not on the daily transport's allow-list cannot tell
    a caller whether the transport has it: the same 422, and nothing resolved."""
    sid = (await store.create_session(parse_agent_config(config))).session_id
    answers = []
    for present in (True, False):
        if present:
            monkeypatch.setenv("VM_TEST_DAILY_PROBE", "https://leak.daily.co/r")
        else:
            monkeypatch.delenv("VM_TEST_DAILY_PROBE")
        for field in ("room_url", "token"):
            r = await api.post(
                "/api/daily/calls", json={"session_id": sid, field: "${VM_TEST_DAILY_PROBE}"}
            )
            answers.append((field, issues(r)[field]))
    assert answers[:2] == answers[2:]
    assert "VM_TEST_DAILY_PROBE is not allowed" in answers[0][1]
    assert all("leak" not in msg for _, msg in answers)


async def test_an_unreachable_room_is_a_bounded_502_that_never_shows_the_token(
    api: httpx.AsyncClient,
    store: ConfigStore,
    config: dict,
    env: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real DailyTransport and daily-python, against a room whose host does not resolve."""
    await store.create_agent("room", parse_agent_config(config))
    with all_logs(caplog) as lines:
        began = time.monotonic()
        r = await api.post("/api/daily/calls", json={"agent": "room", "join_timeout_s": 1.5})
        took = time.monotonic() - began
        # the token given in the request, in clear, is treated the same way
        r2 = await api.post(
            "/api/daily/calls",
            json={"agent": "room", "token": TOKEN[::-1], "join_timeout_s": 1},
        )
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    # the room URL kept in the environment is answered as its name, never its value
    assert "could not join the Daily room ${VM_TEST_DAILY_ROOM}" in detail
    assert UNREACHABLE not in r.text and UNREACHABLE not in r2.text
    assert "no answer within 1.5 s" in detail and "meeting token" in detail and "daily.co" in detail
    assert took < 4, took  # bounded by join_timeout_s, not by daily-python's own DNS timeouts
    assert r2.status_code == 502
    for text in (r.text, r2.text, "\n".join(lines)):
        assert TOKEN not in text and TOKEN[::-1] not in text
    assert any("Daily bot joining ${VM_TEST_DAILY_ROOM}" in line for line in lines)
    assert any("could not join ${VM_TEST_DAILY_ROOM}" in line for line in lines)
    assert await store.list_configs() == []  # the sessions made for the bots went with them


# --- the audio bridge, driven without the network -------------------------------------------------


@contextlib.asynccontextmanager
async def bridged() -> AsyncIterator[tuple[DailyBot, Feeder, Collector]]:
    peer = DailyPeer()
    feeder, collector = Feeder(), Collector()
    bot = DailyBot(peer, feeder, collector)
    await bot.join(5)
    try:
        yield bot, feeder, collector
    finally:
        await asyncio.wait_for(bot.stop(), 10)


async def drain(peer: DailyPeer, want_bytes: int, limit_s: float = 3.0) -> bytes:
    got = bytearray()
    async with asyncio.timeout(limit_s):
        while len(got) < want_bytes:
            pcm = await peer.receive()
            assert pcm is not None
            got += pcm
    return bytes(got)


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (48000, 1), (48000, 2), (24000, 2)])
async def test_room_audio_reaches_the_call_as_16k_mono_pcm16(rate: int, channels: int) -> None:
    async with bridged() as (bot, feeder, _):
        await feeder.feed(tone(600, rate, channels=channels), rate, channels)
        # a stream resampler keeps a few ms of filter state back: all but that arrives
        pcm = await drain(bot.peer, int(0.55 * 16000) * 2)
    assert len(pcm) % 2 == 0
    # 300 Hz stays 300 Hz at 16 kHz
    assert abs(dominant_hz(pcm, 16000, window=True) - CALLER_HZ) < 10
    samples = np.frombuffer(pcm, "<i2")
    assert 0.25 * 32767 < np.abs(samples[1600:]).max() < 0.35 * 32767  # channels averaged


async def test_bot_audio_events_and_barge_in_become_pipecat_frames() -> None:
    async with bridged() as (bot, _, collector):
        pcm = tone(20, bot.peer.out_rate, hz=BOT_HZ)
        await bot.peer.send_audio(pcm)
        await bot.peer.send_event({"type": "turn", "epoch": 1})
        bot.peer.interrupted()
        await until(lambda: len(collector.frames) >= 3, what="three frames")
        # events and interruptions are pipecat system frames: they overtake queued audio
        kinds = {type(f): f for _, f in collector.frames}
        audio = kinds[OutputAudioRawFrame]
        event = kinds[OutputTransportMessageUrgentFrame]
        interruption = kinds[InterruptionFrame]
        assert isinstance(audio, OutputAudioRawFrame)
        assert (audio.audio, audio.sample_rate, audio.num_channels) == (pcm, 24000, 1)
        assert isinstance(event, OutputTransportMessageUrgentFrame)
        assert event.message == {"type": "turn", "epoch": 1}
        assert isinstance(interruption, InterruptionFrame)
        bot.peer.hang_up()
        assert await bot.peer.receive() is None


async def test_a_call_runs_through_the_bridge(
    service: TransportService,
    stages: Services,
    store: ConfigStore,
    config: dict,
    bus: Bus,
) -> None:
    sid = (await store.create_session(parse_agent_config(config))).session_id
    ctl = await listen(bus, service.subjects.ctl(sid))
    async with bridged() as (bot, feeder, collector):
        call = asyncio.create_task(Call(service, sid, bot.peer).run())
        mark = time.monotonic()
        speech = silence(100, 48000, 2) + tone(400, 48000, channels=2) + silence(400, 48000, 2)
        await feeder.feed(speech, 48000, 2)
        await until(lambda: any(e.get("type") == "bot_done" for e in collector.events()), 10)
        events = collector.events()
        assert events[0] == {"type": "session", "session_id": sid, "version": 1}
        said = [e for e in events if e.get("type") == "transcript" and e.get("role") == "user"]
        assert said and said[-1]["text"] == "tone 300"
        audio = collector.audio(mark)
        assert {(f.sample_rate, f.num_channels) for f in audio} == {(24000, 1)}
        assert {len(f.audio) for f in audio} == {960}  # 20 ms at 24 kHz
        reply = b"".join(f.audio for f in audio)
        assert abs(dominant_hz(reply, 24000, window=True) - BOT_HZ) < 10
        assert len(reply) / 2 / 24000 == pytest.approx(4 * 0.15, abs=0.05)  # "You said tone 300."
        bot.peer.hang_up()  # the caller left the room
        await asyncio.wait_for(call, 5)
    await ctl.wait_for(ended)


async def test_rtvi_goes_out_and_comes_in_as_daily_app_messages(
    service: TransportService, stages: Services, store: ConfigStore, config: dict
) -> None:
    """pipecat's client-js on @pipecat-ai/daily-transport speaks RTVI in app messages: our JSON
    until client-ready, then bot-ready and RTVI only; a typed turn (send-text) goes through the
    LLM and TTS and comes back as RTVI text and audio; disconnect-bot ends the call."""
    sid = (await store.create_session(parse_agent_config(config))).session_id

    def rtvi(type_: str, data: Any = None, id_: str = "m1") -> InputTransportMessageFrame:
        message = {"label": "rtvi-ai", "type": type_, "id": id_, "data": data}
        return InputTransportMessageFrame(message=message)

    def types(after: int = 0) -> list[str]:
        return [e.get("type", "") for e in collector.events()[after:]]

    async with bridged() as (bot, feeder, collector):
        call_ = Call(service, sid, bot.peer)
        bot.peer.rtvi.bind(call_)
        call = asyncio.create_task(call_.run())
        await until(lambda: "session" in types(), 5)
        assert "label" not in collector.events()[0]  # before client-ready: our own JSON
        await feeder.push_frame(rtvi("client-ready", {"version": "2.0.0"}, "r1"))
        await until(lambda: "bot-ready" in types(), 5)
        ready = next(e for e in collector.events() if e["type"] == "bot-ready")
        assert ready["id"] == "r1" and ready["data"]["about"]["session_id"] == sid
        mark, audio_mark = len(collector.events()), time.monotonic()
        await feeder.push_frame(rtvi("send-text", {"content": "hello there"}, "s1"))
        await until(lambda: "bot-stopped-speaking" in types(mark), 10)
        after = collector.events()[mark:]
        assert all(e.get("label") == "rtvi-ai" for e in after), after
        texts = [e["data"]["text"] for e in after if e["type"] == "bot-llm-text"]
        assert texts == ["You said hello there."]
        assert [e["data"]["text"] for e in after if e["type"] == "user-transcription"] == [
            "hello there"
        ]
        assert "metrics" in types(mark) and "bot-started-speaking" in types(mark)
        reply = b"".join(f.audio for f in collector.audio(audio_mark))
        assert abs(dominant_hz(reply, 24000, window=True) - BOT_HZ) < 10  # spoken, not just text
        await feeder.push_frame(rtvi("what-is-this", {}, "u1"))
        await until(lambda: "error-response" in types(mark), 5)
        await feeder.push_frame(rtvi("disconnect-bot", None, "d1"))
        await asyncio.wait_for(call, 5)  # the call ended


@contextlib.asynccontextmanager
async def daily_rest(status: int = 200) -> AsyncIterator[tuple[str, list[tuple[str, Any]]]]:
    """Daily's REST API on loopback: POST /rooms and /meeting-tokens as api.daily.co answers."""
    from aiohttp import web

    seen: list[tuple[str, Any]] = []

    async def rooms(request: web.Request) -> web.Response:
        seen.append((request.headers["Authorization"], await request.json()))
        if status != 200:
            return web.json_response({"info": "daily-says-NO-4f2"}, status=status)
        room = {
            "id": "r1",
            "name": "vm-room",
            "api_created": True,
            "privacy": "public",
            "url": "https://voicemesh-test.invalid/vm-room",
            "created_at": "2026-12-06T00:00:00.000Z",
            "config": {},
        }
        return web.json_response(room)

    async def tokens(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.headers["Authorization"], body))
        owner = body["properties"]["is_owner"]
        return web.json_response({"token": "owner-tok" if owner else "caller-tok"})

    app = web.Application()
    app.router.add_post("/v1/rooms", rooms)
    app.router.add_post("/v1/meeting-tokens", tokens)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


async def test_start_with_create_daily_room_puts_the_bot_in_a_new_room(
    settings: Settings,
    stages: Services,
    store: ConfigStore,
    config: dict,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pipecat's /start for Daily: a room and two tokens from Daily's REST API, the bot in with
    the owner token, the caller answered the room and a non-owner token; RTVI in the room. Daily
    failing (its words stay in the log) or no API key leaves no session behind."""
    monkeypatch.setattr(daily, "daily_transport", FakeDaily)
    FakeDaily.made.clear()
    await store.create_agent("room", parse_agent_config(config))
    start = {"createDailyRoom": True, "transport": "daily", "body": {"agent": "room"}}

    def bot_ready(fake: FakeDaily) -> list[dict[str, Any]]:
        return [e for e in fake.sink.events() if e["type"] == "bot-ready"]

    for status in (200, 400):
        async with daily_rest(status) as (url, seen):
            key = SecretStr("dk-SECRET-91")
            update = {"auth": "off", "daily_api_key": key, "daily_api_url": url}
            svc = TransportService(settings.model_copy(update=update))
            await svc.start()
            try:
                app = httpx.ASGITransport(app=create_app(svc))
                async with httpx.AsyncClient(transport=app, base_url="http://t") as api:
                    before = set(await store.list_configs())
                    r = await api.post("/start", json=start)
                    if status != 200:
                        assert r.status_code == 502 and "daily-says" not in r.text, r.text
                        assert set(await store.list_configs()) == before
                        continue
                    assert r.status_code == 200, r.text
                    out = r.json()
                    room = "https://voicemesh-test.invalid/vm-room"
                    assert (out["dailyRoom"], out["dailyToken"]) == (room, "caller-tok")
                    assert {a for a, _ in seen} == {"Bearer dk-SECRET-91"}
                    owners = [b["properties"]["is_owner"] for _, b in seen[1:]]
                    assert owners == [False, True]
                    fake = FakeDaily.made[-1]
                    assert (fake.room_url, fake.token) == (room, "owner-tok")
                    assert (await store.get_config(out["sessionId"])) is not None
                    client_ready = {"label": "rtvi-ai", "type": "client-ready", "id": "r1"}
                    await fake.source.push_frame(InputTransportMessageFrame(message=client_ready))
                    await until(functools.partial(bot_ready, fake), 5)
                    assert bot_ready(fake)[0]["data"]["about"]["session_id"] == out["sessionId"]
                    r = await api.delete(f"/api/daily/calls/{out['sessionId']}")
                    assert r.status_code == 200, r.text
            finally:
                await svc.stop()
    svc = TransportService(settings.model_copy(update={"auth": "off"}))  # no DAILY_API_KEY
    await svc.start()
    try:
        app = httpx.ASGITransport(app=create_app(svc))
        async with httpx.AsyncClient(transport=app, base_url="http://t") as api:
            before = set(await store.list_configs())
            r = await api.post("/start", json=start)
            assert r.status_code == 422 and "DAILY_API_KEY" in r.text, r.text
            assert set(await store.list_configs()) == before
            r = await api.post("/start", json={"transport": "daily"})
            assert r.status_code == 422 and "createDailyRoom" in r.text, r.text
    finally:
        await svc.stop()


async def test_post_joins_and_delete_leaves(
    api: httpx.AsyncClient,
    stages: Services,
    store: ConfigStore,
    config: dict,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    bus: Bus,
    service: TransportService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The route's success path, with the room's network side stood in by FakeDaily."""
    monkeypatch.setattr(daily, "daily_transport", FakeDaily)
    FakeDaily.made.clear()
    await store.create_agent("room", parse_agent_config(config))
    room = "https://example.daily.co/standup"
    with all_logs(caplog) as lines:
        r = await api.post("/api/daily/calls", json={"agent": "room", "room_url": room})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        assert r.json() == {"session_id": sid, "room_url": room}
        fake = FakeDaily.made[-1]
        # the stored ${VM_TEST_DAILY_TOKEN} was resolved for the transport, and only there
        assert (fake.room_url, fake.token, fake.bot_name) == (room, TOKEN, "vm-test-bot")
        stored = await store.get_config(sid)
        assert stored is not None
        assert TOKEN.encode() not in stored.config.to_json()
        assert b"${VM_TEST_DAILY_TOKEN}" in stored.config.to_json()
        r = await api.post("/api/daily/calls", json={"session_id": sid, "room_url": room})
        assert r.status_code == 409

        ctl = await listen(bus, service.subjects.ctl(sid))
        await fake.source.feed(tone(400, 16000) + silence(400, 16000), 16000)
        await until(lambda: any(e.get("type") == "bot_done" for e in fake.sink.events()), 10)

        r = await api.delete(f"/api/daily/calls/{sid}")
        assert r.status_code == 200 and r.json() == {"left": room, "session_id": sid}
        await ctl.wait_for(ended)
        r = await api.delete(f"/api/daily/calls/{sid}")
        assert r.status_code == 404
    assert TOKEN not in "\n".join(lines)
