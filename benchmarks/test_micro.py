"""Micro-benchmarks of the per-frame hot path, with pytest-benchmark.

    .venv/bin/python -m pytest benchmarks/test_micro.py --benchmark-only -q

Not part of `make test` (its testpaths are tests/); `make bench` runs this file. Each benchmark
asserts that its result is right, so every one is also a test.

- frame codec: encode and decode of a 20 ms, 16 kHz PCM16 audio frame (640 B), a text frame and an
  event frame. Audio starts from a `Frame` and ends in an equal `Frame`; text and event include
  their payload conversion (str <-> UTF-8, dict <-> orjson), which is what a sender and a receiver
  of those frames do.
- baselines in the same run, for ratios (the parenthesised figures in each group): the same audio
  frame as JSON with base64 audio, and as NATS headers built the way nats-py's publish builds them
  and parsed with nats-py's own header parser.
- next-hop decision: `AgentConfig.next_hop` and `ServiceRouter.next_subject_of` for the default
  agent (config/agent-config.json), at the transport stage (every inbound audio frame).
- config cache hit: `await ServiceRouter.load(session)` once the session's config is cached, on a
  router with a real ConfigStore (valkey-server) and a real Bus (nats-server), driven without an
  event loop round trip (a hit never awaits I/O).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from nats.aio.client import (
    _CRLF_,
    _HEADER_KEY_RE,
    _HEADER_VALUE_NEWLINES,
    NATS_HDR_LINE,
    Client,
)

from voicemesh.bus import Bus, Subjects
from voicemesh.bus.codec import HEADER_SIZE, Flag, Frame, Kind, decode, encode
from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.router.service_router import CachedConfig, ServiceRouter
from voicemesh.servers import EmbeddedServer, start_nats, start_valkey
from voicemesh.state import ConfigStore

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILE = ROOT / "config" / "agent-config.json"


def agent_json() -> dict[str, Any]:
    """The default agent, without the options this tree's connectors do not know: under
    compare_micro.py --this-file an older tree reads the newer tree's agent file."""
    from voicemesh.config.connectors import CONNECTOR_OPTIONS

    config = orjson.loads(AGENT_FILE.read_bytes())
    for stage, section in config["connectors"].items():
        for name, options in section.get("config", {}).items():
            known = CONNECTOR_OPTIONS.get(stage, {}).get(name)
            if known is not None:
                section["config"][name] = {
                    k: v for k, v in options.items() if k in known.model_fields
                }
    return config


ORIGIN = 1_700_000_000_000_000_000
PCM = bytes(range(256)) * 2 + bytes(128)  # 20 ms at 16 kHz, mono PCM16: 640 bytes
AUDIO = Frame.audio(PCM, sample_rate=16_000, epoch=3, seq=42, flags=Flag.START, origin_ns=ORIGIN)
TEXT = "The tide comes in at noon, so the boats wait by the pier until then."
EVENT = {
    "type": "transcript",
    "role": "user",
    "text": "when is the tide?",
    "epoch": 3,
    "final": True,
    "connector": "whisper",
    "stt_ms": 183.4,
}


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends to its result, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine awaited I/O")


# --- frame codec -----------------------------------------------------------------------------


@pytest.mark.benchmark(group="audio encode (640 B)")
def test_audio_encode(benchmark) -> None:
    data = benchmark(encode, AUDIO)
    assert len(PCM) == 16_000 // 50 * 2 == 640
    assert len(data) == HEADER_SIZE + 640 and data.endswith(PCM)
    assert decode(data) == AUDIO


@pytest.mark.benchmark(group="audio decode (640 B)")
def test_audio_decode(benchmark) -> None:
    frame = benchmark(decode, encode(AUDIO))
    assert frame == AUDIO


@pytest.mark.benchmark(group="text encode/decode")
def test_text_encode(benchmark) -> None:
    def run() -> bytes:
        return encode(Frame.text(TEXT, epoch=3, index=1, flags=Flag.START, origin_ns=ORIGIN))

    data = benchmark(run)
    frame = decode(data)
    assert frame.kind is Kind.TEXT and frame.as_text == TEXT and frame.index == 1


