"""The WebSocket call endpoint fed input in the wrong format, over a real uvicorn (on a free
loopback port, in the test's event loop) with the real servers and the stage services in-process.

The contract (voicemesh/transport/carriers/websocket.py): binary messages are raw PCM16 mono
16 kHz, text messages are JSON control messages ({"type": "end"} hangs up). "Rejected with a
clear error" means: the message is dropped whole (nothing of it reaches the turn detector, so the
audio that follows stays sample-aligned), the caller gets an `error` event that names the expected
format, and the call stays up: a later valid turn is answered.
"""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
import websockets

from tests.support import TransportApp, loopback_agent
from voicemesh.bus import Bus, Frame, Kind, Subjects, encode
from voicemesh.config.models import parse_agent_config
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript
from voicemesh.transport.api.service import TransportService

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

RATE = 16000
CHUNK = 640  # 20 ms
FORMAT = "PCM16 mono 16 kHz"
AMPLITUDE = 0.3
CLEAN, GARBLED = "clean audio", "garbled audio"


def speech(ms: int) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (AMPLITUDE * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


def clean_or_garbled(pcm: bytes) -> str:
    """What the loopback STT 'hears': the tone as sent, or the noise a stream shifted by one byte
    becomes (each int16 made of two halves of neighbouring samples)."""
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(np.int32)
    if samples.size == 0:
        return ""
    return CLEAN if np.abs(samples).max() <= AMPLITUDE * 32767 * 1.05 else GARBLED


def wav_file(pcm: bytes, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    return clean_or_garbled


@dataclass
class Server:
    url: str
    sid: str
    service: TransportService
    subjects: Subjects


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
    sid = (await store.create_session(parse_agent_config(data))).session_id
    service = transport_app.service
    return Server(transport_app.ws("/ws/call"), sid, service, service.subjects)


@dataclass
class Caller:
    ws: Any
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def receive(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    self.audio += msg
                else:
                    self.events.append(orjson.loads(msg))
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], *, after: int = 0, limit_s: float = 5.0
    ) -> dict[str, Any]:
        """The first event from index `after` on that satisfies `pred`."""
        deadline = asyncio.get_running_loop().time() + limit_s
        while True:
            for ev in self.events[after:]:
                if pred(ev):
                    return ev
            if self.closed.is_set():
                raise AssertionError(f"the call was closed; events: {self.events}")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"timed out; events: {self.events[after:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    async def error_after(self, mark: int, limit_s: float = 2.0) -> str:
        ev = await self.wait_for(lambda e: e.get("type") == "error", after=mark, limit_s=limit_s)
        assert isinstance(ev.get("error"), str) and ev["error"], ev
        return ev["error"]

    async def send_audio(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), CHUNK):
            await self.ws.send(pcm[i : i + CHUNK])

    async def turn(self, *, limit_s: float = 10.0) -> dict[str, Any]:
        """Speak one utterance of clean tone; the reply must come back in full."""
        mark = len(self.events)
        await self.send_audio(silence(100) + speech(400) + silence(300))
        started = await self.wait_for(lambda e: e.get("type") == "turn", after=mark)
        epoch = started["epoch"]
        await self.wait_for(
            lambda e: e.get("type") == "bot_done" and e.get("epoch") == epoch,
            after=mark,
            limit_s=limit_s,
        )
        said = [
            e
            for e in self.events[mark:]
            if e.get("type") == "transcript" and e.get("role") == "user" and e.get("final")
        ]
        assert [e["text"] for e in said] == [CLEAN], said
        errors = [e for e in self.events[mark:] if e.get("type") == "error"]
        assert not errors, errors
        return started


@pytest.fixture
async def caller(server: Server) -> AsyncIterator[Caller]:
    async with websockets.connect(f"{server.url}?session_id={server.sid}", max_size=None) as ws:
        c = Caller(ws)
        task = asyncio.ensure_future(c.receive())
        hello = await c.wait_for(lambda e: True)
        assert hello == {"type": "session", "session_id": server.sid, "version": 1}
        await c.turn()  # a clean turn works before anything bad is sent
        try:
            yield c
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- binary messages in the wrong format -----------------------------------------------------


async def test_odd_number_of_bytes_is_rejected_and_the_stream_stays_aligned(
    caller: Caller,
) -> None:
    mark = len(caller.events)
    await caller.ws.send(speech(20) + b"\x01")  # 641 bytes: half a sample too many
    error = await caller.error_after(mark)
    assert FORMAT in error and "641" in error, error
    # the half sample was not kept: the next utterance reaches STT as sent, not shifted
    await caller.turn()


async def test_single_odd_byte_messages_are_rejected(caller: Caller) -> None:
    for n in (1, 3, 639):
        mark = len(caller.events)
        await caller.ws.send(bytes(n))
        assert FORMAT in await caller.error_after(mark)
    await caller.turn()


