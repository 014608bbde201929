"""Twilio Media Streams on /ws/twilio, against the real app on a real uvicorn (loopback port, the
test's event loop), real NATS and Valkey, and the stage services in-process: an OpenAI-compatible
loopback STT that reports what it heard, the scripted LLM and the tone TTS.

The client here speaks Twilio's protocol as Twilio does (connected, start with customParameters,
20 ms μ-law media messages, mark echoes, stop), with its own G.711 μ-law codec, so the server's
conversions are checked against the standard rather than against themselves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
import websockets
from pydantic import SecretStr

from tests.support import (
    Services,
    TransportApp,
    dominant_hz,
    heard,
    listen,
    loopback_agent,
    running_transport,
    until,
)
from voicemesh.bus import Bus, Kind, Subjects
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.carriers import twilio as twilio_module
from voicemesh.transport.carriers.twilio import MISSING_KEY

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

TWILIO_RATE = 8000
BUS_RATE = 16000
MSG = 160  # 20 ms of μ-law at 8 kHz
CALLER_HZ = 300.0
BOT_HZ = 440.0  # the tone TTS's default
KEY = "k-twilio-5e4d3c2b1a"
TWILIO_TOKEN = "tw-auth-token-0123456789abcdef"
STREAM = "MZ00000000000000000000000000000001"


# --- X-Twilio-Signature, written from Twilio's documentation (not the server's code) ---------


def twilio_sign(token: str, url: str, params: dict[str, str] | None = None) -> str:
    """Twilio's algorithm: base64(HMAC-SHA1(auth token, URL + name+value of each POST parameter
    in name order)); a WebSocket handshake (a GET) has no parameters."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def signed(url: str, token: str = TWILIO_TOKEN) -> dict[str, str]:
    """The handshake header Twilio sends for a stream to `url`."""
    return {"X-Twilio-Signature": twilio_sign(token, url)}


# --- G.711 μ-law, written from the standard (not the server's codec) ---------------------------

_BIAS, _CLIP = 0x84, 32635