@pytest.mark.benchmark(group="text encode/decode")
def test_text_decode(benchmark) -> None:
    data = encode(Frame.text(TEXT, epoch=3, index=1, flags=Flag.START, origin_ns=ORIGIN))

    def run() -> tuple[Frame, str]:
        frame = decode(data)
        return frame, frame.as_text

    frame, text = benchmark(run)
    assert text == TEXT and frame.kind is Kind.TEXT and frame.has(Flag.START)


@pytest.mark.benchmark(group="event encode/decode")
def test_event_encode(benchmark) -> None:
    data = benchmark(lambda: encode(Frame.event(EVENT, epoch=3, origin_ns=ORIGIN)))
    frame = decode(data)
    assert frame.kind is Kind.EVENT and frame.as_event == EVENT


@pytest.mark.benchmark(group="event encode/decode")
def test_event_decode(benchmark) -> None:
    data = encode(Frame.event(EVENT, epoch=3, origin_ns=ORIGIN))

    def run() -> tuple[Frame, dict[str, Any]]:
        frame = decode(data)
        return frame, frame.as_event

    frame, body = benchmark(run)
    assert body == EVENT and frame.kind is Kind.EVENT and frame.epoch == 3


# --- baselines: the same audio frame as JSON + base64, and as NATS headers -------------------


def json_b64_encode(f: Frame) -> bytes:
    return orjson.dumps(
        {
            "kind": int(f.kind),
            "flags": int(f.flags),
            "epoch": f.epoch,
            "index": f.index,
            "seq": f.seq,
            "rate": f.sample_rate,
            "channels": f.channels,
            "origin_ns": f.origin_ns,
            "audio": base64.b64encode(f.payload).decode(),
        }
    )


def json_b64_decode(data: bytes) -> Frame:
    d = orjson.loads(data)
    return Frame(
        Kind(d["kind"]),
        base64.b64decode(d["audio"]),
        d["epoch"],
        d["index"],
        d["seq"],
        Flag(d["flags"]),
        d["rate"],
        d["channels"],
        d["origin_ns"],
    )


def nats_headers_encode(f: Frame) -> tuple[bytes, bytes]:
    """The frame's fields as NATS headers: the header block exactly as nats-py 2.x's
    `Client._send_publish` builds it, with the raw PCM as the message payload."""
    headers = {
        "Vm-Kind": str(int(f.kind)),
        "Vm-Flags": str(int(f.flags)),
        "Vm-Epoch": str(f.epoch),
        "Vm-Index": str(f.index),
        "Vm-Seq": str(f.seq),
        "Vm-Rate": str(f.sample_rate),
        "Vm-Channels": str(f.channels),
        "Vm-Origin": str(f.origin_ns),
    }
    hdr = bytearray()
    hdr.extend(NATS_HDR_LINE)
    hdr.extend(_CRLF_)
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue
        if not _HEADER_KEY_RE.fullmatch(key):
            raise ValueError(key)
        hdr.extend(key.encode())
        hdr.extend(b": ")
        hdr.extend(v.strip().translate(_HEADER_VALUE_NEWLINES).encode())
        hdr.extend(_CRLF_)
    hdr.extend(_CRLF_)
    return bytes(hdr), f.payload


_client = Client()


def nats_headers_decode(message: tuple[bytes, bytes]) -> Frame:
    """What a subscriber's nats-py parses for each message (`_process_headers`, a coroutine with
    no awaits inside), then the fields back into a Frame."""
    raw, payload = message
    h = run_sync(_client._process_headers(raw))
    return Frame(
        Kind(int(h["Vm-Kind"])),
        payload,
        int(h["Vm-Epoch"]),
        int(h["Vm-Index"]),
        int(h["Vm-Seq"]),
        Flag(int(h["Vm-Flags"])),
        int(h["Vm-Rate"]),
        int(h["Vm-Channels"]),
        int(h["Vm-Origin"]),
    )


@pytest.mark.benchmark(group="audio encode (640 B)")
def test_audio_encode_json_b64(benchmark) -> None:
    data = benchmark(json_b64_encode, AUDIO)
    assert json_b64_decode(data) == AUDIO


