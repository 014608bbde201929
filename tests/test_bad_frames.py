"""Bad input on every NATS subject the services listen on, with the stage services (and the
transport's config manager) running in-process on the real servers.

Frame subjects (`<p>.stt|llm|tts|ctl.<sid>`): malformed bytes are dropped, counted in
`voicemesh_frames_dropped_total` and warned about once per subject family per instance, and the
service answers a normal turn afterwards. Request/broadcast subjects (`<p>.config.update`,
`<p>.assign.stt`, `<p>.config.get.<sid>`, `<p>.health.<role>`, `<p>.connector.health.<stage>`) carry
JSON, not frames: garbage there gets an error reply or is ignored, never kills a subscription.

The full turn used as "still works": audio → STT (OpenAI transcriptions API on a loopback server)
→ LLM (`scripted`) → TTS (`tone`) → the transport's subject, all on the services under test.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from nats.errors import MaxPayloadError
from prometheus_client import REGISTRY

from tests.conftest import Servers
from tests.support import Inbox, Services, has_last, listen, until
from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects, encode
from voicemesh.bus.codec import HEADER, HEADER_SIZE, MAX_PAYLOAD, VERSION, FrameError, decode
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.pipeline import LLMService, STTService, TTSService
from voicemesh.servers import free_port, nats_server_binary
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.api.service import TransportService

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

HEARD = "turn the lights on"
RATE = 16000
FRAME = 640  # 20 ms of PCM16 mono at 16 kHz

# --- the bad frames --------------------------------------------------------------------------

GOOD_TEXT = encode(Frame.text("hello", epoch=1))


def with_header(
    *, version: int = VERSION, kind: int = Kind.TEXT, rate: int = 0, ch: int = 0
) -> bytes:
    return HEADER.pack(version, kind, 0, 1, 0, 0, rate, ch, time.time_ns())


JUNK: dict[str, bytes] = {
    "empty": b"",
    "garbage": b"\xde\xad\xbe\xef not a frame \x00\xff",
    "one-byte": GOOD_TEXT[:1],
    "truncated-header": GOOD_TEXT[: HEADER_SIZE - 1],
    "version-0": with_header(version=0) + b"hello",
    "version-2": with_header(version=VERSION + 1) + b"hello",
    "version-255": with_header(version=255) + b"hello",
    "kind-0": with_header(kind=0) + b"hello",
    "kind-4": with_header(kind=4) + b"hello",
    "kind-255": with_header(kind=255) + b"hello",
    "odd-pcm": encode(Frame.audio(bytes(FRAME + 1), sample_rate=RATE)),
    "half-sample": encode(Frame.audio(b"\x01", sample_rate=RATE)),
    "stereo-odd-pcm": encode(Frame.audio(bytes(6), sample_rate=RATE, channels=2)),
    "audio-0-channels": with_header(kind=Kind.AUDIO, rate=RATE, ch=0) + bytes(FRAME),
    "audio-9-channels": with_header(kind=Kind.AUDIO, rate=RATE, ch=9) + bytes(FRAME),
    "audio-0-hz": with_header(kind=Kind.AUDIO, rate=0, ch=1) + bytes(FRAME),
    "audio-1-ghz": with_header(kind=Kind.AUDIO, rate=10**9, ch=1) + bytes(FRAME),
    "json-not-frame": orjson.dumps({"type": "turn", "epoch": 1}),
    "riff-wav": b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64),
}


@pytest.mark.parametrize("name", sorted(JUNK))
def test_the_junk_is_refused_by_the_codec(name: str) -> None:
    with pytest.raises(FrameError):
        decode(JUNK[name])


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transcript() -> str:
    return HEARD


def agent(agent_json: dict, transcriber_url: str) -> dict[str, Any]:
    data = copy.deepcopy(agent_json)
    data["connectors"]["stt"] = {
        "primary": "openai",
        "config": {"openai": {"base_url": transcriber_url}},
    }
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {"scripted": {"replies": ["You said {user}."]}},
    }
    data["connectors"]["tts"] = {"primary": "tone", "config": {"tone": {"ms_per_word": 20}}}
    return data


def speech(ms: int = 200) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


@dataclass
class Pipeline:
    """The stage services and the transport's config manager on one session."""

    bus: Bus
    subjects: Subjects
    store: ConfigStore
    sid: str
    stt: STTService
    llm: LLMService
    tts: TTSService
    transport: TransportService
    out: Inbox  # the session's transport subject: events and bot audio
    epoch: int = 0

    @property
    def stages(self) -> list[Any]:
        return [self.stt, self.llm, self.tts]

    async def assign(self) -> dict[str, Any]:
        body = orjson.dumps({"session_id": self.sid})
        reply = await self.bus.nc.request(self.subjects.assign("stt"), body, timeout=2)
        return orjson.loads(reply.data)

    async def turn(self, limit_s: float = 5.0) -> None:
        """One whole turn, as the transport sends it: it must complete with audio back."""
        self.epoch += 1
        epoch = self.epoch
        await self.bus.publish(
            self.subjects.ctl(self.sid),
            Frame.event({"type": "turn", "epoch": epoch}, epoch=epoch),
        )
        pcm = speech()
        stt = self.subjects.data("stt", self.sid)
        for seq, i in enumerate(range(0, len(pcm), FRAME)):
            flags = Flag.START if seq == 0 else Flag.NONE
            frame = Frame.audio(
                pcm[i : i + FRAME], sample_rate=RATE, epoch=epoch, seq=seq, flags=flags
            )
            await self.bus.publish(stt, frame)
        end = Frame.audio(b"", sample_rate=RATE, epoch=epoch, seq=len(pcm) // FRAME, flags=Flag.END)
        await self.bus.publish(stt, end)

        def complete(fs: list[Frame]) -> bool:
            # the end-of-reply marker is a unit of its own: it may overtake the audio before it
            heard = any(f.kind is Kind.AUDIO and f.payload and f.epoch == epoch for f in fs)
            return heard and has_last(fs, epoch)

        frames = await self.out.wait_for(complete, limit_s=limit_s)
        mine = [f for f in frames if f.epoch == epoch]
        events = [f.as_event for f in mine if f.kind is Kind.EVENT]
        said = [e["text"] for e in events if e.get("type") == "transcript"]
        # the reply's units: its first five words, then the rest of the sentence
        assert said[0] == HEARD and " ".join(said[1:]) == f"You said {HEARD}.", events
        audio = b"".join(f.payload for f in mine if f.kind is Kind.AUDIO)
        assert len(audio) > 0, "the turn completed with no audio"


@pytest.fixture
async def pipeline(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> Pipeline:
    transcriber.heal()
    config = parse_agent_config(agent(agent_json, transcriber.base_url))
    sid = (await store.create_session(config)).session_id
    out = await listen(bus, subjects.data("transport", sid))
    p = Pipeline(
        bus=bus,
        subjects=subjects,
        store=store,
        sid=sid,
        stt=await services.start(STTService),
        llm=await services.start(LLMService),
        tts=await services.start(TTSService),
        transport=await services.start(TransportService),
        out=out,
    )
    assert "owner" in await p.assign()
    await p.turn()  # it works before anything bad arrives
    return p


def dropped(family: str) -> float:
    return REGISTRY.get_sample_value("voicemesh_frames_dropped_total", {"subject": family}) or 0.0


def drop_warnings(caplog: pytest.LogCaptureFixture, family: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "voicemesh.bus.bus"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith(f"dropped malformed frame on {family}.")
    ]


async def all_alive(p: Pipeline) -> None:
    """Every role still answers its health ping."""
    for role in ("stt", "llm", "tts", "transport"):
        reply = await p.bus.nc.request(p.subjects.health(role), b"", timeout=2)
        assert orjson.loads(reply.data)["role"] == role


# --- frame subjects --------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["stt", "llm", "tts", "ctl"])
async def test_malformed_frames_are_dropped_counted_and_logged_once(
    stage: str, pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    p = pipeline
    caplog.set_level(logging.WARNING, logger="voicemesh.bus.bus")
    family = f"{p.subjects.prefix}.{stage}"
    subject = f"{family}.{p.sid}"
    # who listens on the family: ctl goes to every stage, data to its stage (one instance here)
    listeners = p.stages if stage == "ctl" else [getattr(p, stage)]
    before = [s.bus.dropped for s in listeners]
    counted_before = dropped(family)

    rounds = 3
    for _ in range(rounds):
        for junk in JUNK.values():
            await p.bus.nc.publish(subject, junk)
    await p.bus.nc.flush()
    total = rounds * len(JUNK)
    await until(
        lambda: [s.bus.dropped for s in listeners] == [b + total for b in before],
        what=f"{total} frames dropped by each listener of {family}",
    )
    assert dropped(family) == counted_before + total * len(listeners)
    # one warning per instance for the whole family, however many frames and sessions
    if stage != "stt":  # (an STT instance listens to the sessions it owns only)
        await p.bus.nc.publish(f"{family}.OtherSession123", JUNK["garbage"])
        await p.bus.nc.flush()
        await until(
            lambda: [s.bus.dropped for s in listeners] == [b + total + 1 for b in before],
            what="the frame for another session to be dropped",
        )
    warned = drop_warnings(caplog, family)
    assert len(warned) == len(listeners), [r.getMessage() for r in warned]
    # and nothing else was counted: no other family moved
    for other in ("stt", "llm", "tts", "ctl"):
        if other != stage:
            assert not drop_warnings(caplog, f"{p.subjects.prefix}.{other}")

    await p.turn()
    await all_alive(p)


async def test_oversized_frames_cannot_cross_the_default_server(pipeline: Pipeline) -> None:
    """A frame with a payload over the codec's MAX_PAYLOAD (1 MiB) is already over NATS's default
    max_payload (1 MiB for the whole message): the client refuses to publish it, so on a default
    server the codec-level limit is never reached (see the next test for a server that allows
    more)."""
    p = pipeline
    assert p.bus.nc.max_payload <= HEADER_SIZE + MAX_PAYLOAD
    big = with_header() + b"x" * (MAX_PAYLOAD + 1)
    with pytest.raises(MaxPayloadError):
        await p.bus.nc.publish(p.subjects.data("llm", p.sid), big)
    with pytest.raises(MaxPayloadError):
        await p.bus.publish(p.subjects.data("tts", p.sid), Frame.text("y" * (MAX_PAYLOAD + 1)))
    # the largest message the server takes, of garbage, is dropped like any other
    family = f"{p.subjects.prefix}.llm"
    before = p.llm.bus.dropped
    await p.bus.nc.publish(f"{family}.{p.sid}", b"\xff" * p.bus.nc.max_payload)
    await until(lambda: p.llm.bus.dropped == before + 1, what="the big garbage to be dropped")
    await p.turn()


@dataclass
class BigNats:
    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def big_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigNats]:
    """A NATS server that carries messages of up to 2 MiB, so a frame just over the codec's
    limit reaches the services."""
    data = tmp_path_factory.mktemp("bignats")
    port = free_port()
    conf = data / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\nmax_payload: {2 * MAX_PAYLOAD}\n")
    log = (data / "nats.log").open("wb")
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None, (data / "nats.log").read_text()
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.02)
    yield BigNats(f"nats://127.0.0.1:{port}", proc)
    proc.terminate()
    proc.wait(10)
    log.close()


async def test_frame_just_over_the_codec_limit_is_dropped(
    big_nats: BigNats,
    servers: Servers,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="voicemesh.bus.bus")
    prefix = f"b{uuid.uuid4().hex[:10]}"
    settings = Settings(
        nats_url=big_nats.url,
        valkey_url=servers.valkey.url,
        subject_prefix=prefix,
        key_prefix=prefix,
        preload=False,
    )
    subjects = Subjects(prefix)
    store = ConfigStore.from_url(servers.valkey.url, key_prefix=prefix)
    bus = await Bus.connect(big_nats.url, name="test-big")
    services = Services(settings)
    try:
        assert bus.nc.max_payload >= HEADER_SIZE + MAX_PAYLOAD + 1
        config = parse_agent_config(agent(agent_json, transcriber.base_url))
        sid = (await store.create_session(config)).session_id
        tts_in = await listen(bus, subjects.data("tts", sid))
        llm = await services.start(LLMService)
        await services.start(TTSService)

        family = f"{prefix}.llm"
        over = with_header() + b"a " * ((MAX_PAYLOAD + 2) // 2)
        assert len(over) - HEADER_SIZE > MAX_PAYLOAD
        await bus.nc.publish(f"{family}.{sid}", over)
        await bus.nc.publish(f"{family}.{sid}", over)
        await bus.nc.flush()
        await until(lambda: llm.bus.dropped == 2, what="both oversized frames to be dropped")
        assert dropped(family) == 2
        warned = drop_warnings(caplog, family)
        assert len(warned) == 1 and f"exceeds {MAX_PAYLOAD}" in warned[0].getMessage()
        assert tts_in.frames == []

        # exactly at the limit is still a frame: decoded, not dropped (audio, which the LLM
        # stage ignores, so the test does not wait for a reply to 1 MiB of text)
        at_limit = Frame.audio(bytes(MAX_PAYLOAD), sample_rate=RATE, epoch=1)
        await bus.publish(f"{family}.{sid}", at_limit)
        await bus.publish(f"{family}.{sid}", Frame.text("first", epoch=1))
        await tts_in.wait_for(lambda fs: has_last(fs, 1))
        assert llm.bus.dropped == 2
        await bus.publish(f"{family}.{sid}", Frame.text("small", epoch=2))
        frames = await tts_in.wait_for(lambda fs: has_last(fs, 2))
        assert [f.as_text for f in frames if f.epoch == 2] == ["You said small.", ""]
    finally:
        for svc in reversed(list(services.running)):
            await services.stop(svc)
        await bus.close()
        await store.close()


# --- valid frames, bad payloads --------------------------------------------------------------

BAD_EVENTS: dict[str, bytes] = {
    "not-json": b"not json",
    "truncated-json": b'{"type": "turn", "epoch"',
    "not-utf8": b"\xff\xfe\xfd",
    "empty": b"",
    "array": b"[1, 2]",
    "string": b'"turn"',
    "null": b"null",
    "epoch-text": b'{"type": "turn", "epoch": "seven"}',
    "epoch-null": b'{"type": "interrupt", "epoch": null}',
    "epoch-object": b'{"type": "turn", "epoch": {"n": 1}}',
    "epoch-inf": b'{"type": "turn", "epoch": 1e400}',
    "type-object": b'{"type": {"turn": 1}}',
    "type-unknown": b'{"type": "explode"}',
}


async def test_valid_frames_with_bad_payloads_do_not_kill_anything(pipeline: Pipeline) -> None:
    p = pipeline
    ctl = p.subjects.ctl(p.sid)
    for body in BAD_EVENTS.values():
        await p.bus.publish(ctl, Frame(Kind.EVENT, body, epoch=p.epoch))
    # Text that is not UTF-8, and frames of the wrong kind, on the data subjects.
    for stage in ("llm", "tts"):
        subject = p.subjects.data(stage, p.sid)
        await p.bus.publish(subject, Frame(Kind.TEXT, b"\xff\xfe bad", epoch=p.epoch + 1))
        await p.bus.publish(subject, Frame(Kind.EVENT, b"not json", epoch=p.epoch + 1))
        await p.bus.publish(subject, Frame.audio(bytes(FRAME), sample_rate=RATE, epoch=p.epoch + 1))
    await p.bus.publish(p.subjects.data("stt", p.sid), Frame(Kind.TEXT, b"\xff", epoch=p.epoch + 1))
    await p.bus.publish(p.subjects.data("stt", p.sid), Frame(Kind.EVENT, b"{", epoch=p.epoch + 1))
    p.epoch += 1  # that epoch is spent on junk; the next real turn is newer
    await p.bus.nc.flush()
    await asyncio.sleep(0.2)
    await all_alive(p)
    await p.turn()
    await p.turn()


async def test_bad_payloads_in_valid_frames_are_dropped_counted_and_logged_once(
    pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    """An event that is not a JSON object, or text that is not UTF-8, is as malformed as a bad
    header: dropped, counted and warned about once per family, not a traceback per message
    (a stuck or hostile publisher must not flood the logs)."""
    p = pipeline
    caplog.set_level(logging.WARNING)
    family = f"{p.subjects.prefix}.ctl"
    before = dropped(family)
    n = 5
    for _ in range(n):
        await p.bus.publish(p.subjects.ctl(p.sid), Frame(Kind.EVENT, b"not json"))
    llm_family = f"{p.subjects.prefix}.llm"
    llm_before = dropped(llm_family)
    for _ in range(n):
        await p.bus.publish(p.subjects.data("llm", p.sid), Frame(Kind.TEXT, b"\xff\xfe", epoch=99))
    await p.bus.nc.flush()
    await asyncio.sleep(0.3)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [f"{r.name}: {r.getMessage()}" for r in tracebacks]
    assert dropped(family) == before + n * len(p.stages)
    assert dropped(llm_family) == llm_before + n
    assert len(drop_warnings(caplog, family)) == len(p.stages)
    assert len(drop_warnings(caplog, llm_family)) == 1
    await p.turn()


# --- request and broadcast subjects (JSON, not frames) ---------------------------------------

GARBAGE: list[bytes] = [
    b"",
    b"garbage",
    b"\xff\xfe\x00",
    b"[]",
    b"[1, 2",
    b"null",
    b"42",
    b'"text"',
    b"{}",
    GOOD_TEXT,
    b"x" * 100_000,
]


async def test_garbage_config_updates_are_ignored(pipeline: Pipeline) -> None:
    p = pipeline
    subject = p.subjects.config_update
    for body in [
        *GARBAGE,
        b'{"version": 3}',
        b'{"session_id": null, "version": 3}',
        b'{"session_id": ["x"], "version": 3}',
        b'{"session_id": {"a": 1}, "version": 3}',
        b'{"session_id": "%s", "version": "three"}' % p.sid.encode(),
        b'{"session_id": "%s", "version": [3]}' % p.sid.encode(),
        b'{"session_id": "%s", "version": 1e400}' % p.sid.encode(),
    ]:
        await p.bus.nc.publish(subject, body)
    await p.bus.nc.flush()
    await asyncio.sleep(0.2)
    # not frames: nothing counted as a dropped frame on that subject
    assert dropped(f"{p.subjects.prefix}.config") == 0
    # every instance still applies a real update: a new reply at the next turn
    assert all(p.sid in s.router._cache for s in p.stages)  # cached by the first turn
    data = orjson.loads((await p.store.get_config(p.sid)).config.to_json())
    data["connectors"]["llm"]["config"]["scripted"]["replies"] = ["Changed {user}."]
    version = await p.store.update_config(p.sid, parse_agent_config(data))
    await p.transport.config_changed(p.sid, version, ["connectors"])
    await until(lambda: all(p.sid not in s.router._cache for s in p.stages), what="cache drop")
    p.epoch += 1
    epoch = p.epoch
    await p.bus.publish(p.subjects.data("llm", p.sid), Frame.text("again", epoch=epoch))
    frames = await p.out.wait_for(lambda fs: has_last(fs, epoch))
    said = [f.as_event.get("text") for f in frames if f.epoch == epoch and f.kind is Kind.EVENT]
    assert "Changed again." in said
    await all_alive(p)


async def test_garbage_assign_requests_get_an_error_and_no_stream(pipeline: Pipeline) -> None:
    p = pipeline
    subject = p.subjects.assign("stt")
    bad = [
        *GARBAGE,
        b'{"session_id": 5}',
        b'{"session_id": null}',
        b'{"session_id": ["%s"]}' % p.sid.encode(),
        b'{"session_id": "no spaces allowed"}',
        b'{"session_id": "a.b"}',
        b'{"session_id": "*"}',
        b'{"session_id": ">"}',
        b'{"session_id": "short"}',
        b'{"session_id": "%s"}' % (b"x" * 65),
        b'{"sessionid": "%s"}' % p.sid.encode(),
    ]
    streams = set(p.stt.streams)
    for body in bad:
        reply = orjson.loads((await p.bus.nc.request(subject, body, timeout=2)).data)
        assert set(reply) == {"error"} and reply["error"], (body[:60], reply)
    # without a reply subject: nothing to answer, nothing taken
    for body in bad:
        await p.bus.nc.publish(subject, body)
    await p.bus.nc.flush()
    await asyncio.sleep(0.1)
    assert set(p.stt.streams) == streams
    leases = [k async for k in p.store.client.scan_iter(match=f"{p.store.keys.prefix}:lease:*")]
    assert leases == [p.store.keys.lease("stt", p.sid).encode()]
    assert await p.assign() == {"owner": p.stt.instance}
    await p.turn()


async def test_assign_for_a_session_that_does_not_exist_is_refused(pipeline: Pipeline) -> None:
    """A well-formed id of no session must not make an STT instance take a lease and subscribe
    (each one held for IDLE_RELEASE_S): anyone on the bus could pile them up."""
    p = pipeline
    ghost = "NoSuchSession" + uuid.uuid4().hex[:12]
    body = orjson.dumps({"session_id": ghost})
    reply = orjson.loads((await p.bus.nc.request(p.subjects.assign("stt"), body, timeout=2)).data)
    assert "owner" not in reply and ghost in reply.get("error", ""), reply
    assert ghost not in p.stt.streams
    assert await p.store.client.get(p.store.keys.lease("stt", ghost)) is None


async def test_garbage_config_get_requests_are_answered(pipeline: Pipeline) -> None:
    p = pipeline
    subject = p.subjects.config_get(p.sid)
    for body in GARBAGE:  # the payload is not read: the session is in the subject
        reply = orjson.loads((await p.bus.nc.request(subject, body, timeout=2)).data)
        assert reply["status"] == "success" and reply["session_id"] == p.sid
    for ghost in ("x", "NoSuchSession123", "-" * 200, "%00", "{}", "\u00e9t\u00e9"):
        reply = orjson.loads(
            (await p.bus.nc.request(p.subjects.config_get(ghost), b"garbage", timeout=2)).data
        )
        assert reply["status"] == "error" and "configurations" not in reply, (ghost, reply)
    for body in GARBAGE:  # no reply subject: nothing to do
        await p.bus.nc.publish(subject, body)
    await p.bus.nc.flush()
    assert dropped(f"{p.subjects.prefix}.config.get") == 0
    reply = orjson.loads((await p.bus.nc.request(subject, b"", timeout=2)).data)
    assert reply["status"] == "success" and reply["version"] == 1
    await p.turn()


async def test_garbage_health_requests_are_answered(pipeline: Pipeline) -> None:
    p = pipeline
    for role in ("stt", "llm", "tts", "transport"):
        for body in GARBAGE:
            reply = await p.bus.nc.request(p.subjects.health(role), body, timeout=2)
            assert orjson.loads(reply.data)["role"] == role
            await p.bus.nc.publish(p.subjects.health(role), body)  # no reply subject
    await p.bus.nc.flush()
    assert dropped(f"{p.subjects.prefix}.health") == 0
    await p.turn()


async def test_garbage_connector_health_news_is_ignored(pipeline: Pipeline) -> None:
    p = pipeline
    subject = p.subjects.connector_health("llm")
    for body in [
        *GARBAGE,
        b'{"stage": "llm", "connector": "scripted"}',
        b'{"stage": ["llm"], "connector": "scripted", "fp": "x", "state": "down"}',
        b'{"stage": "llm", "connector": "scripted", "fp": "x", "state": "down", "hold_ms": "x"}',
        b'{"stage": "llm", "connector": "scripted", "fp": "x", "state": "down", "hold_ms": 1e400}',
        b'{"stage": "llm", "connector": "scripted", "fp": "x", "state": ["down"]}',
    ]:
        await p.bus.nc.publish(subject, body)
    await p.bus.nc.flush()
    await asyncio.sleep(0.1)
    await all_alive(p)
    await p.turn()
