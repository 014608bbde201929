"""Cloud TTS connectors (ElevenLabs, Azure, OpenAI) against loopback servers speaking each
provider's real HTTP protocol on 127.0.0.1: audio rate and length, what goes on the wire, sample
re-alignment, SSML escaping, classification of every failure mode, probes, ${ENV} secrets, and
fallback through `Chain.stream` with a sentence resumed where the failed provider stopped.

Each loopback voice is a sine at its own frequency (ElevenLabs 300 Hz, Azure 500 Hz, OpenAI
700 Hz) lasting 120 ms per word, so the audio itself tells which provider produced it.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.support import dominant_hz
from voicemesh.config.connectors import (
    AzureTTSOptions,
    ConnectorOptions,
    ElevenLabsOptions,
    OpenAITTSOptions,
)
from voicemesh.config.models import AgentConfig
from voicemesh.connectors.audio import whole_samples
from voicemesh.connectors.base import TTSConnector
from voicemesh.connectors.errors import ConnectorError, FailureKind, classify
from voicemesh.connectors.fallback import Chain
from voicemesh.connectors.registry import ConnectorPool, connector_class
from voicemesh.connectors.tts.azure import ssml
from voicemesh.pipeline.tts import resume_sentence
from voicemesh.testing.loopback.audio import tone_pcm
from voicemesh.testing.loopback.azure import AzureSpeechServer
from voicemesh.testing.loopback.base import LoopbackServer
from voicemesh.testing.loopback.elevenlabs import ElevenLabsServer
from voicemesh.testing.loopback.openai_speech import OpenAISpeechServer

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the test's own variable names in these connectors' credentials."""
    monkeypatch.setenv(
        "VOICEMESH_SECRET_ENV",
        "tts.elevenlabs:TEST_XI_KEY,TEST_TTS_KEY_MISSING;tts.azure:TEST_AZ_KEY,TEST_TTS_KEY_MISSING;tts.openai:TEST_OAI_KEY,TEST_TTS_KEY_MISSING",
    )


