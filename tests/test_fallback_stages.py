"""Fallback through the real stage services: for each stage and each way a provider fails, the
primary (a loopback server speaking the provider's protocol) fails and the session's audio still
arrives, with no text lost or repeated and sentences in order; a healed primary takes new work
again on every instance.

Stage services run in-process on the real NATS and Valkey; providers are loopback servers.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from tests.support import Inbox, Services, dominant_hz, has_last, listen, until
from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects
from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.connectors.health import fingerprint
from voicemesh.pipeline import LLMService, STTService, TTSService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.anthropic import AnthropicServer
from voicemesh.testing.loopback.azure import AzureSpeechServer
from voicemesh.testing.loopback.deepgram import DeepgramServer
from voicemesh.testing.loopback.elevenlabs import ElevenLabsServer
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer
from voicemesh.transport.call.egress import Reorderer

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

REPLY = "The tide comes in at noon. Boats wait by the pier. Gulls circle over the harbour wall."
HEARD = "when is high tide today"
MODES = ["error", "hang", "429", "500", "401", "die"]
TIMEOUT_MS = 400
PRIMARY_HZ, FALLBACK_HZ = 300.0, 500.0


@dataclass
class Providers:
    chat: OpenAIChatServer
    claude: AnthropicServer
    eleven: ElevenLabsServer
    azure: AzureSpeechServer
    deepgram: DeepgramServer
    whisper_api: OpenAITranscribeServer

    @property
    def all(self) -> list[Any]:
        return [self.chat, self.claude, self.eleven, self.azure, self.deepgram, self.whisper_api]


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the test's own variable names in these connectors' credentials."""
    monkeypatch.setenv(
        "VOICEMESH_SECRET_ENV",
        "deepgram:VM_TEST_KEY;openai:VM_TEST_KEY;anthropic:VM_TEST_KEY;elevenlabs:VM_TEST_KEY;azure:VM_TEST_KEY",
    )


@pytest.fixture
async def providers(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Providers]:
    monkeypatch.setenv("VM_TEST_KEY", "sk-loopback-secret")
    p = Providers(
        OpenAIChatServer([REPLY], chunk_words=2),
        AnthropicServer([REPLY], chunk_words=2),
        ElevenLabsServer(frequency_hz=PRIMARY_HZ),
        AzureSpeechServer(frequency_hz=FALLBACK_HZ),
        DeepgramServer(HEARD),
        OpenAITranscribeServer(HEARD),
    )
    for server in p.all:
        await server.start()
    yield p
    for server in p.all:
        await server.stop()


def cloud_config(agent_json: dict, p: Providers) -> AgentConfig:
    key = "${VM_TEST_KEY}"
    common = {"attempt_timeout_ms": TIMEOUT_MS, "probe_interval_ms": 200}
    data = {**agent_json}
    data["connectors"] = {
        "stt": {
            "primary": "deepgram",
            "fallback": ["openai"],
            "config": {
                "deepgram": {"api_key": key, "base_url": p.deepgram.ws_url},
                "openai": {"api_key": key, "base_url": p.whisper_api.base_url},
            },
            **common,
        },
        "llm": {
            "primary": "openai",
            "fallback": ["anthropic"],
            "config": {
                "openai": {"api_key": key, "base_url": f"{p.chat.url}/v1", "model": "gpt-x"},
                "anthropic": {"api_key": key, "base_url": p.claude.url, "model": "claude-x"},
            },
            **common,
        },
        "tts": {
            "primary": "elevenlabs",
            "fallback": ["azure"],
            "config": {
                "elevenlabs": {"api_key": key, "base_url": p.eleven.url, "voice_id": "v1"},
                "azure": {"api_key": key, "base_url": p.azure.url},
            },
            **common,
        },
    }
    return parse_agent_config(data)


@dataclass
class Reply:
    text: str
    connectors: list[str]
    indexes: list[int]
    audio: list[Frame]

    def pcm_by_rate(self) -> dict[int, bytes]:
        out: dict[int, bytearray] = {}
        for f in self.audio:
            out.setdefault(f.sample_rate, bytearray()).extend(f.payload)
        return {r: bytes(b) for r, b in out.items()}


