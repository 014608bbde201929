"""How a role finds a cluster: seed lists in NATS_URL and VALKEY_URL, the cluster client chosen by
the URL or VOICEMESH_VALKEY_CLUSTER, passwords kept out of every message, and the embedded Valkey
Cluster keeping its data across runs (`voicemesh up --cluster`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import valkey as valkey_sync

from voicemesh.config.connections import redact_url
from voicemesh.config.settings import ConnectionSettings, Settings
from voicemesh.credentials import ServerCredentials
from voicemesh.servers import start_valkey_cluster
from voicemesh.state import ConfigStore
from voicemesh.state.client import FailoverCluster, parse_cluster_url, redact_cluster_url


def test_cluster_urls_list_every_seed() -> None:
    u = parse_cluster_url("valkey+cluster://stt:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/0")
    assert (u.scheme, u.username, u.password) == ("valkey", "stt", "p@ss")
    assert u.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    # several full URLs work too, and a TLS scheme stays TLS
    u = parse_cluster_url("valkeys+cluster://a:1,valkeys://b:2")
    assert u.scheme == "valkeys" and u.seeds == (("a", 1), ("b", 2))


@pytest.mark.parametrize(
    "url",
    ["valkey+cluster://a:1/3", "valkey+cluster://a", "valkey+cluster://a:x", "ftp+cluster://a:1"],
)
def test_bad_cluster_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ValueError, match="VALKEY_URL"):
        parse_cluster_url(url)


def test_no_password_of_a_seed_list_reaches_a_message() -> None:
    for url in (
        "valkey+cluster://stt:s3cret@a:1,b:2,c:3",
        "nats://u:s3cret@a:4222,nats://u:s3cret@b:4222",
        "nats://s3cret@a:4222,nats://s3cret@b:4222",  # a token as the user part
    ):
        assert "s3cret" not in redact_url(url)
    assert "s3cret" not in redact_cluster_url("valkey+cluster://stt:s3cret@a:1,b:2")


def test_generated_credentials_go_into_every_seed() -> None:
    creds = ServerCredentials.generate()
    url = creds.url("nats://127.0.0.1:1,nats://127.0.0.1:2", "stt")
    assert url.count(f"stt:{creds.nats['stt']}@") == 2


@pytest.mark.cluster
async def test_the_cluster_setting_makes_a_plain_url_a_cluster_seed(
    valkey_cluster: Any, servers: Any, prefix: str
) -> None:
    """VOICEMESH_VALKEY_CLUSTER=1 with one valkey:// seed: the store follows the slot map (a
    plain client would get MOVED for most keys)."""
    seed = f"valkey://127.0.0.1:{valkey_cluster.nodes[0].port}"
    settings = ConnectionSettings(
        valkey_cluster=True,
        valkey_username="transport",
        valkey_password=servers.creds.valkey["transport"],
    )
    store = ConfigStore.from_url(seed, settings=settings, key_prefix=prefix)
    try:
        assert isinstance(store.client, FailoverCluster)
        await store.check()
        for n in range(20):  # keys over every master
            await store.client.set(f"{prefix}:calls:t{n}", n)
    finally:
        await store.close()


def test_settings_read_the_cluster_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_VALKEY_CLUSTER", "1")
    monkeypatch.setenv("VOICEMESH_VALKEY_FAILOVER_WAIT_MS", "2500")
    s = Settings()
    assert s.valkey_cluster is True and s.valkey_failover_wait_ms == 2500
    monkeypatch.setenv("VOICEMESH_VALKEY_FAILOVER_WAIT_MS", "-1")
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.cluster
def test_an_embedded_valkey_cluster_comes_back_with_its_data(tmp_path: Path) -> None:
    """`voicemesh up --cluster` run twice on one data dir keeps what the first run stored."""
    first = start_valkey_cluster(tmp_path, masters=3, replicas=0)
    try:
        client = valkey_sync.ValkeyCluster(host="127.0.0.1", port=first.nodes[0].port)
        for n in range(10):
            client.set(f"k{n}", n)
        client.close()
    finally:
        first.stop()
    again = start_valkey_cluster(tmp_path, masters=3, replicas=0)
    try:
        assert [n.port for n in again.nodes] == [n.port for n in first.nodes]
        client = valkey_sync.ValkeyCluster(host="127.0.0.1", port=again.nodes[1].port)
        assert [int(client.get(f"k{n}")) for n in range(10)] == list(range(10))
        client.close()
    finally:
        again.stop()
