"""Cloud STT connectors against loopback servers speaking the providers' wire protocols on
127.0.0.1: OpenAI transcriptions (HTTP multipart, official openai SDK) and Deepgram live
transcription (websocket, official deepgram-sdk). Every failure mode is classified, and a failing
Deepgram stream falls back to OpenAI with the whole utterance replayed."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from voicemesh.config.connectors import DeepgramOptions, OpenAISTTOptions
from voicemesh.config.models import AgentConfig
from voicemesh.connectors.base import STTConnector
from voicemesh.connectors.errors import ConnectorError, FailureKind, classify
from voicemesh.connectors.fallback import AllConnectorsFailed, Chain
from voicemesh.connectors.registry import ConnectorPool
from voicemesh.connectors.stt.deepgram import DeepgramSTT
from voicemesh.connectors.stt.openai import OpenAISTT
from voicemesh.servers import free_port
from voicemesh.testing.loopback.deepgram import DeepgramServer
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the test's own variable names in these connectors' credentials."""
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "stt.deepgram:TEST_DG_KEY;stt.openai:TEST_OA_KEY")


@pytest.fixture(autouse=True)
def _short_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests time out hung providers through a Chain quickly, including the last one of
    the order, which in production waits up to fallback.LAST_RESORT_S."""
    monkeypatch.setattr("voicemesh.connectors.fallback.LAST_RESORT_S", 0.0)


RATE = 16000
FRAME = 640  # 20 ms of PCM16 mono at 16 kHz, as the stage receives it
DG_KEY = "dg-test-key-0123456789"
OA_KEY = "sk-test-key-0123456789"
DG_TEXT = "turn the kitchen lights off please"
OA_TEXT = "Turn the kitchen lights off, please."


def speech(ms: int, rate: int = RATE) -> bytes:
    """A synthetic utterance: a 220 Hz tone with a slow envelope, PCM16 mono."""
    t = np.arange(rate * ms // 1000) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (wave * 32767).astype("<i2").tobytes()


# One server of each kind for the module (a uvicorn stop takes ~0.15 s); each test gets it back
# healed, with the default transcript and key and fresh records.


@pytest.fixture(scope="module")
async def dg_server() -> AsyncIterator[DeepgramServer]:
    async with DeepgramServer(DG_TEXT, api_key=DG_KEY) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
async def oa_server() -> AsyncIterator[OpenAITranscribeServer]:
    async with OpenAITranscribeServer(OA_TEXT, api_key=OA_KEY) as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def dg(dg_server: DeepgramServer) -> DeepgramServer:
    dg_server.heal()
    dg_server.transcript, dg_server.api_key, dg_server.last = DG_TEXT, DG_KEY, {}
    dg_server.requests = dg_server.failed = dg_server.completed = 0
    return dg_server


@pytest.fixture
def oa(oa_server: OpenAITranscribeServer) -> OpenAITranscribeServer:
    oa_server.heal()
    oa_server.transcript, oa_server.api_key, oa_server.last = OA_TEXT, OA_KEY, {}
    oa_server.requests = oa_server.failed = oa_server.transcriptions = 0
    return oa_server


@pytest.fixture
async def pool() -> AsyncIterator[ConnectorPool]:
    p = ConnectorPool()
    yield p
    await p.aclose()


def deepgram(server: DeepgramServer, **kw: Any) -> DeepgramSTT:
    return DeepgramSTT(DeepgramOptions(api_key=DG_KEY, base_url=server.ws_url, **kw))


def openai_stt(server: OpenAITranscribeServer, **kw: Any) -> OpenAISTT:
    return OpenAISTT(OpenAISTTOptions(api_key=OA_KEY, base_url=server.base_url, **kw))


# Loopback servers answer in milliseconds, but a connector's first request (SDK client, HTTP
# connection) on a loaded 2-core machine has taken over 300 ms: the timeout proves hangs end,
# with room for that.
def stt_config(dg_url: str, oa_url: str, chain: list[str], timeout_ms: int = 800) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "pipeline": {
                "name": "stt-test",
                "flow": [
                    {"from": "transport", "to": "stt", "stream": "audio"},
                    {"from": "stt", "to": "llm", "stream": "text"},
                    {"from": "llm", "to": "tts", "stream": "text"},
                    {"from": "tts", "to": "transport", "stream": "audio"},
                ],
            },
            "connectors": {
                "stt": {
                    "primary": chain[0],
                    "fallback": chain[1:],
                    "attempt_timeout_ms": timeout_ms,
                    "config": {
                        "deepgram": {"api_key": "${TEST_DG_KEY}", "base_url": dg_url},
                        "openai": {"api_key": "${TEST_OA_KEY}", "base_url": oa_url},
                    },
                },
                "llm": {"primary": "echo"},
                "tts": {"primary": "tone"},
            },
        }
    )


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DG_KEY", DG_KEY)
    monkeypatch.setenv("TEST_OA_KEY", OA_KEY)


async def failure_of(coro: Any) -> ConnectorError:
    try:
        await coro
    except Exception as exc:
        return classify(exc)
    raise AssertionError("expected a failure")


# --- OpenAI ----------------------------------------------------------------------------------


async def test_openai_transcribes_an_utterance_as_wav(oa: OpenAITranscribeServer) -> None:
    pcm = speech(400)
    conn = openai_stt(oa, prompt="home automation")
    try:
        assert await conn.transcribe(pcm, RATE) == OA_TEXT
    finally:
        await conn.aclose()
    last = oa.last
    assert last["model"] == "gpt-4o-mini-transcribe"
    assert last["language"] == "en"
    assert last["prompt"] == "home automation"
    assert (last["filename"], last["content_type"]) == ("utterance.wav", "audio/wav")
    assert last["pcm_bytes"] == len(pcm) and last["sample_rate"] == RATE
    assert last["file_bytes"] == len(pcm) + 44  # a plain RIFF header
    assert last["authorization"] == f"Bearer {OA_KEY}"


async def test_openai_transcript_from_the_audio_and_other_rates(
    oa: OpenAITranscribeServer,
) -> None:
    oa.transcript = lambda pcm: f"{len(pcm)} bytes"
    conn = openai_stt(oa, language=None, model="whisper-1")
    try:
        assert await conn.transcribe(speech(300, 8000), 8000) == "4800 bytes"
        assert oa.last["sample_rate"] == 8000
        assert oa.last["language"] is None and oa.last["model"] == "whisper-1"
        # under 100 ms: not sent (OpenAI answers 400 to audio that short)
        before = oa.requests
        assert await conn.transcribe(speech(60), RATE) == ""
        assert oa.requests == before
    finally:
        await conn.aclose()


async def test_openai_without_key_sends_a_placeholder(oa: OpenAITranscribeServer) -> None:
    oa.api_key = None
    conn = OpenAISTT(OpenAISTTOptions(base_url=oa.base_url))
    try:
        assert await conn.transcribe(speech(200), RATE) == OA_TEXT
        assert oa.last["authorization"] == "Bearer no-key"
    finally:
        await conn.aclose()


@pytest.mark.parametrize(
    ("mode", "kind", "status"),
    [
        ("429", FailureKind.RATE_LIMIT, 429),
        ("500", FailureKind.SERVER, 500),
        ("error", FailureKind.SERVER, 500),
        ("401", FailureKind.PERMANENT, 401),
        ("die", FailureKind.NETWORK, None),
    ],
)
async def test_openai_failures_are_classified(
    oa: OpenAITranscribeServer, mode: str, kind: FailureKind, status: int | None
) -> None:
    oa.fail(mode, after=4)  # type: ignore[arg-type]
    conn = openai_stt(oa)
    try:
        err = await failure_of(conn.transcribe(speech(300), RATE))
    finally:
        await conn.aclose()
    assert err.kind is kind, err
    assert err.status == status
    if mode == "429":
        assert err.retry_after_s == 1.0
    assert OA_KEY not in str(err)


async def test_openai_wrong_key_and_refused_connection() -> None:
    async with OpenAITranscribeServer(OA_TEXT, api_key="another-key") as server:
        conn = openai_stt(server)
        try:
            err = await failure_of(conn.transcribe(speech(200), RATE))
        finally:
            await conn.aclose()
    assert err.kind is FailureKind.PERMANENT and err.status == 401
    conn = OpenAISTT(OpenAISTTOptions(base_url=f"http://127.0.0.1:{free_port()}/v1"))
    try:
        err = await failure_of(conn.transcribe(speech(200), RATE))
    finally:
        await conn.aclose()
    assert err.kind is FailureKind.NETWORK


async def test_openai_probe(oa: OpenAITranscribeServer) -> None:
    conn = openai_stt(oa)
    try:
        assert conn.can_probe
        await conn.probe()
        assert oa.last["pcm_bytes"] > 0
        oa.fail("500", times=1)
        err = await failure_of(conn.probe())
        assert err.kind is FailureKind.SERVER
        await conn.probe()  # healed after one failure
    finally:
        await conn.aclose()


async def test_openai_models_endpoint(oa: OpenAITranscribeServer) -> None:
    conn = openai_stt(oa)
    try:
        models = await conn.client.models.list()
        assert "gpt-4o-mini-transcribe" in [m.id for m in models.data]
    finally:
        await conn.aclose()


async def test_openai_hang_times_out_in_the_chain(
    oa: OpenAITranscribeServer, pool: ConnectorPool, keys: None
) -> None:
    oa.fail("hang")
    chain = Chain(pool, stt_config("ws://127.0.0.1:9", oa.base_url, ["openai"]), "stt")
    t0 = time.perf_counter()
    with pytest.raises(AllConnectorsFailed) as info:
        await chain.call_first(lambda c: c.transcribe(speech(300), RATE))  # type: ignore[attr-defined]
    assert time.perf_counter() - t0 < 1.5
    [(name, err)] = info.value.errors
    assert (name, err.kind) == ("openai", FailureKind.TIMEOUT)


# --- Deepgram --------------------------------------------------------------------------------


async def test_deepgram_streams_interims_and_returns_the_final_text(dg: DeepgramServer) -> None:
    pcm = speech(800)
    conn = deepgram(dg)
    interims: list[str] = []

    async def on_interim(text: str) -> None:
        interims.append(text)

    stream = await conn.open_stream(RATE, on_interim)
    try:
        for i in range(0, len(pcm), FRAME):
            await stream.send(pcm[i : i + FRAME])
            await asyncio.sleep(0.002)
        for _ in range(200):  # results come back while the user is still "speaking"
            if len(interims) >= 4:
                break
            await asyncio.sleep(0.01)
        assert len(interims) >= 4, interims
        assert dg.last["control"] == []  # nothing was finished yet
        text = await stream.finish()
    finally:
        await stream.aclose()
    assert text == DG_TEXT
    # the running transcript only grows, and ends as the final text
    for shorter, longer in itertools.pairwise(interims):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert DG_TEXT.startswith(interims[-1])
    assert dg.last["authorization"] == f"Token {DG_KEY}"
    assert dg.last["query"] == {
        "model": "nova-3",
        "language": "en",
        "encoding": "linear16",
        "sample_rate": "16000",
        "channels": "1",
        "interim_results": "true",
        "smart_format": "true",
    }
    assert dg.last["audio_bytes"] == len(pcm)
    assert dg.last["control"] == ["CloseStream"]
    assert dg.completed == 1


async def test_deepgram_transcribe_is_the_replay_path(dg: DeepgramServer) -> None:
    pcm = speech(500, 24000)
    conn = deepgram(dg, model="nova-2", language="en-GB", smart_format=False)
    # the whole transcript comes back even if the audio is shorter than its words
    assert await conn.transcribe(pcm, 24000) == DG_TEXT
    assert dg.last["audio_bytes"] == len(pcm)
    q = dg.last["query"]
    assert (q["model"], q["language"], q["sample_rate"], q["smart_format"]) == (
        "nova-2",
        "en-GB",
        "24000",
        "false",
    )
    assert await conn.transcribe(b"", RATE) == ""


async def test_deepgram_without_interim_results(dg: DeepgramServer) -> None:
    dg.transcript = "one two three four five six seven eight nine"
    conn = deepgram(dg, interim_results=False)
    seen: list[str] = []

    async def on_interim(text: str) -> None:
        seen.append(text)

    stream = await conn.open_stream(RATE, on_interim)
    try:
        pcm = speech(1000)
        for i in range(0, len(pcm), FRAME):
            await stream.send(pcm[i : i + FRAME])
        assert await stream.finish() == dg.transcript
    finally:
        await stream.aclose()
    assert dg.last["query"]["interim_results"] == "false"
    # only final segments (every 4 words) update the running text
    assert seen == ["one two three four", "one two three four five six seven eight", dg.transcript]


@pytest.mark.parametrize(
    ("mode", "after", "kind", "status"),
    [
        ("401", 0, FailureKind.PERMANENT, 401),
        ("429", 0, FailureKind.RATE_LIMIT, 429),
        ("500", 0, FailureKind.SERVER, 500),
        ("error", 0, FailureKind.SERVER, None),
        ("die", 0, FailureKind.NETWORK, None),  # dropped before any result
        ("die", 2, FailureKind.STREAM, None),  # dropped after two results
    ],
)
async def test_deepgram_failures_are_classified(
    dg: DeepgramServer, mode: str, after: int, kind: FailureKind, status: int | None
) -> None:
    dg.fail(mode, after=after)  # type: ignore[arg-type]
    err = await failure_of(deepgram(dg).transcribe(speech(600), RATE))
    assert err.kind is kind, err
    assert err.status == status
    assert DG_KEY not in str(err)


async def test_deepgram_stream_that_dies_fails_send_or_finish(dg: DeepgramServer) -> None:
    dg.fail("die", after=2)
    interims: list[str] = []

    async def on_interim(text: str) -> None:
        interims.append(text)

    stream = await deepgram(dg).open_stream(RATE, on_interim)
    pcm = speech(800)
    try:
        with pytest.raises(ConnectorError) as info:
            for i in range(0, len(pcm), FRAME):
                await stream.send(pcm[i : i + FRAME])
                await asyncio.sleep(0.005)
            await stream.finish()
    finally:
        await stream.aclose()
    assert info.value.kind is FailureKind.STREAM
    assert interims == ["turn", "turn the"]


async def test_deepgram_wrong_key_and_refused_connection(dg: DeepgramServer) -> None:
    conn = DeepgramSTT(DeepgramOptions(api_key="not-the-key", base_url=dg.ws_url))
    err = await failure_of(conn.transcribe(speech(200), RATE))
    assert (err.kind, err.status) == (FailureKind.PERMANENT, 401)
    assert "not-the-key" not in str(err)
    conn = DeepgramSTT(DeepgramOptions(api_key=DG_KEY, base_url=f"ws://127.0.0.1:{free_port()}"))
    err = await failure_of(conn.transcribe(speech(200), RATE))
    assert err.kind is FailureKind.NETWORK


async def test_deepgram_hang_times_out(dg: DeepgramServer, pool: ConnectorPool, keys: None) -> None:
    dg.fail("hang")
    stream = await deepgram(dg).open_stream(RATE)
    try:
        await stream.send(speech(200))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await stream.finish()
    finally:
        t0 = time.perf_counter()
        await stream.aclose()
        assert time.perf_counter() - t0 < 1.5
    chain = Chain(pool, stt_config(dg.ws_url, "http://127.0.0.1:9", ["deepgram"]), "stt")
    t0 = time.perf_counter()
    with pytest.raises(AllConnectorsFailed) as info:
        await chain.call_first(lambda c: c.transcribe(speech(300), RATE))  # type: ignore[attr-defined]
    assert time.perf_counter() - t0 < 1.5
    [(name, err)] = info.value.errors
    assert (name, err.kind) == ("deepgram", FailureKind.TIMEOUT)


async def test_deepgram_probe(dg: DeepgramServer) -> None:
    conn = deepgram(dg)
    assert conn.can_probe
    await conn.probe()
    dg.fail("429", times=1)
    err = await failure_of(conn.probe())
    assert err.kind is FailureKind.RATE_LIMIT
    await conn.probe()


async def test_secrets_resolve_in_the_pool(
    dg: DeepgramServer,
    oa: OpenAITranscribeServer,
    pool: ConnectorPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_DG_KEY", "dg-from-env")
    monkeypatch.setenv("TEST_OA_KEY", "sk-from-env")
    dg.api_key, oa.api_key = "dg-from-env", "sk-from-env"
    dg_options = DeepgramOptions(api_key="${TEST_DG_KEY}", base_url=dg.ws_url)
    conn = await pool.get("stt", "deepgram", dg_options)
    assert isinstance(conn, DeepgramSTT)
    assert await conn.transcribe(speech(300), RATE) == DG_TEXT
    assert dg.last["authorization"] == "Token dg-from-env"
    assert dg_options.api_key == "${TEST_DG_KEY}"  # the config keeps the reference
    oa_options = OpenAISTTOptions(api_key="${TEST_OA_KEY}", base_url=oa.base_url)
    conn = await pool.get("stt", "openai", oa_options)
    assert await conn.transcribe(speech(300), RATE) == OA_TEXT  # type: ignore[attr-defined]
    assert oa.last["authorization"] == "Bearer sk-from-env"
    # a missing variable is a permanent (config) failure
    monkeypatch.delenv("TEST_DG_KEY")
    err = await failure_of(
        pool.get("stt", "deepgram", DeepgramOptions(api_key="${TEST_DG_KEY}", model="nova-2"))
    )
    assert err.kind is FailureKind.PERMANENT and "TEST_DG_KEY" in str(err)


# --- fallback --------------------------------------------------------------------------------


async def stage_like_live_attempt(chain: Chain, pcm: bytes) -> str | None:
    """What the STT stage does with a streaming primary: open at utterance start, send frames
    as they come, finish at its end; any failure is recorded and the caller replays."""
    name = chain.order()[0]
    conn = await chain.get(name)
    assert isinstance(conn, STTConnector) and conn.streaming
    stream = None
    try:
        async with asyncio.timeout(chain.timeout_s):
            stream = await conn.open_stream(RATE)
        for i in range(0, len(pcm), FRAME):
            async with asyncio.timeout(chain.timeout_s):
                await stream.send(pcm[i : i + FRAME])
            await asyncio.sleep(0.001)
        async with asyncio.timeout(chain.timeout_s):
            return await stream.finish()
    except Exception as exc:
        await chain.failed(name, conn, exc, started=False)
        return None
    finally:
        if stream is not None:
            await stream.aclose()


@pytest.mark.parametrize(
    ("mode", "after", "kind"),
    [
        ("401", 0, FailureKind.PERMANENT),
        ("429", 0, FailureKind.RATE_LIMIT),
        ("500", 0, FailureKind.SERVER),
        ("error", 0, FailureKind.SERVER),
        ("die", 2, FailureKind.STREAM),
        ("hang", 0, FailureKind.TIMEOUT),
    ],
)
async def test_failing_deepgram_falls_back_to_openai_with_the_whole_utterance(
    dg: DeepgramServer,
    oa: OpenAITranscribeServer,
    pool: ConnectorPool,
    keys: None,
    mode: str,
    after: int,
    kind: FailureKind,
) -> None:
    dg.fail(mode, after=after)  # type: ignore[arg-type]
    chain = Chain(pool, stt_config(dg.ws_url, oa.base_url, ["deepgram", "openai"]), "stt")
    pcm = speech(700)
    t0 = time.perf_counter()
    assert await stage_like_live_attempt(chain, pcm) is None
    # the replay: the buffered utterance from its start, down the chain
    conn, text = await chain.call_first(lambda c: c.transcribe(pcm, RATE))  # type: ignore[attr-defined]
    assert time.perf_counter() - t0 < 2.5
    assert conn.name == "openai"
    assert text == OA_TEXT
    assert oa.last["pcm_bytes"] == len(pcm)
    assert oa.transcriptions == 1
    # the live attempt failed; the replay went straight to openai (deepgram, having just failed
    # this utterance, is ordered last and never needed)
    assert [(n, e.kind) for n, e in chain.failures] == [("deepgram", kind)]


async def test_healthy_deepgram_streams_without_replay(
    dg: DeepgramServer, oa: OpenAITranscribeServer, pool: ConnectorPool, keys: None
) -> None:
    chain = Chain(pool, stt_config(dg.ws_url, oa.base_url, ["deepgram", "openai"]), "stt")
    assert await stage_like_live_attempt(chain, speech(700)) == DG_TEXT
    assert chain.failures == [] and oa.requests == 0
