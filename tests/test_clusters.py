"""Calls on the clusters (a 3-node NATS cluster, a Valkey Cluster of 3 masters + 3 replicas),
and what a node failure mid-call costs the caller.

The named e2e subset that runs on both the single servers and the clusters is every test marked
`clusters` (`pytest -m clusters`): this module's call with a config update, the store's tests
(test_store.py), a turn redelivered after its LLM instance dies (test_redelivery.py), a failing
primary connector falling back (test_fallback_stages.py) and config-update invalidation
(test_service_router.py, test_pipeline.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import valkey
import websockets
from valkey.crc import key_slot

from tests.support import TransportApp, loopback_agent
from tests.test_bad_audio import Caller, clean_or_garbled, silence, speech
from voicemesh.config.models import parse_agent_config
from voicemesh.servers import EmbeddedServer, ServerCluster, _wait_nats_routes
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript

pytestmark = pytest.mark.usefixtures("private_egress")

LONG_REPLY = " ".join(["word"] * 30) + "."  # ~3 s of bot audio at 100 ms a word


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    return clean_or_garbled


@dataclass
class TimedCaller(Caller):
    """A caller that notes when each piece of bot audio arrives (what the caller hears)."""

    heard_at: list[tuple[float, int]] = field(default_factory=list)

    async def receive(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    self.audio += msg
                    self.heard_at.append((time.monotonic(), len(msg)))
                else:
                    self.events.append(orjson.loads(msg))
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    def said(self, after: int) -> str:
        return " ".join(
            str(e.get("text", ""))
            for e in self.events[after:]
            if e.get("type") == "transcript" and e.get("role") == "assistant"
        )


@dataclass
class Call:
    caller: TimedCaller
    sid: str
    app: TransportApp


@pytest.fixture
async def call(
    transport_app: TransportApp,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> AsyncIterator[Call]:
    data = loopback_agent(
        agent_json,
        transport="websocket",
        stt_url=transcriber.base_url,
        ms_per_word=100,
        replies=[LONG_REPLY],
    )
    sid = (await store.create_session(parse_agent_config(data))).session_id
    url = transport_app.ws("/ws/call")
    async with websockets.connect(f"{url}?session_id={sid}", max_size=None) as ws:
        c = TimedCaller(ws)
        task = asyncio.ensure_future(c.receive())
        await c.wait_for(lambda e: e.get("type") == "session")
        try:
            yield Call(c, sid, transport_app)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def speak(c: TimedCaller) -> int:
    """Say one clean utterance; returns the epoch of the turn it started."""
    mark = len(c.events)
    await c.send_audio(silence(100) + speech(400) + silence(300))
    started = await c.wait_for(lambda e: e.get("type") == "turn", after=mark)
    return int(started["epoch"])


async def first_audio(c: TimedCaller, heard: int, limit_s: float = 10) -> None:
    """Wait for the first bot audio after the caller had heard `heard` pieces of it."""
    deadline = time.monotonic() + limit_s
    while len(c.heard_at) <= heard:
        assert time.monotonic() < deadline, "no bot audio"
        await asyncio.sleep(0.01)


async def reply_done(c: TimedCaller, epoch: int, mark: int, limit_s: float = 20) -> None:
    await c.wait_for(
        lambda e: e.get("type") == "bot_done" and e.get("epoch") == epoch,
        after=mark,
        limit_s=limit_s,
    )


@pytest.mark.clusters
async def test_a_call_and_a_config_update_mid_call(call: Call, agent_json: dict) -> None:
    """Two turns of one call, the second after the session's config was replaced through the
    API: on the clusters the update reaches every stage's cache through the NATS routes."""
    c = call.caller
    mark = len(c.events)
    await c.turn(limit_s=20)
    assert "word word" in c.said(mark)
    stored = await call.app.service.store.get_config(call.sid)
    assert stored is not None
    data = orjson.loads(stored.config.to_json())
    data["connectors"]["llm"]["config"]["scripted"]["replies"] = ["Changed mid call."]
    async with httpx.AsyncClient(base_url=call.app.url) as http:
        r = await http.put(f"/api/sessions/{call.sid}/config", json=data)
        assert r.status_code == 200, r.text
    mark = len(c.events)
    await c.turn(limit_s=20)
    assert "Changed mid call" in c.said(mark)


# --- node failures mid-call ------------------------------------------------------------------


@dataclass
class Gap:
    """What a failure cost the caller in one turn, against a normal turn of the same call."""

    normal_first_audio_ms: float  # end of the caller's turn -> first bot audio, no failure
    first_audio_ms: float  # the same for the turn the failure hit
    silence_ms: float  # the longest silence in the bot's reply after the failure
    normal_silence_ms: float  # the longest one in the normal turn's reply

    def __str__(self) -> str:
        return (
            f"first audio {self.first_audio_ms:.0f} ms after the turn (normal "
            f"{self.normal_first_audio_ms:.0f} ms), longest silence in the reply "
            f"{self.silence_ms:.0f} ms (normal {self.normal_silence_ms:.0f} ms)"
        )


