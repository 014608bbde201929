"""The ServiceRouter (voicemesh/router/service_router.py) on the real NATS and Valkey: the next
hop from each session's own flow, and the per-session config cache with its invalidation.

Every test has its own subject and key prefix (the `settings` fixture)."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest

from tests.support import listen, scripted, until
from voicemesh.bus import Bus, Frame, Subjects
from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.router import NoRoute, ServiceRouter, publish_config_update
from voicemesh.state import ConfigStore, NotFound


def without_llm(agent_json: dict) -> AgentConfig:
    """A flow that skips the LLM: stt's text goes straight to tts."""
    data = copy.deepcopy(agent_json)
    data["pipeline"]["flow"] = [
        {"from": "transport", "to": "stt", "stream": "audio"},
        {"from": "stt", "to": "tts", "stream": "text"},
        {"from": "tts", "to": "transport", "stream": "audio"},
    ]
    del data["connectors"]["llm"]
    data["connectors"]["tts"] = {"primary": "tone"}
    return parse_agent_config(data)


async def test_route_to_next_follows_each_sessions_own_flow(
    bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    full = (await store.create_session(scripted(agent_json, ["Hi."]))).session_id
    short = (await store.create_session(without_llm(agent_json))).session_id
    llm_in = await listen(bus, subjects.data_all("llm"))
    tts_in = await listen(bus, subjects.data_all("tts"))
    router = ServiceRouter(bus=bus, store=store, stage="stt", subjects=subjects)
    await router.start()

    sent_full = await router.route_to_next(Frame.text("to the llm", epoch=3), full)
    sent_short = await router.route_to_next(Frame.text("to the tts", epoch=4), short)
    assert sent_full == subjects.data("llm", full)
    assert sent_short == subjects.data("tts", short)

    await llm_in.wait_for(lambda fs: len(fs) >= 1)
    await tts_in.wait_for(lambda fs: len(fs) >= 1)
    await asyncio.sleep(0.1)  # nothing else arrives
    assert [(s, f.as_text, f.epoch) for s, f in llm_in.items] == [
        (subjects.data("llm", full), "to the llm", 3)
    ]
    assert [(s, f.as_text, f.epoch) for s, f in tts_in.items] == [
        (subjects.data("tts", short), "to the tts", 4)
    ]


async def test_no_route_when_the_flow_has_no_edge(
    bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    short = (await store.create_session(without_llm(agent_json))).session_id
    full = (await store.create_session(scripted(agent_json, ["Hi."]))).session_id
    anywhere = await listen(bus, f"{subjects.prefix}.*.{short}")
    llm = ServiceRouter(bus=bus, store=store, stage="llm", subjects=subjects)
    await llm.start()

    with pytest.raises(NoRoute):
        await llm.route_to_next(Frame.text("nowhere to go"), short)
    with pytest.raises(NoRoute):
        llm.next_subject(short)
    # The same stage does have an edge in the other session's flow.
    await llm.load(full)
    assert llm.next_subject(full) == subjects.data("tts", full)
    # stt has no edge for an audio stream out of it in any valid flow.
    stt = ServiceRouter(bus=bus, store=store, stage="stt", subjects=subjects)
    await stt.load(full)
    with pytest.raises(NoRoute):
        stt.next_subject(full, "audio")
    with pytest.raises(NotFound):
        await llm.route_to_next(Frame.text("x"), "NoSuchSession123")
    await asyncio.sleep(0.1)
    assert anywhere.items == [], "a frame without a route was published anyway"


@pytest.mark.clusters  # the e2e subset run on the clusters too (test_clusters.py)
async def test_config_cache_hit_and_invalidation_by_update(
    bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    sid = (await store.create_session(scripted(agent_json, ["First."]))).session_id
    router = ServiceRouter(bus=bus, store=store, stage="llm", subjects=subjects)
    await router.start()

    first = await router.load(sid)
    assert (first.version, router.misses, router.hits) == (1, 1, 0)
    assert router.get_connector_config(sid).primary == "scripted"

    # A write that is not announced is not seen: the hot path reads the cache, not Valkey.
    version = await store.update_config(sid, scripted(agent_json, ["Second."]))
    assert version == 2
    again = await router.load(sid)
    assert again.version == 1 and (router.misses, router.hits) == (1, 1)

    # The announcement of a stale or equal version keeps the cache.
    await publish_config_update(bus, subjects, sid, 1, ["*"])
    await asyncio.sleep(0.15)
    assert (await router.load(sid)).version == 1 and router.misses == 1

    # A PUT-style update: store, then announce. The next load sees it, quickly.
    t0 = time.monotonic()
    await publish_config_update(bus, subjects, sid, version, ["*"])
    await until(lambda: sid not in router._cache, 1.0, "the cache entry to be dropped")
    assert time.monotonic() - t0 < 0.1 + 0.2  # design: a change applies within 100 ms
    fresh = await router.load(sid)
    assert fresh.version == 2 and router.misses == 2
    assert fresh.config.options("llm", "scripted").replies == ["Second."]  # type: ignore[attr-defined]

    # Version 0 (the session was deleted) always drops it.
    await publish_config_update(bus, subjects, sid, 0, ["*"])
    await until(lambda: sid not in router._cache, 1.0, "the cache entry to be dropped")


async def test_update_announced_while_a_first_load_is_in_flight_is_not_lost(
    bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """A stage reads a session's config (version 1) just as the transport stores and announces
    version 2. The announcement finds nothing cached to drop, then the load caches version 1, and
    the stale config would be used for the rest of the session."""
    sid = (await store.create_session(scripted(agent_json, ["First."]))).session_id
    router = ServiceRouter(bus=bus, store=store, stage="llm", subjects=subjects)
    await router.start()
    seen_update = asyncio.Event()

    async def on_update(_: Any) -> None:
        seen_update.set()

    await bus.nc.subscribe(subjects.config_update, cb=on_update)
    await bus.settle()

    real_get = store.get_config
    read_done, release = asyncio.Event(), asyncio.Event()

    async def get_then_pause(session_id: str) -> Any:
        stored = await real_get(session_id)
        read_done.set()
        await release.wait()
        return stored

    store.get_config = get_then_pause  # type: ignore[method-assign]
    try:
        loading = asyncio.ensure_future(router.load(sid))
        await asyncio.wait_for(read_done.wait(), 5)
        version = await store.update_config(sid, scripted(agent_json, ["Second."]))
        await publish_config_update(bus, subjects, sid, version, ["*"])
        await asyncio.wait_for(seen_update.wait(), 5)
        await asyncio.sleep(0.1)  # the router's own subscription has handled it too
    finally:
        store.get_config = real_get  # type: ignore[method-assign]
        release.set()
    assert (await loading).version == 1  # began before the update: fine to answer with v1
    latest = await router.load(sid)
    assert latest.version == 2, "the announced update was lost: version 1 stays cached"