@pytest.fixture(autouse=True)
def _short_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests time out hung providers through a Chain quickly, including the last one of
    the order, which in production waits up to fallback.LAST_RESORT_S."""
    monkeypatch.setattr("voicemesh.connectors.fallback.LAST_RESORT_S", 0.0)


PROVIDERS = ("elevenlabs", "azure", "openai")
FREQ = {"elevenlabs": 300.0, "azure": 500.0, "openai": 700.0, "tone": 440.0}
KEYS = {"elevenlabs": "xi-test-key", "azure": "az-test-key", "openai": "sk-test-key"}
ENV = {"elevenlabs": "TEST_XI_KEY", "azure": "TEST_AZ_KEY", "openai": "TEST_OAI_KEY"}
MS_PER_WORD = 120
TEXT = "one two three four five six seven eight nine ten"  # 10 words: 1.2 s of audio
SENTENCE_S = 1.2
CHUNK_S = 0.1  # the loopbacks stream 100 ms chunks


# --- fixtures and helpers ----------------------------------------------------------------------


def make_server(name: str, **kw: Any) -> LoopbackServer:
    cls = {"elevenlabs": ElevenLabsServer, "azure": AzureSpeechServer}.get(name, OpenAISpeechServer)
    return cls(frequency_hz=FREQ[name], ms_per_word=MS_PER_WORD, **kw)


@pytest.fixture(scope="module")
async def loopbacks() -> AsyncIterator[dict[str, Any]]:
    servers = {name: make_server(name) for name in PROVIDERS}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


@pytest.fixture(autouse=True)
def _healed(loopbacks: dict[str, Any]) -> None:
    for server in loopbacks.values():
        server.heal()
        server.last = None


def options(name: str, url: str, key: str | None = None, **kw: Any) -> ConnectorOptions:
    key = key or KEYS[name]
    if name == "elevenlabs":
        return ElevenLabsOptions(api_key=key, voice_id="voice-1", base_url=url, **kw)
    if name == "azure":
        return AzureTTSOptions(api_key=key, base_url=url, **kw)
    return OpenAITTSOptions(api_key=key, base_url=f"{url}/v1", **kw)


@asynccontextmanager
async def connector(name: str, server: LoopbackServer, **kw: Any) -> AsyncIterator[TTSConnector]:
    conn = connector_class("tts", name)(options(name, server.url, **kw))
    assert isinstance(conn, TTSConnector)
    await conn.warmup()
    try:
        yield conn
    finally:
        await conn.aclose()


async def collect(conn: TTSConnector, text: str = TEXT) -> list[bytes]:
    return [chunk async for chunk in conn.synthesize(text)]


def seconds(items: list[tuple[bytes, int]]) -> float:
    return sum(len(pcm) / 2 / rate for pcm, rate in items)


def agent(tts: dict[str, Any]) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "pipeline": {
                "name": "tts-test",
                "flow": [
                    {"from": "transport", "to": "stt", "stream": "audio"},
                    {"from": "stt", "to": "llm", "stream": "text"},
                    {"from": "llm", "to": "tts", "stream": "text"},
                    {"from": "tts", "to": "transport", "stream": "audio"},
                ],
            },
            "connectors": {"stt": {"primary": "whisper"}, "llm": {"primary": "echo"}, "tts": tts},
        }
    )


def chain_options(name: str, url: str, **kw: Any) -> dict[str, Any]:
    """Options as a config carries them: the key as a ${ENV} reference."""
    opts = options(name, url, key=f"${{{ENV[name]}}}", **kw)
    return opts.model_dump(exclude_none=True)


@pytest.fixture
def env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, var in ENV.items():
        monkeypatch.setenv(var, KEYS[name])


async def run_chain(chain: Chain, text: str = TEXT) -> list[tuple[str, bytes, int]]:
    out = []
    async for conn, (pcm, rate) in chain.stream(lambda c, done: resume_sentence(c, text, done)):
        out.append((conn.name, pcm, rate))
    return out


# --- audio -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "extra", "rate"),
    [
        ("elevenlabs", {}, 16000),
        ("elevenlabs", {"output_format": "pcm_24000"}, 24000),
        ("azure", {}, 16000),
        ("azure", {"output_format": "raw-48khz-16bit-mono-pcm"}, 48000),
        ("openai", {}, 24000),
    ],
)
async def test_streams_pcm_at_native_rate(
    loopbacks: dict[str, Any], name: str, extra: dict[str, Any], rate: int
) -> None:
    server = loopbacks[name]
    async with connector(name, server, **extra) as conn:
        assert conn.sample_rate == rate
        chunks = await collect(conn)
    pcm = b"".join(chunks)
    assert len(chunks) > 1, "streamed in pieces, not one body"
    assert all(len(c) % 2 == 0 for c in chunks)
    assert len(pcm) == int(rate * SENTENCE_S) * 2
    assert dominant_hz(pcm, rate) == pytest.approx(FREQ[name], abs=5)
    assert server.last["text"] == TEXT


@pytest.mark.parametrize("name", PROVIDERS)
async def test_odd_chunks_are_realigned_to_whole_samples(name: str) -> None:
    async with make_server(name, chunk_bytes=1001) as server, connector(name, server) as conn:
        chunks = await collect(conn)
        expected = tone_pcm(TEXT, conn.sample_rate, FREQ[name], MS_PER_WORD)
    assert all(len(c) % 2 == 0 and c for c in chunks)
    assert b"".join(chunks) == expected  # no byte lost, doubled or shifted


async def test_whole_samples_carries_odd_bytes() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for p in (b"\x01", b"\x02\x03", b"\x04\x05\x06", b"", b"\x07"):
            yield p

    out = [c async for c in whole_samples(pieces())]
    assert out == [b"\x01\x02", b"\x03\x04\x05\x06"]  # a trailing half sample is dropped


async def test_empty_text_makes_no_request(loopbacks: dict[str, Any]) -> None:
    for name in PROVIDERS:
        server = loopbacks[name]
        before = server.requests
        async with connector(name, server) as conn:
            assert await collect(conn, "   ") == []
        assert server.requests == before


# --- on the wire -------------------------------------------------------------------------------


async def test_elevenlabs_request(loopbacks: dict[str, Any]) -> None:
    server = loopbacks["elevenlabs"]
    async with connector("elevenlabs", server, model_id="eleven_turbo_v2_5") as conn:
        await collect(conn)
    last = server.last
    assert last["voice_id"] == "voice-1"
    assert last["output_format"] == "pcm_16000"
    assert last["model_id"] == "eleven_turbo_v2_5"
    assert last["headers"]["xi-api-key"] == KEYS["elevenlabs"]


async def test_azure_request(loopbacks: dict[str, Any]) -> None:
    server = loopbacks["azure"]
    async with connector("azure", server, voice="en-GB-SoniaNeural") as conn:
        await collect(conn)
    last = server.last
    assert last["voice"] == "en-GB-SoniaNeural"
    assert last["lang"] == "en-GB"
    assert last["rate"] is None
    assert last["output_format"] == "raw-16khz-16bit-mono-pcm"
    headers = last["headers"]
    assert headers["ocp-apim-subscription-key"] == KEYS["azure"]
    assert headers["content-type"] == "application/ssml+xml"
    assert headers["x-microsoft-outputformat"] == "raw-16khz-16bit-mono-pcm"
    assert headers["user-agent"] == "voicemesh"


async def test_openai_request(loopbacks: dict[str, Any]) -> None:
    server = loopbacks["openai"]
    async with connector("openai", server, voice="nova", instructions="Speak calmly.") as conn:
        await collect(conn)
    last = server.last
    assert last["headers"]["authorization"] == f"Bearer {KEYS['openai']}"
    assert last["model"] == "gpt-4o-mini-tts"
    assert last["voice"] == "nova"
    assert last["response_format"] == "pcm"
    assert last["instructions"] == "Speak calmly."


async def test_azure_ssml_escapes_text(loopbacks: dict[str, Any]) -> None:
    text = """Tom & Jerry said "<b>hi</b>" & it's 5 > 3 < 4 ]]> &amp;"""
    server = loopbacks["azure"]
    async with connector("azure", server, rate="+10%") as conn:
        pcm = b"".join(await collect(conn, text))
    assert server.last["text"] == text  # reached Azure intact, markup and all
    assert server.last["rate"] == "+10%"
    assert "&amp;amp;" in server.last["ssml"] and "&lt;b&gt;" in server.last["ssml"]
    assert len(pcm) == 16000 * MS_PER_WORD * len(text.split()) // 1000 * 2


