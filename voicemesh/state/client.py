"""The Valkey client of every role: a plain client on one server, a cluster client on a Valkey
Cluster, chosen by the URL (`valkey+cluster://` or `valkeys+cluster://`, or
VOICEMESH_VALKEY_CLUSTER=1 with a plain URL) so the store's code paths are the same either way.

A cluster URL may list several seed nodes, `valkey+cluster://user:pass@h1:p1,h2:p2,h3:p3`: the
client asks the first one that answers for the slot map, so a role still starts when one seed is
down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import valkey.asyncio as valkey
from valkey.asyncio.cluster import ClusterNode, ValkeyCluster
from valkey.exceptions import ClusterDownError, SlotNotCoveredError
from valkey.exceptions import ConnectionError as ValkeyConnectionError
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

from voicemesh.config.connections import valkey_options
from voicemesh.config.settings import ConnectionSettings

#: either client: the store's commands are the same on both
Client = valkey.Valkey | ValkeyCluster

CLUSTER_SUFFIX = "+cluster"
#: what a dead master looks like from a client until its replica is promoted
FAILOVER_ERRORS = (ValkeyConnectionError, ValkeyTimeoutError, ClusterDownError, SlotNotCoveredError)


@dataclass(frozen=True, slots=True)
class ClusterURL:
    scheme: str  # without +cluster: valkey, valkeys, redis, rediss
    username: str | None
    password: str | None
    seeds: tuple[tuple[str, int], ...]


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower().endswith(CLUSTER_SUFFIX)


def parse_cluster_url(url: str) -> ClusterURL:
    """`scheme+cluster://[user[:pass]@]host:port[,host:port...][/0]`; a plain valkey:// URL (with
    VOICEMESH_VALKEY_CLUSTER) names one seed. Several full URLs joined by ',' work too."""
    if "://" not in url:
        raise ValueError("VALKEY_URL: not a URL (scheme://host:port)")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower().removesuffix(CLUSTER_SUFFIX)
    if scheme not in ("valkey", "valkeys", "redis", "rediss"):
        raise ValueError(f"VALKEY_URL: unknown scheme {scheme!r}")
    username = password = None
    seeds: list[tuple[str, int]] = []
    for part in rest.split(","):
        if "://" in part:  # valkey://a:1,valkey://b:2
            part = part.split("://", 1)[1]
        if "@" in part:
            auth, part = part.rsplit("@", 1)
            user, _, pw = auth.partition(":")
            username, password = unquote(user) or None, unquote(pw) if pw else None
        hostport = part.split("/", 1)[0]
        db = part.split("/", 1)[1] if "/" in part else ""
        if db not in ("", "0"):
            raise ValueError("VALKEY_URL: a Valkey Cluster has database 0 only")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"VALKEY_URL: seed {hostport!r} is not host:port")
        seeds.append((host.strip("[]"), int(port)))
    return ClusterURL(scheme, username, password, tuple(seeds))


def connect(url: str, settings: ConnectionSettings, *, cluster: bool = False) -> Client:
    """A client on `url` with the credentials and TLS of `settings` (credentials in the URL win).
    Lazy: nothing is sent until the first command."""
    if not (cluster or is_cluster_url(url)):
        return valkey.Valkey.from_url(url, **valkey_options(settings, url))
    parsed = parse_cluster_url(url)
    opts: dict[str, Any] = valkey_options(settings, f"{parsed.scheme}://")
    if parsed.username:
        opts["username"] = parsed.username
    if parsed.password is not None:
        opts["password"] = parsed.password
    if parsed.scheme in ("valkeys", "rediss"):
        opts["ssl"] = True
    return FailoverCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in parsed.seeds],
        failover_wait_s=settings.valkey_failover_wait_ms / 1000,
        socket_connect_timeout=1.0,
        **opts,
    )


class FailoverCluster(ValkeyCluster):
    """A cluster client that rides out a master's failover. valkey-py re-reads the slot map
    after a refused connection but gives up within ~0.2 s, while the replica is promoted only
    after cluster-node-timeout and an election (~1.3 s with a 1 s timeout): a command that
    meets a dead master is retried, with backoff, for up to `failover_wait_s`. A turn then
    waits out the failover instead of skipping its context write or its claim.

    Only commands sent as one (scripts included) retry this way; a cluster pipeline fails as
    before (the store's pipelines are reads)."""

    def __init__(self, *args: Any, failover_wait_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failover_wait_s = failover_wait_s

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.failover_wait_s
        delay = 0.05
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except FAILOVER_ERRORS:
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)


def is_cluster(client: Any) -> bool:
    return isinstance(client, ValkeyCluster)


def redact_cluster_url(url: str) -> str:
    """A cluster URL without its password (urlsplit cannot parse a list of seeds)."""
    try:
        parsed = parse_cluster_url(url)
    except ValueError:
        return "<unparsable url>"
    auth = f"{parsed.username or ''}:***@" if parsed.password is not None else ""
    hosts = ",".join(f"{h}:{p}" for h, p in parsed.seeds)
    return f"{parsed.scheme}{CLUSTER_SUFFIX}://{auth}{hosts}"