@pytest.mark.benchmark(group="audio decode (640 B)")
def test_audio_decode_json_b64(benchmark) -> None:
    frame = benchmark(json_b64_decode, json_b64_encode(AUDIO))
    assert frame == AUDIO


@pytest.mark.benchmark(group="audio encode (640 B)")
def test_audio_encode_nats_headers(benchmark) -> None:
    message = benchmark(nats_headers_encode, AUDIO)
    assert message[0].startswith(b"NATS/1.0\r\n") and message[1] == PCM
    assert nats_headers_decode(message) == AUDIO


@pytest.mark.benchmark(group="audio decode (640 B)")
def test_audio_decode_nats_headers(benchmark) -> None:
    frame = benchmark(nats_headers_decode, nats_headers_encode(AUDIO))
    assert frame == AUDIO


# --- next-hop decision -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent() -> AgentConfig:
    return parse_agent_config(orjson.dumps(agent_json()))


@pytest.mark.benchmark(group="next hop")
def test_next_hop(benchmark, agent: AgentConfig) -> None:
    assert benchmark(agent.next_hop, "transport", "audio") == "stt"


@dataclass
class Live:
    nats: EmbeddedServer
    valkey: EmbeddedServer
    router: ServiceRouter
    session: str
    first: CachedConfig


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory, agent: AgentConfig) -> AsyncIterator[Live]:
    """A transport-stage ServiceRouter on a real Bus (nats-server) and ConfigStore
    (valkey-server), with one stored session whose config is loaded once (the one miss)."""
    data = tmp_path_factory.mktemp("servers")
    nats = start_nats(data)
    try:
        valkey = start_valkey(data)
    except BaseException:
        nats.stop()
        raise
    prefix = f"b{uuid.uuid4().hex[:10]}"
    store = ConfigStore.from_url(valkey.url, key_prefix=prefix)
    bus: Bus | None = None
    try:
        bus = await Bus.connect(nats.url, name="bench")
        router = ServiceRouter(bus=bus, store=store, stage="transport", subjects=Subjects(prefix))
        await router.start()
        session = f"bench-{uuid.uuid4().hex[:12]}"
        version = await store.store_config(session, agent)
        first = await router.load(session)
        assert (router.hits, router.misses) == (0, 1) and first.version == version
        yield Live(nats, valkey, router, session, first)
    finally:
        if bus is not None:
            await bus.close()
        await store.close()
        nats.stop()
        valkey.stop()


@pytest.mark.benchmark(group="next hop")
def test_next_subject_of(benchmark, live: Live) -> None:
    router, session = live.router, live.session
    subject = benchmark(router.next_subject_of, live.first.config, session)
    assert subject == f"{router.subjects.prefix}.stt.{session}"


# --- config cache hit ------------------------------------------------------------------------


@pytest.mark.benchmark(group="config cache hit")
def test_config_cache_hit(benchmark, live: Live) -> None:
    router, session = live.router, live.session
    hits = router.hits

    def hit() -> CachedConfig:
        return run_sync(router.load(session))

    cached = benchmark(hit)
    assert cached is live.first
    assert router.hits > hits and router.misses == 1


async def _noop() -> int:
    return 7


@pytest.mark.benchmark(group="config cache hit")
def test_coroutine_driver(benchmark) -> None:
    """Baseline: creating and driving an empty coroutine, the floor under the cache hit above."""
    assert benchmark(lambda: run_sync(_noop())) == 7


# --- a call's per-frame path and session creation ---------------------------------------------
#
# Both go through the whole transport as a caller meets it, so a limit, an owner check or a
# validator added anywhere on the way is counted: a Call's receive loop fed by a peer, and
# POST /api/sessions on the FastAPI app (auth, validation, rate count, Valkey write).

#: settings that exist only in newer trees are set when present, so one file serves both trees
#: of compare_micro.py; each turns off a limit a benchmark would otherwise hit by design (frames
#: fed faster than real time, thousands of sessions from one key)
UNLIMITED = {
    "caller_audio_max_rate": 1e6,
    "session_rate": "1000000/1",
    "tenant_session_rate": "1000000/1",
    "tenant_max_calls": 1_000_000,
}
SILENCE = bytes(640)  # 20 ms: the per-frame path while the caller listens (no turn, no publish)
CALL_FRAMES = 1000
API_KEY = "bench-key-0123456789"


