"""The Valkey client of every role: a plain client on one server, a cluster client on a Valkey
Cluster, chosen by the URL (`valkey+cluster://` or `valkeys+cluster://`, or
VOICEMESH_VALKEY_CLUSTER=1 with a plain URL) so the store's code paths are the same either way.

A cluster URL may list several seed nodes, `valkey+cluster://user:pass@h1:p1,h2:p2,h3:p3`: the
client asks the first one that answers for the slot map, so a role still starts when one seed is
down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import valkey.asyncio as valkey
from valkey.asyncio.cluster import ClusterNode, ValkeyCluster
from valkey.asyncio.retry import Retry
from valkey.backoff import ExponentialBackoff
from valkey.exceptions import ConnectionError as ValkeyConnectionError
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

from voicemesh.config.connections import valkey_options
from voicemesh.config.settings import ConnectionSettings

#: either client: the store's commands are the same on both
Client = valkey.Valkey | ValkeyCluster

CLUSTER_SUFFIX = "+cluster"


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
    return ValkeyCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in parsed.seeds],
        # A master's failover takes ~cluster-node-timeout plus an election (a few seconds): a
        # command retries with backoff across it and re-reads the slot map, rather than failing
        # the turn after three quick refusals.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 12),
        retry_on_error=[ValkeyConnectionError, ValkeyTimeoutError],
        cluster_error_retry_attempts=12,
        connection_error_retry_attempts=12,
        socket_connect_timeout=1.0,
        **opts,
    )


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
