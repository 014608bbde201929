"""A unit of work whose stage instance dies is sent again and finishes, once: the transport's
turn supervisor sees its claim lapse; the LLM resumes after the sentences already sent; a
sentence synthesized again is not heard twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support import Inbox, Services, listen, until
from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.pipeline import LLMService, TTSService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer
from voicemesh.transport.api.service import TransportService
from voicemesh.transport.call.egress import Reorderer
from voicemesh.transport.call.supervisor import TurnSupervisor

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

REPLY = "One fish swims. Two fish swim. Red fish rest. Blue fish dream. Old fish sleep."


def test_a_sentence_that_starts_over_is_not_heard_twice() -> None:
    order = Reorderer()
    order.reset(1)
    pcm = bytes(range(256)) * 5  # 640 samples at 16 kHz: 40 ms per chunk

    def chunk(seq: int, flags: Flag = Flag.NONE) -> Frame:
        return Frame.audio(pcm, sample_rate=16000, epoch=1, index=0, seq=seq, flags=flags)

    heard = order.push(chunk(0, Flag.START)) + order.push(chunk(1))  # 80 ms, then the TTS dies
    # redelivered: the same sentence from its start, 3 chunks and its end
    again = order.push(chunk(0, Flag.START)) + order.push(chunk(1)) + order.push(chunk(2))
    end = order.push(Frame.audio(b"", sample_rate=16000, epoch=1, index=0, seq=3, flags=Flag.END))
    assert sum(len(f.payload) for f in heard) == 2 * len(pcm)
    assert sum(len(f.payload) for f in again) == len(pcm)  # only the part not heard yet
    assert order.next_index == 1 and len(end) == 1


@pytest.fixture
def fast_leases(settings: Settings) -> Settings:
    return settings.model_copy(update={"lease_ttl_ms": 600})


@pytest.mark.clusters  # the e2e subset run on the clusters too (test_clusters.py)
async def test_an_llm_instance_dying_mid_reply_costs_a_gap_not_the_turn(
    fast_leases: Settings,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    services = Services(fast_leases)
    chat = OpenAIChatServer([REPLY], chunk_words=1, chunk_delay_s=0.08)
    await chat.start()
    transport = TransportService(fast_leases)
    await transport.start()
    try:
        data = {**agent_json}
        data["connectors"] = {
            "llm": {
                "primary": "openai",
                "config": {"openai": {"base_url": f"{chat.url}/v1", "model": "m"}},
            },
            "tts": {"primary": "tone"},
            "stt": agent_json["connectors"]["stt"],
        }
        sid = (await store.create_session(parse_agent_config(data))).session_id
        doomed: LLMService = await services.start(LLMService)
        await services.start(TTSService)
        out = await listen(bus, subjects.data("transport", sid))
        tts_in = await listen(bus, subjects.data("tts", sid))

        supervisor = TurnSupervisor(transport, sid)
        supervisor.begin(1)
        supervisor.ended([])
        await bus.publish(
            subjects.data("llm", sid),
            Frame.text("count fish", epoch=1, flags=Flag.START | Flag.END),
        )
        supervisor.on_event(
            {"type": "transcript", "role": "user", "text": "count fish", "final": True}, 1
        )
        await tts_in.wait_for(lambda fs: len(fs) >= 2)  # two sentences out, then it dies
        await die(doomed)
        services.running.remove(doomed)  # nothing left to stop
        await doomed.store.close()
        sent_before = len(tts_in.frames)

        await services.start(LLMService)  # the survivor
        order = Reorderer()
        order.reset(1)
        deadline = asyncio.get_running_loop().time() + 10
        while not order.done:
            assert asyncio.get_running_loop().time() < deadline, "the turn never completed"
            await supervisor.check(order.next_index)
            for f in drain(out):
                if f.kind is Kind.AUDIO:
                    order.push(f)
            await asyncio.sleep(0.1)
        said = [f for f in tts_in.frames if f.kind is Kind.TEXT and f.payload]
        assert " ".join(f.as_text for f in said) == REPLY  # every sentence once, in order
        assert [f.index for f in said] == list(range(len(said)))
        assert sent_before >= 2 and supervisor.redeliveries >= 1
        context = await store.get_context(sid)
        assert [m["role"] for m in context] == ["user", "assistant"]
        assert context[1]["content"] == REPLY
    finally:
        for svc in reversed(list(services.running)):
            await services.stop(svc)
        await transport.stop()
        await chat.stop()


_seen: dict[int, int] = {}


def drain(inbox: Inbox) -> list[Frame]:
    """Frames that arrived since the last call for this inbox."""
    start = _seen.get(id(inbox), 0)
    _seen[id(inbox)] = len(inbox.frames)
    return inbox.frames[start:]


async def die(svc: Any) -> None:
    """As close to SIGKILL as a process can do to a part of itself: no release, no drain."""

    async def keep(_: str) -> None:  # a killed process releases nothing
        return None

    svc.claims.release = keep
    svc._renewer.cancel()
    for work in list(svc._work.values()):
        for _, task in list(work):
            task.cancel()
    await svc.bus.close()
    svc.health and await svc.health.stop()
    await until(lambda: not svc._work, 5, "the dead instance's tasks to end")


async def test_an_instance_that_loses_its_claim_stops_its_unit(
    fast_leases: Settings,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """A starved instance whose claim lapsed must not go on beside the one the supervisor gave
    the unit to: the caller would hear every later sentence twice."""
    services = Services(fast_leases)
    chat = OpenAIChatServer([REPLY], chunk_words=1, chunk_delay_s=0.1)
    await chat.start()
    try:
        data = {**agent_json}
        data["connectors"] = {
            "llm": {
                "primary": "openai",
                "config": {"openai": {"base_url": f"{chat.url}/v1", "model": "m"}},
            },
            "tts": {"primary": "tone"},
            "stt": agent_json["connectors"]["stt"],
        }
        sid = (await store.create_session(parse_agent_config(data))).session_id
        slow: LLMService = await services.start(LLMService)
        tts_in = await listen(bus, subjects.data("tts", sid))
        await bus.publish(
            subjects.data("llm", sid),
            Frame.text("count fish", epoch=1, flags=Flag.START | Flag.END),
        )
        await tts_in.wait_for(lambda fs: len(fs) >= 1)
        # the claim lapsed and another instance took the unit over
        key = slow.claims.key("llm", sid, 1, 0)
        assert key in slow.claims.held
        await store.client.set(key, "llm-other", px=60_000)
        await until(lambda: not slow._work, 3, "the unit to stop")
        sent = len(tts_in.frames)
        await asyncio.sleep(1.0)  # the reply had ~1.5 s left to stream
        assert len(tts_in.frames) == sent
        assert sent < len(REPLY.split(". "))
        assert await store.client.get(key) == b"llm-other"  # its release took nothing
    finally:
        for svc in reversed(list(services.running)):
            await services.stop(svc)
        await chat.stop()


async def test_an_llm_instance_killed_mid_tool_turn_resumes_after_its_last_completed_call(
    fast_leases: Settings,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """Round 1 calls `first`; its result is stored; the instance dies while the model streams
    round 2. The turn is redelivered to a survivor, which reads the stored call and result back
    and goes on from there: `first` is not called again, `second` once, and the reply has both
    results; the context holds each call and result once, in order (issue 15)."""
    from voicemesh.tools import current_call, serve

    calls: dict[str, list[str]] = {"first": [], "second": []}

    def service(name: str) -> Any:
        async def answer(city: str) -> dict[str, str]:
            request = current_call()
            assert request is not None
            calls[name].append(request.idempotency_key)
            return {"tool": name, "city": city}

        return answer

    subs = [
        await serve(bus.nc, "tools.first", service("first")),
        await serve(bus.nc, "tools.second", service("second")),
    ]
    await bus.settle()
    rounds = [
        [{"name": "first", "arguments": '{"city": "Oslo"}'}],
        # streamed slowly, and no sentence of it ends before the call: the instance dies here
        [{"name": "second", "arguments": '{"city": "Rome"}', "say": "and now the other one too"}],
    ]
    services = Services(fast_leases)
    chat = OpenAIChatServer(["Both: {result}"], tool_rounds=rounds, chunk_delay_s=0.15)
    await chat.start()
    transport = TransportService(fast_leases)
    await transport.start()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    try:
        data = {**agent_json}
        data["connectors"] = {
            "llm": {
                "primary": "openai",
                "config": {"openai": {"base_url": f"{chat.url}/v1", "model": "m"}},
            },
            "tts": {"primary": "tone"},
            "stt": agent_json["connectors"]["stt"],
        }
        data["tools"] = [
            {"name": n, "parameters": schema, "handler": {"type": "nats", "subject": f"tools.{n}"}}
            for n in ("first", "second")
        ]
        data["tool_filler"] = None
        sid = (await store.create_session(parse_agent_config(data))).session_id
        doomed: LLMService = await services.start(LLMService)
        tts_in = await listen(bus, subjects.data("tts", sid))

        supervisor = TurnSupervisor(transport, sid)
        supervisor.begin(1)
        supervisor.ended([])
        await bus.publish(
            subjects.data("llm", sid),
            Frame.text("weather twice", epoch=1, flags=Flag.START | Flag.END),
        )
        supervisor.on_event(
            {"type": "transcript", "role": "user", "text": "weather twice", "final": True}, 1
        )

        async def first_result_stored() -> bool:
            return any(m["role"] == "tool_result" for m in await store.get_context(sid))

        deadline = asyncio.get_running_loop().time() + 10
        while not await first_result_stored():
            assert asyncio.get_running_loop().time() < deadline, "the first call never ended"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # into round 2's slow words
        await die(doomed)
        services.running.remove(doomed)
        await doomed.store.close()
        assert calls == {"first": [f"{sid}:1:{calls['first'][0].split(':')[-1]}"], "second": []}

        await services.start(LLMService)  # the survivor
        deadline = asyncio.get_running_loop().time() + 15
        while not any(f.has(Flag.LAST) for f in tts_in.frames):
            assert asyncio.get_running_loop().time() < deadline, "the turn never completed"
            await supervisor.check(0)
            await asyncio.sleep(0.1)
        assert supervisor.redeliveries >= 1
        assert len(calls["first"]) == 1 and len(calls["second"]) == 1
        said = " ".join(f.as_text for f in tts_in.frames if f.kind is Kind.TEXT and f.payload)
        assert '"tool":"second"' in said and said.startswith("and now the other one too")
        context = await store.get_context(sid)
        assert [m["role"] for m in context] == [
            "user",
            "tool_calls",
            "tool_result",
            "tool_calls",
            "tool_result",
            "assistant",
        ]
        assert [m["name"] for m in context if m["role"] == "tool_result"] == ["first", "second"]
    finally:
        for svc in reversed(list(services.running)):
            await services.stop(svc)
        await transport.stop()
        await chat.stop()
        for sub in subs:
            await sub.unsubscribe()