def test_ssml_document() -> None:
    doc = ssml("a 'quoted' <word>", "en-US-Guy'Neural", "-5%")
    root = ET.fromstring(doc)
    voice = root.find("voice")
    assert root.tag == "speak" and root.get("version") == "1.0"
    assert voice is not None and voice.get("name") == "en-US-Guy'Neural"
    prosody = voice.find("prosody")
    assert prosody is not None and prosody.get("rate") == "-5%"
    assert prosody.text == "a 'quoted' <word>"
    assert ET.fromstring(ssml("x", "custom")).get("{http://www.w3.org/XML/1998/namespace}lang")


def test_options_that_cannot_work_fail_at_load() -> None:
    with pytest.raises(ValueError, match="region"):
        connector_class("tts", "azure")(AzureTTSOptions(api_key="k"))
    with pytest.raises(ValueError, match="api_key"):
        connector_class("tts", "openai")(OpenAITTSOptions())
    region = connector_class("tts", "azure")(AzureTTSOptions(api_key="k", region="westeurope"))
    assert region.base_url == "https://westeurope.tts.speech.microsoft.com"  # type: ignore[attr-defined]


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(
    ("mode", "kind", "status"),
    [
        ("error", FailureKind.SERVER, 500),
        ("500", FailureKind.SERVER, 500),
        ("429", FailureKind.RATE_LIMIT, 429),
        ("401", FailureKind.PERMANENT, 401),
    ],
)
async def test_http_failures_classify(
    loopbacks: dict[str, Any], name: str, mode: str, kind: FailureKind, status: int
) -> None:
    server = loopbacks[name]
    server.fail(mode, times=1)
    before = server.requests
    async with connector(name, server) as conn:
        with pytest.raises(Exception) as info:
            await collect(conn)
        assert server.requests - before == 1, "the SDK must not retry on its own"
        err = classify(info.value)
        assert (err.kind, err.status) == (kind, status)
        assert err.retryable is (kind is not FailureKind.PERMANENT)
        if mode == "429":
            assert err.retry_after_s == 1.0
        assert KEYS[name] not in str(err)
        healed = b"".join(await collect(conn))  # times=1: the next request works
        assert len(healed) == int(conn.sample_rate * SENTENCE_S) * 2


