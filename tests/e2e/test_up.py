"""`voicemesh up` with nothing configured: it starts its own nats-server and valkey-server, seeds
the default agent, starts every role, serves the API, and on Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import AGENT_FILE, ROOT
from voicemesh.servers import free_port

pytestmark = pytest.mark.slow


def _live(d: Path) -> bool:
    try:
        return (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def embedded_servers(data: Path, ports: set[int]) -> list[tuple[str, int]]:
    """Live nats-server and valkey-server processes of one `up`, as (name, pid): known by their
    data dir (an argument, or the working directory valkey-server moves to) or by their port
    (nats-server's `-p`, valkey-server's process title `valkey-server host:port`)."""
    root = str(data)

    def inside(p: str) -> bool:
        return p == root or p.startswith(root + "/")

    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            name = Path(os.readlink(d / "exe")).name
            if name not in ("nats-server", "valkey-server"):
                continue
            args = [a for a in (d / "cmdline").read_bytes().decode().split("\0") if a]
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        joined = " ".join(args)
        by_port = any(re.search(rf"(?:-p |:){port}\b", joined) for port in ports)
        if (by_port or inside(cwd) or any(inside(a) for a in args)) and _live(d):
            found.append((name, int(d.name)))
    return sorted(found)


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def pids_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds `entry` (e.g. NATS_URL=...)."""
    found = []
    needle = entry.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and _live(d):
            found.append(int(d.name))
    return found


class Output:
    """Reads a pipe on a thread, so the child (and its children, which share it) never block."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> re.Match[str] | None:
        for line in list(self.lines):
            if m := re.search(pattern, line):
                return m
        return None


def test_up_serves_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    data = tmp_path / "vm-up-data"
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "VALKEY_URL", "VOICEMESH_NATS_URL", "VOICEMESH_VALKEY_URL")
        and not k.startswith("VOICEMESH_")
    }
    env["HF_HUB_OFFLINE"] = "1"
    stderr = (tmp_path / "up.stderr").open("w")
    argv = [sys.executable, "-m", "voicemesh", "up", "--data-dir", str(data), "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--agent-file", str(AGENT_FILE)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,  # a signal for this test goes to `up` alone
    )
    out = Output(proc)
    ports: set[int] = set()

    def note_ports() -> None:
        for pattern in (r"started nats-server at nats://[\d.]+:(\d+)", r"valkey://[\d.]+:(\d+)"):
            if m := out.find(pattern):
                ports.add(int(m.group(1)))

    try:
        deadline = time.monotonic() + 300
        while out.find(r"\bup:") is None:
            note_ports()
            assert proc.poll() is None, f"up exited with {proc.returncode}:\n{out.text}"
            assert time.monotonic() < deadline, f"not up within 300 s:\n{out.text}"
            time.sleep(0.2)
        note_ports()
        nats = out.find(r"started nats-server at (nats://127\.0\.0\.1:\d+)")
        assert nats and out.find(r"started valkey-server at valkey://"), out.text
        assert len(ports) == 2, out.text
        assert out.find(r"default agent 'local' created from"), out.text
        assert out.find(r"API auth is off \(local use\)"), out.text  # so no key below

        resp = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text
        agents = httpx.get(f"http://127.0.0.1:{port}/api/agents", timeout=10).json()
        assert agents["default"] == "local"
        assert [a["name"] for a in agents["agents"]] == ["local"]

        servers = embedded_servers(data, ports)
        assert [n for n, _ in servers] == ["nats-server", "valkey-server"], servers
        roles = pids_with_env(f"NATS_URL={nats.group(1)}")
        assert len(roles) == 4, roles  # transport, stt, llm, tts

        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(60)
        out.thread.join(10)
        assert rc == 0, f"exit code {rc}:\n{out.text}"
        assert out.find(r"stopped nats-server and valkey-server"), out.text
        assert embedded_servers(data, ports) == [], "an embedded server is still running"
        assert all(refuses(p) for p in ports), "a server port still accepts connections"
        assert pids_with_env(f"NATS_URL={nats.group(1)}") == [], "a role process is still running"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        # Whatever failed, leave nothing behind: `up` (and its roles) first, gently, then any
        # embedded server it left (they run in their own sessions).
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for _, pid in embedded_servers(data, ports):
            os.kill(pid, signal.SIGKILL)
        stderr.close()
