"""The stage services in-process on the real NATS and Valkey: LLM turns cut into numbered
sentences, parallel TTS put back in order, turn epochs, STT assignment through leases, malformed
frames and health pings. (Routing and the config cache: test_service_router.py.)

Every test has its own subject and key prefix (the `settings` fixture) and uses the deterministic
connectors (`scripted` LLM, `tone` TTS); nothing loads a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.support import Services, has_last, listen, scripted, until
from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects, encode
from voicemesh.config.models import parse_agent_config
from voicemesh.pipeline import LLMService, StageService, STTService, TTSService
from voicemesh.router import publish_config_update
from voicemesh.state import ConfigStore
from voicemesh.transport.call.egress import Reorderer

# --- LLM stage -------------------------------------------------------------------------------


async def test_llm_turn_sends_numbered_sentences_then_a_last_marker(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    config = scripted(agent_json, ["One two. Three four! Five six?", "You said {user}."])
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    first = await services.start(LLMService)

    origin = time.time_ns() - 5_000_000
    await bus.publish(
        subjects.data("llm", sid), Frame.text("hello there", epoch=1, origin_ns=origin)
    )
    frames = await tts.wait_for(has_last)
    sentence = Flag.START | Flag.END
    assert [(f.kind, f.index, f.as_text, f.flags) for f in frames] == [
        (Kind.TEXT, 0, "One two.", sentence),
        (Kind.TEXT, 1, "Three four!", sentence),
        (Kind.TEXT, 2, "Five six?", sentence),
        (Kind.TEXT, 3, "", Flag.END | Flag.LAST),
    ]
    assert {(f.epoch, f.origin_ns) for f in frames} == {(1, origin)}

    events = await transport.wait_for(lambda fs: len(fs) >= 3)
    assert all(f.kind is Kind.EVENT and f.epoch == 1 for f in events)
    assert [
        (e["type"], e["role"], e["text"], e["index"], e["epoch"], e["connector"])
        for e in (f.as_event for f in events)
    ] == [
        ("transcript", "assistant", "One two.", 0, 1, "scripted"),
        ("transcript", "assistant", "Three four!", 1, 1, "scripted"),
        ("transcript", "assistant", "Five six?", 2, 1, "scripted"),
    ]
    context = await store.get_context(sid)
    assert [(m["role"], m["content"], m["epoch"]) for m in context] == [
        ("user", "hello there", 1),
        ("assistant", "One two. Three four! Five six?", 1),
    ]

    # Stateless: another instance takes the next turn and finds the context in Valkey.
    await services.stop(first)
    await services.start(LLMService)
    await bus.publish(subjects.data("llm", sid), Frame.text("bye now", epoch=2))
    frames = await tts.wait_for(lambda fs: has_last(fs, 2))
    assert [(f.index, f.as_text) for f in frames if f.epoch == 2] == [
        (0, "You said bye now."),
        (1, ""),
    ]
    context = await store.get_context(sid)
    assert [m["role"] for m in context] == ["user", "assistant", "user", "assistant"]
    assert context[-1]["content"] == "You said bye now."


@pytest.mark.clusters  # the e2e subset run on the clusters too (test_clusters.py)
async def test_config_update_during_an_llm_turn_does_not_lose_the_turn(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """A live config change (PATCH of any key) lands while a turn is between loading the config
    and sending its first sentence. The turn must still be answered."""
    sid = (await store.create_session(scripted(agent_json, ["Before."]))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    llm = await services.start(LLMService)

    real_append = llm.store.append_context
    entered, release = asyncio.Event(), asyncio.Event()

    async def append_then_pause(session_id: str, *messages: dict[str, Any]) -> int:
        n = await real_append(session_id, *messages)
        if messages[0]["role"] == "user":
            entered.set()
            await release.wait()
        return n

    llm.store.append_context = append_then_pause  # type: ignore[method-assign]
    await bus.publish(subjects.data("llm", sid), Frame.text("hello", epoch=1))
    await asyncio.wait_for(entered.wait(), 5)
    version = await store.update_config(sid, scripted(agent_json, ["After."]))
    await publish_config_update(bus, subjects, sid, version, ["connectors"])
    await until(lambda: sid not in llm.router._cache, what="the cache to drop the session")
    release.set()

    frames = await tts.wait_for(has_last, limit_s=3)
    texts = [f.as_text for f in frames]
    assert texts in (["Before.", ""], ["After.", ""]), texts


async def test_llm_publishes_the_first_unit_before_the_first_sentence_ends(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reply's first unit (five words here: no clause boundary comes first) goes to TTS while
    the model is still writing its first sentence; on main it waited for the sentence's end.
    Later units are sentences, indexes stay in order, and the context holds the whole reply."""
    reply = "The quick brown fox jumps over the lazy dog near the river today. It naps now."
    sid = (await store.create_session(scripted(agent_json, [reply]))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    seen_before_end: list[list[str]] = []

    async def slow_words(text: str, per_chunk: int) -> AsyncIterator[str]:
        for i, word in enumerate(text.split(" ")):
            if word.endswith(".") and not seen_before_end:
                # the first sentence's end is about to stream: what has TTS had so far?
                with contextlib.suppress(AssertionError):
                    await until(lambda: tts.frames, limit_s=1.0)
                seen_before_end.append([f.as_text for f in tts.frames])
            yield (" " if i else "") + word
            await asyncio.sleep(0.01)

    monkeypatch.setattr("voicemesh.connectors.llm.scripted._words", slow_words)
    await services.start(LLMService)
    await bus.publish(subjects.data("llm", sid), Frame.text("tell me", epoch=1))
    frames = await tts.wait_for(has_last)
    assert seen_before_end == [["The quick brown fox jumps"]]
    assert [(f.index, f.as_text) for f in frames] == [
        (0, "The quick brown fox jumps"),
        (1, "over the lazy dog near the river today."),
        (2, "It naps now."),
        (3, ""),
    ]
    context = await store.get_context(sid)
    assert context[-1]["content"] == reply


async def test_first_unit_words_setting_zero_keeps_the_first_sentence_whole(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """VOICEMESH_FIRST_UNIT_WORDS=0: the first unit is a whole sentence, commas and all."""
    reply = "Well, the quick brown fox jumps over the lazy dog. It naps."
    sid = (await store.create_session(scripted(agent_json, [reply]))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    await services.start(LLMService, first_unit_words=0)
    await bus.publish(subjects.data("llm", sid), Frame.text("tell me", epoch=1))
    frames = await tts.wait_for(has_last)
    assert [f.as_text for f in frames] == [
        "Well, the quick brown fox jumps over the lazy dog.",
        "It naps.",
        "",
    ]


# --- LLM + TTS -------------------------------------------------------------------------------


async def test_llm_and_two_tts_instances_play_in_sentence_order(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    reply = (
        "Alpha beta gamma delta epsilon zeta eta theta iota kappa. Two words. Three. "
        "Four five six. Seven!"
    )
    words = [5, 5, 2, 1, 3, 1]  # the reply's first unit: its first five words
    ms_per_word, rate = 60, 16000
    config = scripted(agent_json, [reply], tone={"ms_per_word": ms_per_word, "sample_rate": rate})
    sid = (await store.create_session(config)).session_id
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(TTSService)
    await services.start(TTSService)
    await services.start(LLMService)

    reorder = Reorderer()
    played: list[Frame] = []
    consumed = 0

    def feed(frames: list[Frame]) -> bool:
        nonlocal consumed
        audio = [f for f in frames if f.kind is Kind.AUDIO]
        for f in audio[consumed:]:
            played.extend(reorder.push(f))
        consumed = len(audio)
        return reorder.done

    await bus.publish(subjects.data("llm", sid), Frame.text("go", epoch=1))
    await transport.wait_for(feed, limit_s=10)
    await asyncio.sleep(0.1)
    arrived = transport.of(Kind.AUDIO)

    assert played[-1].has(Flag.LAST) and played[-1].index == len(words)
    assert [f.index for f in played] == sorted(f.index for f in played)
    assert sorted((f.index, f.seq) for f in arrived) == [(f.index, f.seq) for f in played]
    for index, n_words in enumerate(words):
        chunks = [f for f in played if f.index == index]
        assert [f.seq for f in chunks] == list(range(len(chunks)))
        assert chunks[0].has(Flag.START) and chunks[-1].has(Flag.END)
        assert {(f.sample_rate, f.epoch) for f in chunks} == {(rate, 1)}
        pcm = b"".join(f.payload for f in chunks)
        assert len(pcm) == 2 * rate * ms_per_word * n_words // 1000, (index, len(pcm))
    events = [f.as_event for f in transport.of(Kind.EVENT)]
    said = [e for e in events if e["type"] == "transcript"]
    assert [e["index"] for e in said] == list(range(len(words)))
    # the turn's hop timings travel beside the flow: the LLM's on its first sentence, TTS's once
    assert "ttft_ms" in said[0] and all("ttft_ms" not in e for e in said[1:])
    assert [e["stage"] for e in events if e["type"] == "hop"] == ["tts"]


# --- turn epochs -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["llm", "tts"])
async def test_frames_of_an_older_epoch_are_dropped(
    role: str,
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    sid = (await store.create_session(scripted(agent_json, ["Fresh reply."]))).session_id
    out = await listen(bus, subjects.data("tts" if role == "llm" else "transport", sid))
    svc = await services.start(LLMService if role == "llm" else TTSService)

    await bus.publish(subjects.ctl(sid), Frame.event({"type": "turn", "epoch": 2}, epoch=2))
    await until(lambda: svc.epochs.get(sid) == 2, what="the epoch announcement")
    subject = subjects.data(role, sid)
    await bus.publish(subject, Frame.text("stale words", epoch=1, flags=Flag.START | Flag.END))
    await bus.publish(subject, Frame.text("new words", epoch=2, flags=Flag.START | Flag.END))
    if role == "llm":
        await out.wait_for(lambda fs: has_last(fs, 2))
    else:
        await out.wait_for(lambda fs: any(f.has(Flag.END) for f in fs))
    await asyncio.sleep(0.2)
    assert out.frames and {f.epoch for f in out.frames} == {2}
    if role == "llm":
        context = await store.get_context(sid)
        assert [(m["role"], m["epoch"]) for m in context] == [("user", 2), ("assistant", 2)]
        assert context[0]["content"] == "new words"


async def test_a_relaying_stage_follows_each_config_change_of_its_session(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """The relay decision is kept per session (not worked out per frame), so it must follow the
    session's config: a flow without the stage drops its frames, and a real primary makes the
    stage do its own work again."""
    relay = {"primary": "passthrough"}

    def config(flow: list[dict[str, str]], llm: Any = relay) -> Any:
        data = copy.deepcopy(agent_json)
        data["pipeline"]["flow"] = flow
        data["connectors"]["llm"] = llm
        return parse_agent_config(data)

    through_tts = [
        {"from": "transport", "to": "stt", "stream": "audio"},
        {"from": "stt", "to": "llm", "stream": "text"},
        {"from": "llm", "to": "tts", "stream": "text"},
        {"from": "tts", "to": "transport", "stream": "audio"},
    ]
    without_llm = [through_tts[0], {"from": "stt", "to": "tts", "stream": "text"}, through_tts[3]]
    sid = (await store.create_session(config(through_tts))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    llm = await services.start(LLMService)

    async def change(new: Any) -> None:
        version = await store.update_config(sid, new)
        await publish_config_update(bus, subjects, sid, version, ["pipeline", "connectors"])
        await until(lambda: sid not in llm.router._cache, what="the cache to drop the session")

    await bus.publish(subjects.data("llm", sid), Frame.text("one", epoch=1))
    assert [f.as_text for f in await tts.wait_for(lambda fs: len(fs) == 1)] == ["one"]
    await change(config(without_llm))
    await bus.publish(subjects.data("llm", sid), Frame.text("two", epoch=1))
    # the stage loads the new config for "two" (and drops it): only then change again
    await until(lambda: sid in llm.router._cache, what="the frame to be taken")
    await change(scripted(agent_json, ["Its own reply."]))
    await bus.publish(subjects.data("llm", sid), Frame.text("three", epoch=1))
    frames = await tts.wait_for(lambda fs: has_last(fs), limit_s=5)
    # "two" was dropped: the flow had no llm; "three" got the scripted connector's reply
    assert [f.as_text for f in frames] == ["one", "Its own reply.", ""]


@pytest.mark.parametrize("kind", ["turn", "interrupt"])
async def test_in_flight_turn_of_an_older_epoch_is_cancelled(
    kind: str,
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    # A reply far longer than a config may script (replies are capped): the echo LLM repeats a
    # long user turn, on a stage whose reply limit is raised out of the way.
    n = 20_000
    long_turn = " ".join(["Go."] * n)
    config = copy.deepcopy(agent_json)
    config["connectors"]["llm"] = {"primary": "echo"}
    config["connectors"]["tts"] = {"primary": "tone"}
    sid = (await store.create_session(parse_agent_config(config))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    llm = await services.start(LLMService, max_reply_chars=1_000_000)

    await bus.publish(subjects.data("llm", sid), Frame.text(long_turn, epoch=1))
    await tts.wait_for(lambda fs: len(fs) >= 1)
    await bus.publish(subjects.ctl(sid), Frame.event({"type": kind, "epoch": 2}, epoch=2))
    await until(lambda: sid not in llm._work, what="the old turn to stop")
    await asyncio.sleep(0.2)
    count = len(tts.frames)
    await asyncio.sleep(0.2)
    assert len(tts.frames) == count, "the cancelled turn kept producing"
    assert 1 <= count < n, count
    assert not has_last(tts.frames), "the old turn ran to its end"
    context = await store.get_context(sid)
    assert [m["role"] for m in context] == ["user"], "a cancelled turn wrote its reply"

    # The service goes on: a short reply (swapped in live) for the new epoch.
    version = await store.update_config(sid, scripted(agent_json, ["Short now."]))
    await publish_config_update(bus, subjects, sid, version, ["connectors"])
    await until(lambda: sid not in llm.router._cache, what="the cache to drop the session")
    await bus.publish(subjects.data("llm", sid), Frame.text("and now?", epoch=2))
    frames = await tts.wait_for(lambda fs: has_last(fs, 2))
    assert [(f.index, f.as_text) for f in frames if f.epoch == 2] == [(0, "Short now."), (1, "")]


# --- STT assignment and leases ---------------------------------------------------------------


async def test_stt_assignment_takes_a_lease_and_end_releases_it(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    ttl_ms = 600
    sid = (await store.create_session(scripted(agent_json, ["Hi."]))).session_id
    a = await services.start(STTService, instance_id="stt-a", lease_ttl_ms=ttl_ms)
    b = await services.start(STTService, instance_id="stt-b", lease_ttl_ms=ttl_ms)
    by_name = {"stt-a": a, "stt-b": b}
    key = store.keys.lease("stt", sid)
    assert key == f"{subjects.prefix}:lease:stt:{{{sid}}}"

    async def assign(body: dict[str, Any]) -> dict[str, Any]:
        reply = await bus.nc.request(subjects.assign("stt"), orjson.dumps(body), timeout=2)
        return orjson.loads(reply.data)

    owner = (await assign({"session_id": sid}))["owner"]
    assert owner in by_name
    assert (await store.client.get(key)).decode() == owner
    assert 0 < await store.client.pttl(key) <= ttl_ms
    # Whichever instance answers (queue group), the owner stays the same.
    for _ in range(8):
        assert await assign({"session_id": sid}) == {"owner": owner}
    holder, other = by_name[owner], by_name[({"stt-a", "stt-b"} - {owner}).pop()]
    assert sid in holder.streams and sid not in other.streams

    # The holder subscribed the session's audio: frames reach its buffer.
    pcm = bytes(640)
    await bus.publish(
        subjects.data("stt", sid), Frame.audio(pcm, sample_rate=16000, epoch=1, flags=Flag.START)
    )
    await until(lambda: len(holder.streams[sid].audio) == len(pcm), what="audio at the owner")

    # The heartbeat keeps the lease past several TTLs.
    await asyncio.sleep(3 * ttl_ms / 1000)
    assert (await store.client.get(key)).decode() == owner

    # Bad requests get an error, not a lease.
    bad = await assign({"session_id": "no spaces allowed"})
    assert "error" in bad and "owner" not in bad
    assert "error" in await assign({"nothing": 1})

    # The session ends: the lease goes and the stream is dropped.
    await bus.publish(subjects.ctl(sid), Frame.event({"type": "end"}))
    await until(lambda: sid not in holder.streams, what="the stream to be dropped")
    assert await store.client.get(key) is None


async def test_stt_lease_lapses_when_its_holder_dies_and_another_takes_over(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    ttl_ms = 500
    sid = (await store.create_session(scripted(agent_json, ["Hi."]))).session_id
    a = await services.start(STTService, instance_id="stt-a", lease_ttl_ms=ttl_ms)
    b = await services.start(STTService, instance_id="stt-b", lease_ttl_ms=ttl_ms)
    key = store.keys.lease("stt", sid)
    request = orjson.dumps({"session_id": sid})
    reply = await bus.nc.request(subjects.assign("stt"), request, timeout=2)
    owner = orjson.loads(reply.data)["owner"]
    holder, other = (a, b) if owner == a.instance else (b, a)

    # The holder dies without a word: no heartbeat, no connection, no release.
    services.running.remove(holder)
    await holder.bus.close()
    try:
        t0 = time.monotonic()
        while await store.client.get(key) is not None:
            assert time.monotonic() - t0 < 3 * ttl_ms / 1000, "the lease did not lapse"
            await asyncio.sleep(0.02)
        assert time.monotonic() - t0 > ttl_ms / 1000 / 2  # it was not released early

        reply = await bus.nc.request(subjects.assign("stt"), request, timeout=2)
        assert orjson.loads(reply.data) == {"owner": other.instance}
        assert (await store.client.get(key)).decode() == other.instance
        pcm = bytes(320)
        await bus.publish(
            subjects.data("stt", sid),
            Frame.audio(pcm, sample_rate=16000, epoch=1, flags=Flag.START),
        )
        await until(lambda: len(other.streams[sid].audio) == len(pcm), what="audio at the heir")
    finally:
        await holder.pool.aclose()
        await holder.store.close()


# --- robustness and health -------------------------------------------------------------------


async def test_malformed_frames_are_dropped_counted_and_the_service_goes_on(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    sid = (await store.create_session(scripted(agent_json, ["Still here."]))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    llm = await services.start(LLMService)
    before = llm.bus.dropped
    subject = subjects.data("llm", sid)
    good = encode(Frame.text("hi", epoch=1))
    for junk in (
        b"garbage",
        good[:20],  # shorter than the header
        bytes([9]) + good[1:],  # unknown protocol version
        good[:1] + bytes([77]) + good[2:],  # unknown kind
        encode(Frame.audio(b"\x00\x01\x02", sample_rate=16000)),  # half a sample
    ):
        await bus.nc.publish(subject, junk)
    # An event that is not a JSON object on the control subject is dropped the same way.
    await bus.nc.publish(subjects.ctl(sid), encode(Frame(Kind.EVENT, b"[1, 2")))
    await bus.nc.flush()
    await until(lambda: llm.bus.dropped == before + 6, what="6 frames counted as dropped")

    await bus.nc.publish(subject, good)
    frames = await tts.wait_for(has_last)
    assert [(f.index, f.as_text) for f in frames] == [(0, "Still here."), (1, "")]
    assert llm.bus.dropped == before + 6


@pytest.mark.parametrize("cls", [LLMService, TTSService, STTService])
async def test_health_ping_names_the_role(
    cls: type[StageService], services: Services, bus: Bus, subjects: Subjects
) -> None:
    svc = await services.start(cls)
    reply = await bus.nc.request(subjects.health(cls.role), b"{}", timeout=2)
    body = orjson.loads(reply.data)
    assert body["role"] == cls.role and body["instance"] == svc.instance
    assert body["sessions"] == 0