@pytest.mark.parametrize("name", PROVIDERS)
async def test_stream_cut_midway_classifies_as_stream(loopbacks: dict[str, Any], name: str) -> None:
    server = loopbacks[name]
    server.fail("die", after=2, times=1)
    async with connector(name, server) as conn:
        got: list[bytes] = []
        with pytest.raises(Exception) as info:
            async for chunk in conn.synthesize(TEXT):
                got.append(chunk)
        # the two chunks that were sent all arrived, then the cut surfaced
        assert len(b"".join(got)) == int(conn.sample_rate * 2 * CHUNK_S) * 2
    assert classify(info.value, started=True).kind is FailureKind.STREAM
    assert classify(info.value).kind is FailureKind.NETWORK


@pytest.mark.parametrize("name", PROVIDERS)
async def test_stream_cut_before_audio_is_a_network_failure(
    loopbacks: dict[str, Any], name: str
) -> None:
    server = loopbacks[name]
    server.fail("die", after=0, times=1)
    async with connector(name, server) as conn:
        with pytest.raises(ConnectorError) as info:
            await collect(conn)
    assert classify(info.value, started=False).kind is FailureKind.NETWORK


@pytest.mark.parametrize("name", PROVIDERS)
async def test_hang_is_caught_by_the_chain(
    loopbacks: dict[str, Any], env_keys: None, name: str
) -> None:
    server = loopbacks[name]
    server.fail("hang")
    config = agent(
        {
            "primary": name,
            "fallback": ["tone"],
            "attempt_timeout_ms": 1000,
            "config": {name: chain_options(name, server.url), "tone": {"sample_rate": 16000}},
        }
    )
    pool = ConnectorPool()
    try:
        chain = Chain(pool, config, "tts", health=None)
        t0 = time.perf_counter()
        out = await run_chain(chain)
        elapsed = time.perf_counter() - t0
    finally:
        await pool.aclose()
    assert elapsed < 4.0  # one deadline, not the client's own long timeout
    assert {conn for conn, _, _ in out} == {"tone"}
    assert [(n, e.kind) for n, e in chain.failures] == [(name, FailureKind.TIMEOUT)]
    pcm = b"".join(p for _, p, _ in out)
    assert dominant_hz(pcm, 16000) == pytest.approx(FREQ["tone"], abs=5)


# --- probes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROVIDERS)
async def test_probe(loopbacks: dict[str, Any], name: str) -> None:
    server = loopbacks[name]
    async with connector(name, server) as conn:
        assert conn.can_probe
        before = server.requests
        await conn.probe()
        assert server.requests == before + 1  # a real request
        for mode, kind in (("500", FailureKind.SERVER), ("401", FailureKind.PERMANENT)):
            server.fail(mode, times=1)
            with pytest.raises(Exception) as info:
                await conn.probe()
            assert classify(info.value).kind is kind
        await conn.probe()  # healed


async def test_probe_of_a_dead_server_is_a_network_failure() -> None:
    server = make_server("azure")
    await server.start()
    url = server.url
    await server.stop()
    for name in PROVIDERS:
        conn = connector_class("tts", name)(options(name, url))
        try:
            with pytest.raises(Exception) as info:
                await conn.probe()
            assert classify(info.value).kind is FailureKind.NETWORK
        finally:
            await conn.aclose()