async def reply_of(inbox: Inbox, epoch: int, limit_s: float = 10.0) -> Reply:
    """The reply as the transport plays it: audio through the reorderer until it completes
    (sentences synthesized in parallel can arrive after the end-of-reply marker), transcripts."""

    def play(frames: list[Frame]) -> tuple[Reorderer, list[Frame]]:
        order = Reorderer()
        order.reset(epoch)
        played = [
            g for f in frames if f.kind is Kind.AUDIO and f.epoch == epoch for g in order.push(f)
        ]
        return order, played

    frames = await inbox.wait_for(lambda fs: play(fs)[0].done, limit_s)
    _, played = play(frames)
    events = [f.as_event for f in frames if f.kind is Kind.EVENT and f.epoch == epoch]
    said = [e for e in events if e.get("type") == "transcript" and e["role"] == "assistant"]
    return Reply(
        text=" ".join(e["text"] for e in said),
        connectors=[e["connector"] for e in said],
        indexes=[e["index"] for e in said],
        audio=[f for f in played if f.payload],
    )


@dataclass
class Rig:
    """What every test here works with: the loopback providers, the stage services, the bus and
    the store on the test's prefixes, and the default agent to build the cloud config from."""

    providers: Providers
    services: Services
    bus: Bus
    store: ConfigStore
    subjects: Subjects
    agent_json: dict

    def config(self) -> AgentConfig:
        return cloud_config(self.agent_json, self.providers)

    async def session(self, config: AgentConfig | None = None) -> str:
        return (await self.store.create_session(config or self.config())).session_id

    async def start_llm_and_tts(self, instances: int = 1) -> list[Any]:
        started = []
        for _ in range(instances):
            started.append(await self.services.start(LLMService))
            started.append(await self.services.start(TTSService))
        return started

    async def say(self, sid: str, text: str, epoch: int) -> None:
        turn = Frame.event({"type": "turn", "epoch": epoch}, epoch=epoch)
        await self.bus.publish(self.subjects.ctl(sid), turn)
        await self.bus.publish(self.subjects.data("llm", sid), Frame.text(text, epoch=epoch))

    async def one_turn(self, text: str = "when is the tide?") -> tuple[str, Reply]:
        """A session on the cloud config, one LLM and one TTS instance, one turn: its reply."""
        sid = await self.session()
        await self.start_llm_and_tts()
        out = await listen(self.bus, self.subjects.data("transport", sid))
        await self.say(sid, text, 1)
        return sid, await reply_of(out, 1)


