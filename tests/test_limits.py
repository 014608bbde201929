"""The transport's limits on what a caller sends (issue 12, item 5) and secret scrubbing (item 6),
each hit for real: the request body cap, the WebSocket message cap, the utterance length (in the
transport's turn detector and in the STT stage), the caller audio rate, the WebRTC connect
timeout, and the scrubbed logs and 500s. Each limit's test also shows the service still serving
another caller afterwards.

A real uvicorn (tests/support.py's `serving`, with the transport's own uvicorn config), real NATS
and Valkey, the stage services in-process, a loopback STT that hears a tone's pitch.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection

from tests.support import TransportApp, heard, listen, loopback_agent, until
from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects
from voicemesh.config import logging as vm_logging
from voicemesh.config.connectors import TurnOptions
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.pipeline import STTService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.call.audio import FRAME_BYTES
from voicemesh.transport.call.limits import AudioRate, CallerTooFast
from voicemesh.transport.call.turns import TurnDetector

RATE = 16000
SECOND = RATE * 2  # bytes of one second of PCM16 mono
CHUNK = FRAME_BYTES  # 20 ms

# the calls transcribe on a loopback OpenAI-compatible server
pytestmark = pytest.mark.usefixtures("private_egress")


def tone(ms: int, hz: float = 220.0) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


# --- a WebSocket caller ------------------------------------------------------------------------


@dataclass
class Caller:
    ws: Any
    events: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _receive(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, str):
                    self.events.append(orjson.loads(msg))
                    self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    async def wait_for(self, pred: Any, *, limit_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + limit_s
        while True:
            for ev in self.events:
                if pred(ev):
                    return ev
            if self.closed.is_set():
                raise AssertionError(f"the call was closed; events: {self.events}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; events: {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.5)
            except TimeoutError:
                pass

    async def send(self, pcm: bytes, *, realtime: bool = False) -> None:
        clock = time.monotonic()
        for i in range(0, len(pcm), CHUNK):
            await self.ws.send(pcm[i : i + CHUNK])
            if realtime:
                clock += len(pcm[i : i + CHUNK]) / SECOND
                await asyncio.sleep(max(0.0, clock - time.monotonic()))

    async def turn(self) -> None:
        """One short turn, sent at once (well within the burst): its reply must be played."""
        mark = len(self.events)
        await self.send(silence(100) + tone(400) + silence(300))
        started = await self.wait_for(lambda e: e.get("type") == "turn" and e in self.events[mark:])
        await self.wait_for(
            lambda e: e.get("type") == "bot_done" and e.get("epoch") == started["epoch"]
        )


HEARD_BYTES: list[int] = []  # the size of each utterance the loopback STT transcribed


@pytest.fixture(scope="module")
def transcript() -> Any:
    def hear(pcm: bytes) -> str:
        HEARD_BYTES.append(len(pcm))
        return heard(pcm)

    return hear


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    return {"auth": "off", "webrtc_loopback": True, "webrtc_connect_timeout_s": 1.0}


@dataclass
class Server:
    app: TransportApp
    sid: str
    store: ConfigStore

    @property
    def url(self) -> str:
        return self.app.url


@pytest.fixture
async def server(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> Server:
    data = loopback_agent(
        agent_json, transport="websocket", stt_url=transcriber.base_url, ms_per_word=20
    )
    config = parse_agent_config(data)
    await store.create_agent("limits", config)
    sid = (await store.create_session(config)).session_id
    return Server(transport_app, sid, store)


async def connect(server: Server, sid: str | None = None) -> AsyncIterator[Caller]:
    url = server.app.ws(f"/ws/call?session_id={sid or server.sid}")
    async with websockets.connect(url, max_size=None) as ws:
        caller = Caller(ws)
        caller._task = asyncio.ensure_future(caller._receive())
        await caller.wait_for(lambda e: e.get("type") == "session")
        try:
            yield caller
        finally:
            caller._task.cancel()
            await asyncio.gather(caller._task, return_exceptions=True)


def calling(server: Server, sid: str | None = None) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(connect)(server, sid)


async def new_session(server: Server) -> str:
    record = await server.store.get_agent("limits")
    assert record is not None
    return (await server.store.create_session(record.config)).session_id


# --- request body size -------------------------------------------------------------------------


async def test_a_20_mb_config_gets_413_and_nothing_is_stored(
    server: Server, agent_json: dict
) -> None:
    """On main this config was stored whole (201). Now the body is refused on its
    Content-Length, before FastAPI reads it, and the API goes on serving."""
    before = sorted(await server.store.list_configs())
    huge = dict(agent_json)
    huge["llm"] = {**agent_json.get("llm", {}), "prompt": "x" * 20_000_000}
    body = orjson.dumps({"config": huge})
    assert len(body) > 20_000_000
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        try:
            r = await http.post(
                "/api/sessions", content=body, headers={"content-type": "application/json"}
            )
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            r = None  # the server answered and closed before the client finished writing
        if r is not None:
            assert r.status_code == 413, r.text[:200]
            assert "VOICEMESH_MAX_BODY_BYTES" in r.json()["detail"]
        assert sorted(await server.store.list_configs()) == before
        # the same client, a normal body: served
        r = await http.post("/api/sessions", json={"agent": "limits"})
        assert r.status_code == 201, r.text


async def test_a_body_over_the_limit_is_refused_before_it_is_read(server: Server) -> None:
    """A raw request declaring 20 MB and sending only its start: the 413 comes at once, so the
    server neither waited for nor buffered the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    writer.write(
        b"POST /api/sessions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 20000000\r\n\r\n" + b'{"config": {"x": "' + b"x" * 1000
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()


async def test_a_chunked_body_is_cut_off_at_the_limit(server: Server) -> None:
    """No Content-Length (chunked): counted as it streams; the first chunk past 256 KiB gets
    the 413, and the rest of the stream is never read."""
    before = sorted(await server.store.list_configs())
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"config": {"llm": {"prompt": "'
        for _ in range(2000):  # up to 64 MB, if nobody stopped it
            sent += 32 * 1024
            yield b"x" * (32 * 1024)
            await asyncio.sleep(0)
        yield b'"}}}'

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        try:
            r = await http.post(
                "/api/sessions", content=stream(), headers={"content-type": "application/json"}
            )
            assert r.status_code == 413, r.text[:200]
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # answered and closed mid-upload
        assert sent < 8 * 1024 * 1024, sent  # far from all 64 MB was taken
        assert sorted(await server.store.list_configs()) == before
        r = await http.post("/api/sessions", json={"agent": "limits"})
        assert r.status_code == 201, r.text


async def test_a_webrtc_offer_and_a_config_fit_under_the_default_body_limit(
    agent_json: dict,
) -> None:
    settings = Settings()
    assert len(orjson.dumps({"config": agent_json})) * 20 < settings.max_body_bytes
    assert 100_000 < settings.max_body_bytes  # OfferIn takes an SDP of up to 100 000 characters


# --- WebSocket message size ------------------------------------------------------------------


async def test_a_websocket_message_over_the_limit_closes_the_socket_1009(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's own limit is 16 MiB; now it is VOICEMESH_WS_MAX_BYTES (64 KiB) and the
    socket is closed with 1009 from the frame's length alone. Another call then works."""
    async with calling(server) as caller:
        try:
            await caller.ws.send(tone(20_000))  # 640 000 bytes in one message
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(caller.closed.wait(), 5)
        code = caller.ws.close_code
        # 1009 from the close frame; 1006 if the server's close raced the client's write
        assert code in (1009, 1006), code
    await asyncio.sleep(0.2)
    assert any("VOICEMESH_WS_MAX_BYTES" in r.getMessage() for r in caplog.records)
    async with calling(server, await new_session(server)) as other:
        await other.turn()


async def test_a_message_under_the_socket_limit_but_over_2_s_is_dropped(server: Server) -> None:
    """Between 2 s of audio (64 000 bytes) and the socket limit: the carrier's own check drops
    it with an error event naming the format, and the call goes on."""
    async with calling(server) as caller:
        await caller.ws.send(silence(2000) + bytes(2))  # 64 002 bytes
        ev = await caller.wait_for(lambda e: e.get("type") == "error")
        assert "64002" in ev["error"], ev
        await caller.turn()


# --- utterance length --------------------------------------------------------------------------


async def test_the_turn_detector_cuts_a_turn_still_voiced_at_30_s() -> None:
    """40 s of unbroken speech: one turn of exactly 30 s (pre-roll included) ends with `cut`;
    the 10 s that go on are dropped (a turn opened at once would cancel the cut turn's
    transcription); after a pause, the next utterance is a turn as usual. Without the limit, one
    40 s turn."""
    options = TurnOptions(
        vad="energy",
        turn="silence",
        start_speech_ms=60,
        preroll_ms=100,
        end_of_turn_silence_ms=200,
    )
    pcm = silence(200) + tone(40_000) + silence(1000) + tone(1000) + silence(1000)

    async def run(detector: TurnDetector) -> list[tuple[int, Any]]:
        events = []
        for i in range(0, len(pcm), FRAME_BYTES):
            for ev in await detector.push(pcm[i : i + FRAME_BYTES]):
                events.append((i // FRAME_BYTES, ev))
        return events

    events = await run(TurnDetector(options, max_utterance_s=30))
    kinds = [(n, ev.kind, ev.cut) for n, ev in events if ev.kind != "audio"]
    (s1, *_), (e1, _, cut1), (s2, *_), (e2, _, cut2) = kinds
    assert cut1 and not cut2, kinds
    held = sum(len(ev.frames) for n, ev in events if s1 <= n <= e1 and ev.kind != "end")
    assert held == 1500, held  # exactly 30 s went to STT
    assert s2 > (200 + 40_000) // 20  # nothing of the rest of the 40 s opened a turn
    assert e2 > s2
    ends = [ev for _, ev in await run(TurnDetector(options)) if ev.kind == "end"]
    assert len(ends) == 2 and not any(ev.cut for ev in ends)


@pytest.mark.parametrize(
    "transport_settings",
    [{"auth": "off", "caller_audio_max_rate": 100.0, "caller_audio_burst_s": 60.0}],
)
async def test_40_s_of_speech_is_cut_at_30_s_transcribed_and_answered(server: Server) -> None:
    """The call: `user_stopped` with reason max_utterance, that turn's first 30 s transcribed
    (STT got 30 s, not 40) and answered, and after a pause the caller's next turn works. (The
    rate limit is raised here so 40 s can be sent at once; the cut counts audio, not time.)"""
    async with calling(server) as caller:
        await caller.send(silence(200) + tone(40_000) + silence(1000))
        stop = await caller.wait_for(lambda e: e.get("type") == "user_stopped")
        assert stop.get("reason") == "max_utterance", stop
        said = await caller.wait_for(
            lambda e: (
                e.get("type") == "transcript"
                and e.get("role") == "user"
                and e.get("final")
                and e.get("epoch") == stop["epoch"]
            )
        )
        assert said["text"] == "tone 220"
        assert HEARD_BYTES[-1] == 30 * SECOND, HEARD_BYTES
        await caller.wait_for(
            lambda e: e.get("type") == "bot_done" and e.get("epoch") == stop["epoch"]
        )
        await caller.send(tone(600, hz=440) + silence(600))
        nxt = await caller.wait_for(
            lambda e: (
                e.get("type") == "transcript"
                and e.get("role") == "user"
                and e.get("final")
                and e["epoch"] > stop["epoch"]
            )
        )
        assert nxt["text"] == "tone 440"
        stops = [e for e in caller.events if e.get("type") == "user_stopped"]
        assert [e.get("reason") for e in stops] == ["max_utterance", None], stops


async def test_stt_refuses_to_buffer_an_endless_utterance_and_serves_another_session(
    settings: Settings,
    services: Any,
    store: ConfigStore,
    bus: Bus,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> None:
    """A sender that skips the transport (frames straight onto vm.stt.<sid>) streams 40 s with
    no END: STT keeps 32 s (30 + the margin), transcribes them, says why in an error event, and
    drops the rest; on main it buffered all of it. Another session is then served as usual."""
    data = loopback_agent(agent_json, transport="websocket", stt_url=transcriber.base_url)
    config = parse_agent_config(data)
    subjects = Subjects(settings.subject_prefix)
    await services.start(STTService)
    sids = [(await store.create_session(config)).session_id for _ in range(2)]
    inboxes = [await listen(bus, subjects.data("transport", sid)) for sid in sids]
    for sid in sids:
        body = orjson.dumps({"session_id": sid})
        await bus.nc.request(subjects.assign("stt"), body, timeout=5)

    async def utterance(sid: str, pcm: bytes, *, end: bool) -> None:
        await bus.publish(subjects.ctl(sid), Frame.event({"type": "turn", "epoch": 1}, epoch=1))
        n = 0
        for n, i in enumerate(range(0, len(pcm), FRAME_BYTES)):
            flags = Flag.START if n == 0 else Flag.NONE
            chunk = pcm[i : i + FRAME_BYTES]
            frame = Frame.audio(chunk, sample_rate=RATE, epoch=1, seq=n, flags=flags)
            await bus.publish(subjects.data("stt", sid), frame)
        if end:
            await bus.publish(
                subjects.data("stt", sid),
                Frame.audio(b"", sample_rate=RATE, epoch=1, seq=n + 1, flags=Flag.END),
            )

    def events(frames: list[Frame]) -> list[dict[str, Any]]:
        return [f.as_event for f in frames if f.kind is Kind.EVENT]

    await utterance(sids[0], tone(40_000), end=False)
    got = await inboxes[0].wait_for(
        lambda fs: (
            any(e.get("final") for e in events(fs))
            and any(e["type"] == "error" for e in events(fs))
        ),
        15,
    )
    (error,) = [e for e in events(got) if e["type"] == "error"]
    assert "VOICEMESH_MAX_UTTERANCE_S" in error["error"] and error["stage"] == "stt", error
    (final,) = [e for e in events(got) if e.get("final")]
    assert final["text"] == "tone 220"
    assert transcriber.last["pcm_bytes"] == 32 * SECOND  # what was held, not the 40 s sent

    await utterance(sids[1], tone(600, hz=440), end=True)
    got = await inboxes[1].wait_for(lambda fs: any(e.get("final") for e in events(fs)), 10)
    (final,) = [e for e in events(got) if e.get("final")]
    assert final["text"] == "tone 440"
    assert not [e for e in events(got) if e["type"] == "error"]


# --- caller audio rate -------------------------------------------------------------------------


def test_the_audio_rate_allows_real_time_and_a_burst_and_refuses_a_flood() -> None:
    now = [0.0]
    rate = AudioRate(1.5, 2.0, clock=lambda: now[0])
    for _ in range(60 * 50):  # a minute of 20 ms frames in real time
        rate.take(FRAME_BYTES)
        now[0] += 0.02
    rate.take(2 * SECOND - FRAME_BYTES)  # then a 2 s catch-up burst at once: allowed
    now[0] += 5
    rate.take(SECOND)  # quiet for 5 s: the credit refills, but only up to the 2 s burst...
    with pytest.raises(CallerTooFast, match=r"1\.5x real time"):
        rate.take(2 * SECOND)  # ...so 5 quiet seconds do not buy 7.5 s of audio at once


async def test_a_caller_sending_10_s_in_1_s_is_refused_with_4429(server: Server) -> None:
    """On main the transport took audio at any speed. Now 10 s sent within 1 s ends the call
    with an error event and close code 4429; a caller in real time on the same transport is not
    refused, and a new call works after it."""

    async def real_time_caller() -> None:
        async with calling(server, await new_session(server)) as caller:
            await caller.send(silence(200) + tone(600) + silence(3200), realtime=True)
            assert not caller.closed.is_set()
            assert not [e for e in caller.events if e.get("type") == "error"], caller.events

    honest = asyncio.create_task(real_time_caller())
    async with calling(server) as caller:
        t0 = time.monotonic()
        try:
            for i in range(0, 10 * SECOND, 10 * SECOND // 50):
                await caller.ws.send(silence(200))  # 50 messages of 200 ms over 1 s
                await asyncio.sleep(max(0.0, t0 + (i / (10 * SECOND)) - time.monotonic()))
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(caller.closed.wait(), 5)
        errors = [e["error"] for e in caller.events if e.get("type") == "error"]
        assert errors and "real time" in errors[0], caller.events
        assert caller.ws.close_code == 4429
    await honest
    async with calling(server, await new_session(server)) as other:
        await other.turn()


# --- WebRTC connect timeout --------------------------------------------------------------------


async def test_a_webrtc_offer_that_never_connects_is_closed_after_the_timeout(
    server: Server, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends an offer and never applies the answer, so ICE never completes. With
    VOICEMESH_WEBRTC_CONNECT_TIMEOUT_S at 1 s the call ends (call_end on vm.ctl) and its peer
    connection is forgotten; on main it was held for 60 s."""
    caplog.set_level(logging.INFO, logger="voicemesh.transport.carriers.webrtc")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sid = await new_session(server)
        subjects = server.app.service.subjects
        ctl = await listen(bus, subjects.ctl(sid))
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            offer = {
                "sdp": pc.localDescription.sdp,
                "type": "offer",
                "request_data": {"session_id": sid},
            }
            r = await http.post("/api/offer", json=offer)
            assert r.status_code == 200, r.text
            pc_id = r.json()["pc_id"]
            t0 = time.monotonic()
            await ctl.wait_for(
                lambda fs: any(
                    f.kind is Kind.EVENT and f.as_event["type"] == "call_end" for f in fs
                ),
                5,
            )
            assert 0.8 < time.monotonic() - t0 < 4
            r = await http.patch("/api/offer", json={"pc_id": pc_id, "candidates": []})
            assert r.status_code == 404  # the peer connection is gone
            # and so is the handler of its ICE server list: a config naming ever new lists
            # cannot grow the transport's handlers without end
            await until(lambda: "their handler is closed" in caplog.text, 5)
    finally:
        await pc.close()
    async with calling(server, await new_session(server)) as other:
        await other.turn()


# --- scrubbed logs and 500s --------------------------------------------------------------------

SECRET = "sk-live-0123456789abcdefSECRET"
NATS_PW = "natspassw0rd-xyz"


@pytest.fixture
def real_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging as `voicemesh serve` runs it; the root logger is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = ("nats", "uvicorn.access", "httpx", "faster_whisper", "piper", "aioice", "aiortc")
    levels = {name: logging.getLogger(name).level for name in noisy}
    own = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
        for name in vm_logging.UVICORN_LOGGERS
    }
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in levels.items():
        logging.getLogger(name).setLevel(was)
    for name, (kept, propagate) in own.items():
        logging.getLogger(name).handlers[:] = kept
        logging.getLogger(name).propagate = propagate
    vm_logging.set_secret_values(())


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_traceback_is_printed_with_secrets_masked(
    real_logging: None, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    settings = Settings(
        nats_url="nats://127.0.0.1:4222", nats_user="vm", nats_password=NATS_PW, api_keys="k" * 20
    )
    vm_logging.setup_logging("INFO", fmt, settings=settings)
    log = logging.getLogger("voicemesh.test")
    try:
        raise RuntimeError(
            f"provider said 401 for key {SECRET}; headers={{'Authorization': 'Bearer abc.def'"
            f", 'xi-api-key': 'eleven123', 'Ocp-Apim-Subscription-Key': 'azure1234'}} "
            f"nats://vm:{NATS_PW}@nats:4222 api_key={'k' * 20}"
        )
    except RuntimeError:
        log.exception("turn failed: %s", SECRET)
    out = capsys.readouterr().err
    assert "Traceback" in out and "RuntimeError" in out, out
    for secret in (SECRET, NATS_PW, "abc.def", "eleven123", "azure1234", "k" * 20):
        assert secret not in out, (secret, out)
    assert "***" in out


def test_tenant_keys_and_the_twilio_token_are_masked_by_value(
    real_logging: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bare key in a message has no header or `api_key=` around it: only its value can
    catch it, for every place a key comes from."""
    from voicemesh.transport.api.tenants import Tenants

    env_key, file_key, token = (
        "acme-env-key-0123456789",
        "beta-file-key-9876543210",
        "twl0123456789",
    )
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(orjson.dumps({"tenants": {"beta": {"keys": [file_key]}}}).decode())
    settings = Settings(
        tenant_keys=f"acme:{env_key}", keys_file=str(keys_file), twilio_auth_token=token
    )
    vm_logging.setup_logging("INFO", "text", settings=settings)
    Tenants(settings)  # reads the keys file: its keys join what is masked
    logging.getLogger("voicemesh.test").warning("keys %s %s %s", env_key, file_key, token)
    out = capsys.readouterr().err
    assert "keys" in out
    for secret in (env_key, file_key, token):
        assert secret not in out, (secret, out)


async def test_an_unexpected_error_is_a_generic_500_and_its_traceback_is_scrubbed(
    real_logging: None,
    server: Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm_logging.setup_logging("INFO", "text")
    store = server.app.service.store

    async def broken(**_: object) -> list[str]:
        raise RuntimeError(f"valkey said: wrong password {SECRET}")

    original = store.list_configs
    monkeypatch.setattr(store, "list_configs", broken)
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/api/sessions")
        assert r.status_code == 500
        assert r.json() == {"detail": "internal server error"}
        assert SECRET not in r.text and "Traceback" not in r.text
        monkeypatch.setattr(store, "list_configs", original)
        assert (await http.get("/api/sessions")).status_code == 200  # still serving
    await asyncio.sleep(0.1)
    err = capsys.readouterr().err
    assert "Traceback" in err and "wrong password ***" in err, err
    assert SECRET not in err


def test_an_exception_with_a_secret_logged_through_a_library_logger_is_scrubbed(
    real_logging: None,
) -> None:
    """uvicorn and pipecat log through their own loggers: the root handler's formatter still
    masks what they print, in the message and in the exception text."""
    vm_logging.setup_logging("INFO", "text")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        raise ValueError(f"connect to https://user:{NATS_PW}@host failed, token {SECRET}")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    out = stream.getvalue()
    assert "Exception in ASGI application" in out and "ValueError" in out
    assert NATS_PW not in out and SECRET not in out, out