# --- secrets -----------------------------------------------------------------------------------


def sent_key(name: str, server: Any) -> str:
    headers = server.last["headers"]
    if name == "elevenlabs":
        return headers["xi-api-key"]
    if name == "azure":
        return headers["ocp-apim-subscription-key"]
    return headers["authorization"].removeprefix("Bearer ")


@pytest.mark.parametrize("name", PROVIDERS)
async def test_secret_reference_resolved_by_the_pool(
    loopbacks: dict[str, Any], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    server = loopbacks[name]
    secret = f"{name}-secret-from-env-42"
    monkeypatch.setenv(ENV[name], secret)
    pool = ConnectorPool()
    try:
        ref = options(name, server.url, key=f"${{{ENV[name]}}}")
        conn = await pool.get("tts", name, ref)
        assert isinstance(conn, TTSConnector)
        assert len(await collect(conn)) > 0
        assert sent_key(name, server) == secret  # the server saw the value, not the reference
        assert ref.model_dump()["api_key"] == f"${{{ENV[name]}}}"  # the config keeps the ref

        server.fail("401", times=1)
        with pytest.raises(Exception) as info:
            await collect(conn)
        assert secret not in str(classify(info.value))

        monkeypatch.delenv("TEST_TTS_KEY_MISSING", raising=False)
        with pytest.raises(LookupError, match="TEST_TTS_KEY_MISSING"):
            await pool.get("tts", name, options(name, server.url, key="${TEST_TTS_KEY_MISSING}"))
    finally:
        await pool.aclose()


# --- fallback ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("error", FailureKind.SERVER),
        ("500", FailureKind.SERVER),
        ("429", FailureKind.RATE_LIMIT),
        ("401", FailureKind.PERMANENT),
        ("hang", FailureKind.TIMEOUT),
        ("die", FailureKind.STREAM),
    ],
)
async def test_fallback_to_azure_resumes_the_sentence(
    loopbacks: dict[str, Any], env_keys: None, mode: str, kind: FailureKind
) -> None:
    eleven, azure = loopbacks["elevenlabs"], loopbacks["azure"]
    eleven.fail(mode, after=2)  # every request fails until the autouse fixture heals
    config = agent(
        {
            "primary": "elevenlabs",
            "fallback": ["azure"],
            # short only where the primary hangs: elsewhere a cold client on a loaded CI
            # machine must not turn the failure under test into a timeout
            "attempt_timeout_ms": 1000 if mode == "hang" else 5000,
            "config": {
                "elevenlabs": chain_options("elevenlabs", eleven.url),
                # another rate than the primary: the resume point is found by duration
                "azure": chain_options(
                    "azure", azure.url, output_format="raw-24khz-16bit-mono-pcm"
                ),
            },
        }
    )
    pool = ConnectorPool()
    try:
        chain = Chain(pool, config, "tts", health=None)
        out = await run_chain(chain)
    finally:
        await pool.aclose()

    assert [(n, e.kind) for n, e in chain.failures] == [("elevenlabs", kind)]
    from_eleven = [(p, r) for n, p, r in out if n == "elevenlabs"]
    from_azure = [(p, r) for n, p, r in out if n == "azure"]
    assert [n for n, _, _ in out] == sorted((n for n, _, _ in out), key=PROVIDERS.index)
    assert from_azure and {r for _, r in from_azure} == {24000}
    assert azure.last["text"] == TEXT  # the whole sentence went to the fallback
    assert dominant_hz(b"".join(p for p, _ in from_azure), 24000) == pytest.approx(
        FREQ["azure"], abs=5
    )
    if mode == "die":
        assert seconds(from_eleven) == pytest.approx(2 * CHUNK_S, abs=0.01)
        assert dominant_hz(b"".join(p for p, _ in from_eleven), 16000) == pytest.approx(
            FREQ["elevenlabs"], abs=10
        )
    else:
        assert from_eleven == []
    # one sentence in all, not the part already heard plus the whole sentence again
    assert seconds(from_eleven + from_azure) == pytest.approx(SENTENCE_S, abs=CHUNK_S)