def ulaw_encode(pcm: np.ndarray) -> bytes:
    x = pcm.astype(np.int32)
    sign = (x < 0).astype(np.int32)
    x = np.minimum(np.abs(x), _CLIP) + _BIAS
    exponent = np.clip(np.floor(np.log2(x)).astype(np.int32) - 7, 0, 7)
    mantissa = (x >> (exponent + 3)) & 0x0F
    return (~((sign << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    x = ((((u & 0x0F) << 3) + _BIAS) << ((u >> 4) & 7)) - _BIAS
    return np.where(u & 0x80, -x, x).astype(np.int16)


def tone(ms: int, hz: float = CALLER_HZ, rate: int = TWILIO_RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)


def quiet(ms: int, rate: int = TWILIO_RATE) -> np.ndarray:
    return np.zeros(rate * ms // 1000, np.int16)


HEARD: list[str] = []


# --- the app -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    """The pitch the loopback STT hears in more than 100 ms of 16 kHz PCM16, kept in HEARD."""

    def kept(pcm: bytes) -> str:
        text = heard(pcm, min_samples=1601, rate=BUS_RATE)
        HEARD.append(text)
        return text

    return kept


@dataclass
class App:
    url: str
    service: TransportService
    subjects: Subjects
    store: ConfigStore
    agent_json: dict
    transcriber: OpenAITranscribeServer

    @classmethod
    def of(
        cls, t: TransportApp, store: ConfigStore, agent_json: dict, ts: OpenAITranscribeServer
    ) -> App:
        return cls(t.ws("/ws/twilio"), t.service, t.service.subjects, store, agent_json, ts)

    async def session(self, *, ms_per_word: int = 100, replies: list[str] | None = None) -> str:
        config = self.config(ms_per_word=ms_per_word, replies=replies)
        return (await self.store.create_session(parse_agent_config(config))).session_id

    def config(self, *, ms_per_word: int = 100, replies: list[str] | None = None) -> dict:
        return loopback_agent(
            self.agent_json,
            transport="twilio",
            stt_url=self.transcriber.base_url,
            replies=replies,
            ms_per_word=ms_per_word,
        )


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings,
    services: Services,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> AsyncIterator[App]:
    async with running_transport(settings, services) as t:
        yield App.of(t, store, agent_json, transcriber)


@pytest.fixture
def app(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> App:
    return App.of(transport_app, store, agent_json, transcriber)


# --- a Twilio-speaking client --------------------------------------------------------------------


@dataclass
class Twilio:
    ws: Any
    stream_sid: str = STREAM
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    echo_marks: bool = True
    _seq: int = 0
    _chunk: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        try:
            async for raw in self.ws:
                msg = orjson.loads(raw)
                self.messages.append((time.monotonic(), msg))
                if self.echo_marks and msg.get("event") == "mark":
                    # Twilio echoes a mark once the audio sent before it has been played
                    await self.send({"event": "mark", "streamSid": self.stream_sid, **msg})
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            self._changed.set()

    async def send(self, msg: dict[str, Any]) -> None:
        self._seq += 1
        await self.ws.send(orjson.dumps({**msg, "sequenceNumber": str(self._seq)}).decode())

    async def start(self, **parameters: str) -> None:
        await self.ws.send(orjson.dumps({"event": "connected", "protocol": "Call"}).decode())
        await self.send(
            {
                "event": "start",
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": "AC0000",
                    "streamSid": self.stream_sid,
                    "callSid": "CA0000",
                    "tracks": ["inbound"],
                    "customParameters": parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )

    async def media(self, ulaw: bytes, *, realtime: bool = False) -> None:
        clock = time.monotonic()
        for i in range(0, len(ulaw), MSG):
            self._chunk += 1
            payload = base64.b64encode(ulaw[i : i + MSG]).decode()
            await self.send(
                {
                    "event": "media",
                    "streamSid": self.stream_sid,
                    "media": {
                        "track": "inbound",
                        "chunk": str(self._chunk),
                        "timestamp": str(self._chunk * 20),
                        "payload": payload,
                    },
                }
            )
            if realtime:
                clock += 0.02
                await asyncio.sleep(max(0.0, clock - time.monotonic()))

    async def say(self, ms: int = 400, *, realtime: bool = False) -> None:
        await self.media(
            ulaw_encode(np.concatenate([quiet(100), tone(ms), quiet(400)])), realtime=realtime
        )

    def of(self, event: str, after: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.messages if m.get("event") == event and t >= after]

    async def wait_for(self, pred: Callable[[], Any], limit_s: float = 8.0, what: str = "") -> None:
        deadline = time.monotonic() + limit_s
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = [m.get("event") for _, m in self.messages]
                raise AssertionError(f"timed out waiting for {what}; got {kinds[-20:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def reply(self, after: float, quiet_s: float = 0.4) -> list[tuple[float, dict]]:
        """The media of one reply: from the first message after `after` until `quiet_s` passes
        without one."""
        await self.wait_for(lambda: self.of("media", after), what="the bot's reply")
        while True:
            last = self.of("media", after)[-1][0]
            await asyncio.sleep(quiet_s)
            if self.of("media", after)[-1][0] == last:
                return self.of("media", after)


@contextlib.asynccontextmanager
async def twilio(url: str, **connect: Any) -> AsyncIterator[Twilio]:
    async with websockets.connect(url, **connect) as ws:
        client = Twilio(ws)
        task = asyncio.ensure_future(client.run())
        try:
            yield client
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def pcm_of(media: list[tuple[float, dict]]) -> np.ndarray:
    return np.concatenate([ulaw_decode(base64.b64decode(m["media"]["payload"])) for _, m in media])


# --- tests ---------------------------------------------------------------------------------------


async def test_a_turn_in_mulaw_reaches_stt_as_16k_pcm_and_the_reply_comes_back_paced(
    app: App, bus: Bus
) -> None:
    sid = await app.session(ms_per_word=400)  # "You said tone 300." is 4 words: 1.6 s
    inbound = await listen(bus, app.subjects.data("stt", sid))
    async with twilio(app.url) as tw:
        await tw.start(session_id=sid)
        mark = time.monotonic()
        await tw.say(400)
        media = await tw.reply(after=mark)

    # caller → STT: 20 ms frames of PCM16 at 16 kHz, the caller's 300 Hz kept as 300 Hz (8 kHz
    # samples labelled 16 kHz would read as 150 Hz; unconverted μ-law bytes as noise)
    audio = [f for f in inbound.of(Kind.AUDIO) if f.payload]
    assert audio and {f.sample_rate for f in audio} == {BUS_RATE}
    assert {len(f.payload) for f in audio} == {640}
    samples = np.frombuffer(b"".join(f.payload for f in audio), "<i2")
    assert abs(dominant_hz(samples, BUS_RATE, window=True) - CALLER_HZ) < 10
    assert np.abs(samples).max() > 0.25 * 32767  # the level survived μ-law (0.3 full scale)
    assert app.transcriber.last["sample_rate"] == BUS_RATE

    # bot → Twilio: media on our stream, 20 ms of μ-law each, the 440 Hz tone at 8 kHz
    assert {m["streamSid"] for _, m in media} == {STREAM}
    assert all(set(m) == {"event", "streamSid", "media"} for _, m in media)
    sizes = [len(base64.b64decode(m["media"]["payload"], validate=True)) for _, m in media]
    assert set(sizes) == {MSG}, sizes
    bot = pcm_of(media)
    assert abs(dominant_hz(bot, TWILIO_RATE, window=True) - BOT_HZ) < 10
    duration = len(bot) / TWILIO_RATE
    assert 1.4 < duration < 1.8, duration  # 4 words × 400 ms, all of it
    # paced in real time: a few frames of lead, then one message every 20 ms
    span = media[-1][0] - media[0][0]
    assert 0.8 * duration < span < 1.15 * duration, (span, duration)
    gaps = np.diff([t for t, _ in media])
    assert np.median(gaps) == pytest.approx(0.02, abs=0.006)


async def test_marks_are_sent_and_their_echo_is_read(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    sid = await app.session(ms_per_word=600)  # 2.4 s of reply: two marks
    caplog.set_level(logging.DEBUG, logger="voicemesh.transport.carriers.twilio")
    async with twilio(app.url) as tw:
        await tw.start(session_id=sid)
        mark = time.monotonic()
        await tw.say(400)
        await tw.reply(after=mark)
        marks = tw.of("mark")
    assert len(marks) >= 2
    assert all(m["streamSid"] == STREAM and m["mark"]["name"].startswith("vm-") for _, m in marks)
    played = [r.getMessage() for r in caplog.records if "played mark" in r.getMessage()]
    assert len(played) >= 2, played


async def test_barge_in_sends_clear_and_no_old_audio_follows(app: App) -> None:
    sid = await app.session(ms_per_word=500, replies=["one two three four five six seven eight."])
    async with twilio(app.url) as tw:
        await tw.start(session_id=sid)
        mark = time.monotonic()
        await tw.say(400)
        await tw.wait_for(lambda: len(tw.of("media", mark)) >= 10, what="the bot speaking")
        # the caller talks over the bot, in real time, for 700 ms
        talking = time.monotonic()
        await tw.media(ulaw_encode(tone(700, hz=500)), realtime=True)
        done_talking = time.monotonic()
        clears = tw.of("clear", talking)
        assert len(clears) == 1, [m for _, m in tw.messages[-5:]]
        cleared_at, clear = clears[0]
        assert clear == {"event": "clear", "streamSid": STREAM}
        assert cleared_at - talking < 0.6  # barge_in_speech_ms is 200
        # nothing of the old reply after the clear, while the caller still talks
        assert not [t for t, _ in tw.of("media", cleared_at) if t < done_talking]
        old = tw.of("media", mark)
        assert len(old) < 4 * 8 * 25  # cut off: far less than the 4 s reply
        # the caller's new turn is answered
        await tw.media(ulaw_encode(quiet(400)))
        await tw.reply(after=done_talking)


async def test_stop_ends_the_call(app: App, bus: Bus) -> None:
    sid = await app.session()
    ctl = await listen(bus, app.subjects.ctl(sid))
    async with twilio(app.url) as tw:
        await tw.start(session_id=sid)
        mark = time.monotonic()
        await tw.say(300)
        await tw.reply(after=mark, quiet_s=0.2)
        await tw.send(
            {"event": "stop", "streamSid": STREAM, "stop": {"accountSid": "AC0", "callSid": "CA0"}}
        )
        await asyncio.wait_for(tw.closed.wait(), 5)
        assert tw.close_code == 1000
    await ctl.wait_for(
        lambda fs: any(f.kind is Kind.EVENT and f.as_event.get("type") == "call_end" for f in fs)
    )


def media_message(payload: str, stream: str = STREAM) -> str:
    return orjson.dumps(
        {"event": "media", "streamSid": stream, "media": {"payload": payload}}
    ).decode()


BAD_MESSAGES: list[tuple[str | bytes, str]] = [
    ("not json at all", "is not JSON"),
    ('{"event": "dance"}', "unknown event 'dance'"),
    ('["media"]', "JSON object"),
    (f'{{"event": "media", "streamSid": "{STREAM}"}}', "invalid 'media' message (media: Field"),
    (media_message("!!not-base64!!"), "not valid base64"),
    (media_message("////", stream="MZother"), "media for another stream"),
    # 1.5 s in one message: over the media limit (1 s), under the message cap (16 KiB): dropped
    (media_message(base64.b64encode(bytes(12_000)).decode()), "invalid 'media' message"),
    (b"\x00\x01binary", "binary frame of 8 bytes"),
]


async def test_bad_messages_are_logged_and_the_call_goes_on(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    sid = await app.session()
    caplog.set_level(logging.WARNING, logger="voicemesh.transport.carriers.twilio")
    async with twilio(app.url) as tw:
        await tw.start(session_id=sid)
        for raw, _ in BAD_MESSAGES:
            await tw.ws.send(raw)
        await until(
            lambda: (
                sum("Twilio stream" in r.getMessage() for r in caplog.records) >= len(BAD_MESSAGES)
            ),
            what="a warning per bad message",
        )
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        for _, expected in BAD_MESSAGES:
            assert any(expected in w and STREAM in w for w in warnings), (expected, warnings)
        assert not tw.closed.is_set()
        # the stream is intact: a turn is still heard (as the pitch spoken) and answered
        mark = time.monotonic()
        await tw.say(400)
        media = await tw.reply(after=mark)
        assert abs(dominant_hz(pcm_of(media), TWILIO_RATE, window=True) - BOT_HZ) < 10
    assert HEARD[-1] == "tone 300"  # sample-aligned, at the right rate, after all that


async def test_media_before_start_is_dropped_with_a_warning(
    app: App, caplog: pytest.LogCaptureFixture, bus: Bus
) -> None:
    sid = await app.session()
    inbound = await listen(bus, app.subjects.data("stt", sid))
    caplog.set_level(logging.WARNING, logger="voicemesh.transport.carriers.twilio")
    async with twilio(app.url) as tw:
        await tw.media(ulaw_encode(tone(600)))  # no start yet: nobody knows whose audio this is
        await tw.start(session_id=sid)
        await asyncio.sleep(0.3)
        assert not inbound.of(Kind.AUDIO)  # none of it became a turn
        mark = time.monotonic()
        await tw.say(400)
        await tw.reply(after=mark)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("(not started): media before start: dropped" in w for w in warnings), warnings


async def test_a_stream_that_never_starts_is_closed(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app.service.settings, "twilio_start_timeout_s", 0.3)
    async with twilio(app.url) as tw:
        await tw.ws.send(orjson.dumps({"event": "connected"}).decode())
        await asyncio.wait_for(tw.closed.wait(), 3)
    assert any("sent no start within 0.3 s" in r.getMessage() for r in caplog.records)


async def test_unknown_session_and_agent_are_refused_with_4404(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voicemesh.transport.carriers.twilio")
    for params, expected in (
        ({"session_id": "0" * 32}, "not found"),
        ({"agent": "nobody"}, "agent 'nobody' not found"),
    ):
        async with twilio(app.url) as tw:
            await tw.start(**params)
            await asyncio.wait_for(tw.closed.wait(), 5)
            assert tw.close_code == 4404
        assert any(expected in r.getMessage() and STREAM in r.getMessage() for r in caplog.records)


async def test_api_key_in_custom_parameters_or_query(
    settings: Settings,
    services: Services,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keyed = settings.model_copy(
        update={
            "auth": "required",
            "api_keys": (SecretStr(KEY),),
            "twilio_auth_token": SecretStr(TWILIO_TOKEN),
        }
    )
    caplog.set_level(logging.INFO)
    async with running_app(keyed, services, store, agent_json, transcriber) as app:
        sid = await app.session()
        # refused: no key anywhere, a wrong parameter, a wrong query key (before the start)
        for url, params, why in (
            (app.url, {"session_id": sid}, MISSING_KEY),
            (app.url, {"session_id": sid, "api_key": "k-wrong-0000"}, "invalid API key"),
            (f"{app.url}?api_key=k-wrong-0000", {"session_id": sid, "api_key": KEY}, None),
        ):
            async with twilio(url, additional_headers=signed(url)) as tw:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await tw.start(**params)  # a wrong query key is refused before the start
                await asyncio.wait_for(tw.closed.wait(), 5)
                assert tw.close_code == 4401, (url, params)
            if why:
                assert any(why in r.getMessage() for r in caplog.records), why
        # accepted: the key as a <Parameter>, or in the query string
        for url, params in (
            (app.url, {"session_id": sid, "api_key": KEY}),
            (f"{app.url}?api_key={KEY}", {"session_id": sid}),
        ):
            async with twilio(url, additional_headers=signed(url)) as tw:
                await tw.start(**params)
                mark = time.monotonic()
                await tw.say(300)
                await tw.reply(after=mark, quiet_s=0.2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in logged and "k-wrong-0000" not in logged and TWILIO_TOKEN not in logged


# --- the handshake: X-Twilio-Signature, message size, time to start ---------------------------


def test_signature_is_twilios_documented_algorithm() -> None:
    """Twilio's documented example (and twilio-python's test vector): token 12345, a POST to
    https://mycompany.com/myapp.php?foo=1&bar=2 with these parameters."""
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    assert twilio_sign("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio_module.twilio_signature("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    params.update({"Caller": "+14158675309", "From": "+14158675309"})
    assert twilio_module.twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


async def refused_at_handshake(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status a refused handshake gets (the socket never opens: nothing can be sent)."""
    with pytest.raises(websockets.InvalidStatus) as err:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5):
            pass
    return err.value.response.status_code


async def test_a_stream_without_twilios_signature_is_refused_before_anything_is_read(
    settings: Settings,
    services: Services,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="voicemesh.transport.carriers.twilio")
    tokened = settings.model_copy(
        update={"auth": "off", "twilio_auth_token": SecretStr(TWILIO_TOKEN)}
    )
    async with running_app(tokened, services, store, agent_json, transcriber) as app:
        await store.create_agent("phone", parse_agent_config(app.config()))
        other = app.url.replace("127.0.0.1", "localhost")
        for headers, why in (
            (None, "no X-Twilio-Signature header"),
            (signed(app.url, "another-accounts-token"), "does not match"),
            (signed(other), "does not match"),  # signed for another URL
            (signed(app.url + "?x=1"), "does not match"),
            ({"X-Twilio-Signature": ""}, "no X-Twilio-Signature"),
        ):
            caplog.clear()
            assert await refused_at_handshake(app.url, headers) == 403, headers
            assert any(why in r.getMessage() for r in caplog.records), (headers, caplog.text)
        assert await store.list_configs() == []  # nothing was made for any of them

        # Twilio's own handshake is let in, and the call runs
        async with twilio(app.url, additional_headers=signed(app.url)) as tw:
            await tw.start(agent="phone")
            mark = time.monotonic()
            await tw.say(300)
            await tw.reply(after=mark, quiet_s=0.2)
        assert len(await store.list_configs()) == 1
    assert TWILIO_TOKEN not in caplog.text


async def test_auth_required_and_no_token_refuses_every_stream(
    settings: Settings,
    services: Services,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="voicemesh.transport.carriers.twilio")
    keyed = settings.model_copy(update={"auth": "required", "api_keys": (SecretStr(KEY),)})
    async with running_app(keyed, services, store, agent_json, transcriber) as app:
        sid = await app.session()
        for url in (app.url, f"{app.url}?api_key={KEY}"):  # even with a good API key
            assert await refused_at_handshake(url, signed(url)) == 403
    assert "TWILIO_AUTH_TOKEN is not set: /ws/twilio refuses every stream" in caplog.text
    assert "TWILIO_AUTH_TOKEN is not set, and auth is required" in caplog.text
    assert sid and KEY not in caplog.text


async def test_the_public_url_is_the_one_signed_behind_a_proxy(
    settings: Settings,
    services: Services,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> None:
    public = "wss://voice.example.com/calls"
    proxied = settings.model_copy(
        update={
            "auth": "off",
            "twilio_auth_token": SecretStr(TWILIO_TOKEN),
            "twilio_public_url": public,
        }
    )
    async with running_app(proxied, services, store, agent_json, transcriber) as app:
        sid = await app.session()
        # what Twilio signed: the URL in the TwiML, which the proxy maps to /ws/twilio here
        for twilio_url in (f"{public}/ws/twilio", "wss://voice.example.com:443/calls/ws/twilio"):
            async with twilio(app.url, additional_headers=signed(twilio_url)) as tw:
                await tw.start(session_id=sid)
                mark = time.monotonic()
                await tw.say(300)
                await tw.reply(after=mark, quiet_s=0.2)
        # the URL as this server sees it is not what Twilio signed
        assert await refused_at_handshake(app.url, signed(app.url)) == 403


async def test_an_oversized_message_closes_the_stream_at_once(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voicemesh.transport.carriers.twilio")
    limit = app.service.settings.twilio_max_message_bytes
    assert limit == 16 * 1024  # the default
    sid = await app.session()
    for before_start in (True, False):
        async with twilio(app.url) as tw:
            if not before_start:
                await tw.start(session_id=sid)
            began = time.monotonic()
            await tw.ws.send(orjson.dumps({"event": "media", "pad": "x" * limit}).decode())
            await asyncio.wait_for(tw.closed.wait(), 3)
            assert time.monotonic() - began < 1.0
            assert tw.close_code == 1009
    assert "over the 16384 limit: closed" in caplog.text
    # the service still takes calls
    async with twilio(app.url) as tw:
        await tw.start(session_id=sid)
        mark = time.monotonic()
        await tw.say(300)
        await tw.reply(after=mark, quiet_s=0.2)