def unlimited(settings: Any) -> Any:
    fields = type(settings).model_fields
    return settings.model_copy(update={k: v for k, v in UNLIMITED.items() if k in fields})


class FeedPeer:
    """A peer whose caller sends `n` frames at once, then hangs up: the Call's loop runs flat
    out, so its time is the per-frame cost of the transport's own work (rechunking, VAD, turn
    state, and any check on the way)."""

    name = "websocket"
    out_rate = 16_000
    continuous = False
    lead_frames = 0

    def __init__(self, n: int) -> None:
        self.left = n
        self.events: list[Any] = []

    async def receive(self) -> bytes | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return SILENCE

    async def send_audio(self, pcm: bytes) -> None:
        pass

    async def send_event(self, event: Any) -> None:
        self.events.append(event)

    async def deliver(self, event: Any) -> None:
        self.events.append(event)

    def hang_up(self) -> None:
        self.left = 0

    def interrupted(self) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass
class Transport:
    loop: Any
    service: Any
    client: Any
    session: str
    config: dict[str, Any]


@pytest.fixture(scope="module")
def transport(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Transport]:
    """A started TransportService on real servers, its app behind an in-process httpx client,
    and a session whose transport uses the energy VAD (the cheapest: the rest of the path shows)."""
    import asyncio

    import httpx
    from pydantic import SecretStr

    from voicemesh.config.settings import Settings
    from voicemesh.transport.api.app import create_app
    from voicemesh.transport.api.service import TransportService

    config = agent_json()
    config["connectors"]["transport"]["primary"] = "websocket"
    config["connectors"]["transport"]["config"]["websocket"] = {"vad": "energy"}
    data = tmp_path_factory.mktemp("transport")
    nats = start_nats(data)
    loop = asyncio.new_event_loop()
    try:  # whatever fails below, the servers started stop (no nats-server left behind)
        valkey = start_valkey(data)
        try:
            prefix = f"b{uuid.uuid4().hex[:10]}"
            settings = Settings(
                nats_url=nats.url, valkey_url=valkey.url, subject_prefix=prefix,
                key_prefix=prefix, preload=False, api_keys=(SecretStr(API_KEY),),
            )  # fmt: skip
            service = TransportService(unlimited(settings))
            loop.run_until_complete(service.start())
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(service)),
                base_url="http://bench",
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            made = loop.run_until_complete(client.post("/api/sessions", json={"config": config}))
            assert made.status_code == 201, made.text
            yield Transport(loop, service, client, made.json()["session_id"], config)
            loop.run_until_complete(client.aclose())
            loop.run_until_complete(service.stop())
        finally:
            valkey.stop()
    finally:
        loop.close()
        nats.stop()


@pytest.mark.benchmark(group="call frames (1000 x 20 ms)")
def test_call_frames(benchmark, transport: Transport) -> None:
    """1000 caller frames through Call.run: divide by 1000 for the cost of one frame."""
    from voicemesh.transport.call.call import Call

    def call() -> FeedPeer:
        peer = FeedPeer(CALL_FRAMES)
        transport.loop.run_until_complete(
            Call(transport.service, transport.session, peer).run()  # type: ignore[arg-type]
        )
        return peer

    peer = benchmark.pedantic(call, rounds=15, warmup_rounds=2)
    assert peer.left == 0
    kinds = [getattr(e, "type", None) for e in peer.events]
    assert "error" not in kinds, peer.events


@pytest.mark.benchmark(group="session create")
def test_session_create(benchmark, transport: Transport) -> None:
    """POST /api/sessions with the default agent's config inline, as a client creates a call."""
    body = {"config": transport.config}

    def create() -> Any:
        return transport.loop.run_until_complete(transport.client.post("/api/sessions", json=body))

    made = benchmark.pedantic(create, rounds=200, warmup_rounds=10)
    assert made.status_code == 201, made.text