async def test_wav_file_is_rejected_with_the_expected_format(caller: Caller) -> None:
    mark = len(caller.events)
    await caller.ws.send(wav_file(speech(300)))  # RIFF/WAVE header, then 16 kHz PCM16 mono
    error = await caller.error_after(mark)
    assert "WAV" in error and f"{FORMAT}, raw, no WAV header" in error, error
    # nothing of it was taken as audio: no turn was opened by the file's samples
    assert not [e for e in caller.events[mark:] if e.get("type") == "turn"]
    await caller.turn()


async def test_wav_file_in_chunks_is_rejected_at_its_header(caller: Caller) -> None:
    """A client streaming a WAV file in 20 ms chunks: the first chunk starts with the header."""
    mark = len(caller.events)
    data = wav_file(speech(100) + silence(300), rate=22050)
    await caller.ws.send(data[:CHUNK])
    error = await caller.error_after(mark)
    assert "WAV" in error and FORMAT in error, error
    await caller.turn()


async def test_huge_binary_message_is_rejected(caller: Caller) -> None:
    """Over 2 s of audio in one message: no microphone sends that. It is refused whole (not run
    through VAD and onto the bus as one long utterance) and the call goes on. (A message over
    VOICEMESH_WS_MAX_BYTES, 64 KiB, never reaches the carrier: the socket is closed with 1009,
    tests/test_limits.py; this one is just under it.)"""
    mark = len(caller.events)
    huge = speech(2_040)
    assert 64_000 < len(huge) <= 64 * 1024
    await caller.ws.send(huge)
    error = await caller.error_after(mark, limit_s=5)
    assert FORMAT in error and str(len(huge)) in error, error
    assert not [e for e in caller.events[mark:] if e.get("type") == "turn"]
    await caller.turn()


async def test_empty_binary_message_is_harmless(caller: Caller) -> None:
    await caller.ws.send(b"")
    await caller.turn()


# --- text messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello", "{", "end", "\u00ff\u00fe", "{'type': 'end'}"])
async def test_text_that_is_not_json_gets_an_error(caller: Caller, text: str) -> None:
    mark = len(caller.events)
    await caller.ws.send(text)
    assert "JSON" in await caller.error_after(mark)
    await caller.turn()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "dance"},
        {"type": "END"},
        {"type": None},
        {"type": ["end"]},
        {"kind": "end"},
        {},
        [1, 2],
        ["end"],
        "end",
        42,
        None,
    ],
    ids=repr,
)
async def test_json_control_message_of_unknown_type_gets_an_error(
    caller: Caller, message: Any
) -> None:
    mark = len(caller.events)
    await caller.ws.send(orjson.dumps(message).decode())
    error = await caller.error_after(mark)
    assert '"end"' in error or "'end'" in error, error  # it names what is understood
    await caller.turn()


async def test_end_still_hangs_up_after_bad_messages(caller: Caller) -> None:
    await caller.ws.send(b"\x01")
    await caller.ws.send("not json")
    await caller.ws.send(orjson.dumps({"type": "dance"}).decode())
    await caller.ws.send(orjson.dumps({"type": "end"}).decode())
    await asyncio.wait_for(caller.closed.wait(), 5)


async def test_a_flood_of_malformed_messages_hangs_up(caller: Caller) -> None:
    """Each bad message is answered with an error event, queued for a client that may never
    read, and spends no audio rate: past MAX_BAD_MESSAGES the call ends (1008)."""
    from voicemesh.transport.carriers.websocket import MAX_BAD_MESSAGES

    for _ in range(MAX_BAD_MESSAGES + 5):
        try:
            await caller.ws.send(b"\x01")
        except websockets.ConnectionClosed:
            break
    await asyncio.wait_for(caller.closed.wait(), 5)
    assert any("malformed messages: hung up" in (e.get("error") or "") for e in caller.events)


async def test_deleting_the_session_hangs_up_the_call(server: Server, caller: Caller) -> None:
    """The session deleted through the API mid-call: the caller is told why, then hung up."""
    mark = len(caller.events)
    await server.service.store.delete_config(server.sid)
    await server.service.session_deleted(server.sid)
    error = await caller.error_after(mark)
    assert error == f"session {server.sid} was deleted"
    await asyncio.wait_for(caller.closed.wait(), 5)
    assert caller.ws.close_code == 4404


# --- junk on the call's own egress subject ---------------------------------------------------


async def test_junk_on_the_transport_subject_does_not_end_the_call(
    server: Server, caller: Caller, bus: Bus
) -> None:
    subject = server.subjects.data("transport", server.sid)
    for junk in (
        b"",
        b"garbage",
        encode(Frame.audio(b"\x00\x01\x02", sample_rate=22050)),
        encode(Frame(Kind.EVENT, b"not json", epoch=1 << 30)),
        encode(Frame(Kind.EVENT, b"[1, 2]", epoch=1 << 30)),
        encode(Frame(Kind.TEXT, b"\xff", epoch=1 << 30)),
    ):
        await bus.nc.publish(subject, junk)
    await bus.nc.flush()
    await asyncio.sleep(0.2)
    assert not caller.closed.is_set()
    await caller.turn()