@pytest.fixture
def rig(
    providers: Providers,
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> Rig:
    return Rig(providers, services, bus, store, subjects, agent_json)


# --- a failing primary, per stage --------------------------------------------------------------


async def llm_reply_arrives_whole(rig: Rig, mode: str) -> None:
    sid, reply = await rig.one_turn()

    assert reply.text == REPLY  # nothing lost, nothing said twice
    assert reply.indexes == list(range(len(reply.indexes)))
    assert reply.connectors[-1] == "anthropic"
    if mode == "die":
        assert reply.connectors[0] == "openai", "the sentence already sent keeps its source"
    assert reply.audio and all(f.sample_rate == 16000 for f in reply.audio)
    context = await rig.store.get_context(sid)
    assert context[-1]["role"] == "assistant" and context[-1]["content"] == REPLY


async def tts_every_sentence_is_heard_in_order(rig: Rig, mode: str) -> None:
    _, reply = await rig.one_turn()

    assert reply.text == REPLY
    # the reply's units (voicemesh/pipeline/text.py): the first unit would end after five words,
    # but not on "at", which leans on the next word; so here it is the first sentence
    units = [
        "The tide comes in at noon.",
        "Boats wait by the pier.",
        "Gulls circle over the harbour wall.",
    ]
    assert " ".join(units) == REPLY
    assert reply.indexes == list(range(len(units)))
    pcm = b"".join(f.payload for f in reply.audio)
    seconds = len(pcm) / 2 / 16000
    expected = sum(len(s.split()) for s in units) * 0.120  # the loopbacks' 120 ms per word
    # each unit once: a "die" resumes where ElevenLabs' audio stopped, it does not restart
    assert abs(seconds - expected) < 0.15 * len(units), (seconds, expected)
    assert abs(dominant_hz(pcm, 16000) - FALLBACK_HZ) < 15


def utterance(ms: int = 800) -> bytes:
    t = np.arange(16 * ms) / 16000
    return (np.sin(2 * np.pi * 220 * t) * 6000).astype(np.int16).tobytes()


async def stt_utterance_is_replayed_whole(rig: Rig, mode: str) -> None:
    bus, subjects = rig.bus, rig.subjects
    sid = await rig.session()
    stt = await rig.services.start(STTService)
    await rig.start_llm_and_tts()
    out = await listen(bus, subjects.data("transport", sid))
    reply = await bus.nc.request(subjects.assign("stt"), b'{"session_id": "%s"}' % sid.encode())
    assert stt.instance in reply.data.decode()

    pcm = utterance()
    await bus.publish(subjects.ctl(sid), Frame.event({"type": "turn", "epoch": 1}, epoch=1))
    frames = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    for seq, chunk in enumerate(frames):
        flags = Flag.START if seq == 0 else Flag.NONE
        await bus.publish(
            subjects.data("stt", sid),
            Frame.audio(chunk, sample_rate=16000, epoch=1, seq=seq, flags=flags),
        )
    await bus.publish(
        subjects.data("stt", sid),
        Frame.audio(b"", sample_rate=16000, epoch=1, seq=len(frames), flags=Flag.END),
    )
    finished = await out.wait_for(
        lambda fs: any(
            f.kind is Kind.EVENT and f.as_event.get("final") and f.as_event["role"] == "user"
            for f in fs
        ),
        10,
    )
    final = next(f.as_event for f in finished if f.kind is Kind.EVENT and f.as_event.get("final"))
    assert final["text"] == HEARD and final["connector"] == "openai"
    # the whole utterance was replayed to the fallback, from its start
    assert rig.providers.whisper_api.last["pcm_bytes"] == len(pcm)
    reply = await reply_of(out, 1)
    assert reply.text == REPLY and reply.audio


@dataclass
class StageCase:
    primary: str  # the Providers field of the stage's primary
    after: int  # the chunks it serves before a "die" cuts it
    check: Callable[[Rig, str], Awaitable[None]]


STAGES = {
    # "die" cuts OpenAI's stream after 5 chunks (10 words): the reply must go on from there.
    "llm": StageCase("chat", 5, llm_reply_arrives_whole),
    "tts": StageCase("eleven", 2, tts_every_sentence_is_heard_in_order),
    "stt": StageCase("deepgram", 1, stt_utterance_is_replayed_whole),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", STAGES)
async def test_a_failing_primary_loses_no_work(stage: str, mode: str, rig: Rig) -> None:
    """llm: the reply still arrives whole; tts: every sentence is still heard, in order; stt:
    the utterance is replayed whole to the fallback."""
    case = STAGES[stage]
    getattr(rig.providers, case.primary).fail(mode, after=case.after)
    await case.check(rig, mode)


@pytest.mark.clusters(only=True)  # the e2e subset run on the clusters (test_clusters.py)
@pytest.mark.parametrize("stage", STAGES)
async def test_a_primary_dying_mid_stream_loses_no_work_on_the_clusters(
    stage: str, rig: Rig
) -> None:
    await test_a_failing_primary_loses_no_work(stage, "die", rig)


# --- recovery ---------------------------------------------------------------------------------


@pytest.mark.clusters  # the e2e subset run on the clusters too (test_clusters.py)
async def test_a_healed_primary_takes_new_work_again_on_every_instance(rig: Rig) -> None:
    config = rig.config()
    sid = await rig.session(config)
    stages = await rig.start_llm_and_tts(instances=2)
    llms = [s for s in stages if isinstance(s, LLMService)]
    cid = ("llm", "openai", fingerprint(config.options("llm", "openai")))
    out = await listen(rig.bus, rig.subjects.data("transport", sid))

    rig.providers.chat.fail("500")
    await rig.say(sid, "first", 1)
    first = await reply_of(out, 1)
    assert set(first.connectors) == {"anthropic"}
    # the failure seen by one instance is known to both at once
    await until(lambda: all(s.health.is_down(cid) for s in llms), 2, "both instances to know")

    rig.providers.chat.heal()
    await until(lambda: not any(s.health.is_down(cid) for s in llms), 5, "the probe to heal it")
    served_before = rig.providers.chat.served
    for epoch in range(2, 6):
        await rig.say(sid, f"turn {epoch}", epoch)
        again = await reply_of(out, epoch)
        assert set(again.connectors) == {"openai"}, (epoch, again.connectors)
    assert rig.providers.chat.served - served_before == 4
    for svc in llms:  # every instance now puts the primary first again
        assert svc.chain(config).order() == ["openai", "anthropic"]


async def test_a_failover_is_told_to_the_caller_as_it_happens_once(rig: Rig) -> None:
    """The caller (and the console's session view) learns of a failover when it happens, by the
    failure's code: never the provider's words. The next turn starts on the healthy connector
    (the primary is marked down), which is no failover, so nothing more is told."""
    sid = await rig.session(rig.config())
    await rig.start_llm_and_tts()
    out = await listen(rig.bus, rig.subjects.data("transport", sid))

    def warnings() -> list[dict[str, Any]]:
        # the LLM's: on a loaded machine the rig's TTS may fail over too, and is told as well
        events = [f.as_event for f in out.frames if f.kind is Kind.EVENT]
        return [e for e in events if e["type"] == "warning" and e.get("stage") == "llm"]

    rig.providers.chat.fail("500")
    await rig.say(sid, "first", 1)
    assert set((await reply_of(out, 1)).connectors) == {"anthropic"}
    told = warnings()
    assert len(told) == 1, told
    assert told[0]["code"] == "fallback" and told[0]["stage"] == "llm" and told[0]["epoch"] == 1
    assert told[0]["message"].startswith("openai failed (CONNECTOR_SERVER_")
    assert told[0]["message"].endswith("); anthropic took over")
    assert "processing your request" not in str(out.frames)  # the provider's own words
    await rig.say(sid, "second", 2)
    await reply_of(out, 2)
    assert len(warnings()) == 1


async def test_a_down_mark_lapses_when_nobody_probes_it(rig: Rig) -> None:
    """If the instance probing a failed connector dies, the mark expires by itself."""
    config = rig.config()
    llm = await rig.services.start(LLMService)
    cid = ("llm", "openai", fingerprint(config.options("llm", "openai")))
    from voicemesh.connectors.errors import ConnectorError, FailureKind

    await llm.health.mark_down(
        cid,
        ConnectorError(FailureKind.SERVER, "x"),
        hold_ms=300,
        probe=None,
        probe_interval_ms=100,
    )
    assert llm.health.is_down(cid)
    assert await rig.store.client.exists(llm.health.key(cid))
    await asyncio.sleep(0.5)
    assert not llm.health.is_down(cid)
    assert not await rig.store.client.exists(llm.health.key(cid))


async def test_no_resolved_secret_reaches_valkey_the_bus_or_a_log_line(
    caplog: pytest.LogCaptureFixture,
    rig: Rig,
) -> None:
    rig.providers.chat.fail("401")
    sid = await rig.session()
    await rig.start_llm_and_tts()
    everything = await listen(rig.bus, ">")
    await rig.say(sid, "hi", 1)
    await everything.wait_for(lambda fs: has_last([f for f in fs if f.kind is Kind.AUDIO]), 10)
    headers = rig.providers.claude.last_headers
    assert "sk-loopback-secret" in (headers.get("x-api-key", "") + headers.get("authorization", ""))
    blob = b"".join(
        [f.payload for f in everything.frames]
        + [await rig.store.client.dump(k) or b"" for k in await rig.store.client.keys("*")]
    )
    assert b"sk-loopback-secret" not in blob
    assert b"${VM_TEST_KEY}" in blob  # the reference is what is stored
    assert any("401" in r.getMessage() for r in caplog.records)  # the failure was logged...
    assert not any("sk-loopback-secret" in r.getMessage() for r in caplog.records)  # ...safely


async def test_connector_metrics_count_requests_errors_and_fallbacks(rig: Rig) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "req": value("voicemesh_connector_requests_total", stage="llm", connector="openai"),
        "err": value(
            "voicemesh_connector_errors_total", stage="llm", connector="openai", kind="rate_limit"
        ),
        "fb": value(
            "voicemesh_connector_fallbacks_total",
            stage="llm",
            from_connector="openai",
            to_connector="anthropic",
            kind="rate_limit",
        ),
        "first": value(
            "voicemesh_connector_first_result_seconds_count", stage="llm", connector="anthropic"
        ),
    }
    rig.providers.chat.fail("429")
    await rig.one_turn("hi")
    assert value("voicemesh_connector_requests_total", stage="llm", connector="openai") == (
        before["req"] + 1
    )
    assert (
        value(
            "voicemesh_connector_errors_total", stage="llm", connector="openai", kind="rate_limit"
        )
        == before["err"] + 1
    )
    assert (
        value(
            "voicemesh_connector_fallbacks_total",
            stage="llm",
            from_connector="openai",
            to_connector="anthropic",
            kind="rate_limit",
        )
        == before["fb"] + 1
    )
    assert (
        value("voicemesh_connector_first_result_seconds_count", stage="llm", connector="anthropic")
        == before["first"] + 1
    )


async def test_the_last_connector_left_is_waited_for_past_the_attempt_timeout(rig: Rig) -> None:
    """The attempt timeout is a reason to fail over; with nowhere left to go (a single
    connector, or the last one), a slow answer is waited for instead of losing the turn."""
    data = orjson.loads(rig.config().to_json())
    data["connectors"]["llm"]["fallback"] = []
    # every chunk slower than the timeout
    rig.providers.chat.chunk_delay_s = (TIMEOUT_MS + 300) / 1000
    sid = await rig.session(parse_agent_config(data))
    await rig.start_llm_and_tts()
    out = await listen(rig.bus, rig.subjects.data("transport", sid))
    await rig.say(sid, "slowly please", 1)
    reply = await reply_of(out, 1, limit_s=60)
    assert reply.text == REPLY and set(reply.connectors) == {"openai"}


async def test_a_busy_local_engine_fails_the_unit_over_but_is_not_marked_down(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local engine (SmolLM2, whisper, Piper) serves one request at a time, so past the attempt
    timeout it is most likely busy with another session's turn. That turn fails over; the
    engine is not marked down, or every session would get the fallback while it is free."""
    from voicemesh.connectors.llm.scripted import ScriptedLLM

    slow = ScriptedLLM.stream

    async def busy_then_answer(self: ScriptedLLM, messages: list[Any]) -> AsyncIterator[str]:
        await asyncio.sleep(0.5)  # longer than the attempt timeout: queued behind another turn
        async for piece in slow(self, messages):
            yield piece

    monkeypatch.setattr(ScriptedLLM, "engine", "a local engine (test)")
    monkeypatch.setattr(ScriptedLLM, "stream", busy_then_answer)
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "fallback": ["echo"],
        "attempt_timeout_ms": 200,
        "config": {"scripted": {"replies": ["From the engine."]}},
    }
    data["connectors"]["tts"] = {"primary": "tone"}
    config = parse_agent_config(data)
    sid = (await store.create_session(config)).session_id
    out = await listen(bus, subjects.data("tts", sid))
    llm = await services.start(LLMService)
    cid = ("llm", "scripted", fingerprint(config.options("llm", "scripted")))
    for epoch in (1, 2):
        await bus.publish(subjects.data("llm", sid), Frame.text(f"turn {epoch}", epoch=epoch))
        frames = await out.wait_for(lambda fs, e=epoch: has_last(fs, e), limit_s=5)
        said = " ".join(f.as_text for f in frames if f.epoch == epoch and f.payload)
        assert said.startswith("You said"), said  # the fallback (echo) answered the turn ...
        assert not llm.health.is_down(cid)  # ... and the engine is still first for the next
        assert llm.chain(config).order() == ["scripted", "echo"]