async def measured_turn(c: TimedCaller, kill: Any = None, moment: str = "") -> tuple[float, float]:
    """One turn; `kill()` runs at `moment` ("turn": as the turn starts, while it crosses the
    stages; "reply": 300 ms into the bot's audio). Returns (turn start -> first audio, longest
    silence in the reply from the kill on), in ms; fails on any error event."""
    mark, heard = len(c.events), len(c.heard_at)
    epoch = await speak(c)
    started = time.monotonic()
    killed_at = started
    if kill is not None and moment == "turn":
        kill()
    await first_audio(c, heard, limit_s=30)
    first = (c.heard_at[heard][0] - started) * 1000
    if kill is not None and moment == "reply":
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        kill()
    await reply_done(c, epoch, mark, limit_s=30)
    times = [at for at, _ in c.heard_at[heard:]]
    silence = max(
        ((b - a) * 1000 for a, b in itertools.pairwise(times) if b >= killed_at), default=0.0
    )
    assert not [e for e in c.events[mark:] if e.get("type") == "error"], c.events[mark:]
    assert "word word" in c.said(mark)
    return first, silence


async def restart_nats(cluster: ServerCluster, node: EmbeddedServer) -> None:
    await asyncio.to_thread(node.restart)
    await asyncio.to_thread(_wait_nats_routes, cluster.nodes, len(cluster.nodes) - 1)


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["cluster"])
@pytest.mark.parametrize("moment", ["turn", "reply"])
async def test_sigkill_of_the_transports_nats_node_mid_call_costs_a_gap_not_the_turn(
    call: Call,
    nats_cluster: ServerCluster,
    servers: Any,
    backend: str,
    moment: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The NATS node the transport is connected to dies (SIGKILL) as a turn crosses the stages,
    or while the bot speaks: every client on it reconnects to another node, the turn in flight
    is answered (sent again if a hop was lost), and the next turn is answered too. The gap the
    caller hears is printed."""
    caplog.set_level(logging.INFO, logger="voicemesh.bus.bus")
    c = call.caller
    nc = call.app.service.bus.nc
    port = nc.connected_url.port if nc.connected_url else None
    index = next(i for i, n in enumerate(nats_cluster.nodes) if n.port == port)
    normal = await measured_turn(c)
    killed: list[EmbeddedServer] = []
    try:
        hit = await measured_turn(c, lambda: killed.append(nats_cluster.kill(index)), moment)
        gap = Gap(normal[0], hit[0], hit[1], normal[1])
        print(f"\nNATS node SIGKILL at the {moment}: {gap}")
        assert nc.connected_url is not None and nc.connected_url.port != port
        await measured_turn(c)  # the call goes on
        # the reconnect was logged, without the password its URL carries
        assert "nats: reconnected to 127.0.0.1:" in caplog.text
        assert servers.creds.nats["admin"] not in caplog.text
    finally:
        for node in killed:
            await restart_nats(nats_cluster, node)


def master_of(cluster: ServerCluster, key: str, admin: Any) -> int:
    """The index of the node that is master for `key`'s slot now."""
    slot = key_slot(key.encode())
    for node in cluster.nodes:
        if node.proc.poll() is not None:
            continue
        client = valkey.Valkey(host="127.0.0.1", port=node.port, **admin)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(j for j, n in enumerate(cluster.nodes) if n.port == port)
        finally:
            client.close()
    raise AssertionError("no node answers CLUSTER SLOTS")


def cluster_healthy(cluster: ServerCluster, admin: Any) -> bool:
    for node in cluster.nodes:
        client = valkey.Valkey(host="127.0.0.1", port=node.port, **admin)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
            role = client.execute_command("ROLE")
            if role[0] in (b"slave", "slave") and role[3] not in (b"connected", "connected"):
                return False
        except (valkey.ConnectionError, OSError):
            return False
        finally:
            client.close()
    return True


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["cluster"])
@pytest.mark.parametrize("moment", ["turn", "reply"])
async def test_sigkill_of_the_sessions_valkey_master_mid_call_loses_nothing(
    call: Call,
    valkey_cluster: ServerCluster,
    servers: Any,
    store: ConfigStore,
    backend: str,
    moment: str,
) -> None:
    """The Valkey master holding the session's slot dies (SIGKILL) as a turn starts, or while
    the bot speaks: its replica is promoted (cluster-node-timeout 1 s), the turn is answered,
    the call goes on, and the session, every turn in its context and the agents are there
    afterwards. The gap the caller hears is printed."""
    admin = {"username": "admin", "password": servers.creds.valkey["admin"]}
    c = call.caller
    stored = await store.get_config(call.sid)
    assert stored is not None
    await store.create_agent("survivor", stored.config)
    normal = await measured_turn(c)
    index = master_of(valkey_cluster, store.keys.session(call.sid), admin)
    killed: list[EmbeddedServer] = []
    try:
        hit = await measured_turn(c, lambda: killed.append(valkey_cluster.kill(index)), moment)
        gap = Gap(normal[0], hit[0], hit[1], normal[1])
        await measured_turn(c)  # the call goes on past the failover
        promoted = master_of(valkey_cluster, store.keys.session(call.sid), admin)
        print(f"\nValkey master SIGKILL at the {moment}: {gap}; slot {index} -> {promoted}")
        assert promoted != index
        # nothing lost: the session, its three turns in the context and the agents
        assert await store.get_config(call.sid) is not None
        context = await store.get_context(call.sid)
        assert sum(1 for m in context if m.get("role") == "user") == 3, context
        assert sum(1 for m in context if m.get("role") == "assistant") == 3, context
        assert await store.get_agent("survivor") is not None
    finally:
        for node in killed:
            await asyncio.to_thread(node.restart)  # back as the new master's replica
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(cluster_healthy, valkey_cluster, admin):
            assert time.monotonic() < deadline, "the cluster did not heal"
            await asyncio.sleep(0.2)
        await store.delete_agent("survivor")
