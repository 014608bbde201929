"""`voicemesh up` with nothing configured: it starts its own nats-server and valkey-server, seeds
the default agent, starts every role, serves the API, and on Ctrl-C leaves nothing running."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import AGENT_FILE, ROOT
from voicemesh.callers.script import load_pcm16
from voicemesh.config.settings import ConnectionSettings
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


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw if b"=" in e)


def logins_are_per_role(data: Path, roles: list[int], nats_url: str, output: str) -> None:
    """The embedded servers want a login: each role has its own user and password, in its
    environment and never on its command line; the configs are private; nothing is logged."""
    for name in ("nats.conf", "valkey-users.acl"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    users, passwords = set(), set()
    for pid in roles:
        env, argv = environ(pid), Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        role = argv.split("\0")[-2]
        assert env["VOICEMESH_NATS_USER"] == env["VOICEMESH_VALKEY_USERNAME"] == role
        for key in ("VOICEMESH_NATS_PASSWORD", "VOICEMESH_VALKEY_PASSWORD"):
            assert env[key] not in argv and env[key] not in output
            passwords.add(env[key])
        users.add(role)
    assert users == {"transport", "stt", "llm", "tts"} and len(passwords) == 8

    async def refused() -> None:
        import nats as nats_client

        with pytest.raises(Exception, match="Authorization Violation"):
            await nats_client.connect(nats_url, allow_reconnect=False, max_reconnect_attempts=0)

    asyncio.run(refused())


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
        logins_are_per_role(data, roles, nats.group(1), out.text)

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


# --- supervision: a role that dies is restarted; one whose engine cannot run stops `up` ---------


class Up:
    """`voicemesh up` as a newcomer runs it (embedded servers, the default agent), output read."""

    def __init__(self, tmp_path: Path, **env: str):
        self.data = tmp_path / "vm-up-data"
        self.port = free_port()
        base = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NATS_URL", "VALKEY_URL") and not k.startswith("VOICEMESH_")
        }
        self.stderr = (tmp_path / "up.stderr").open("w")
        argv = [sys.executable, "-m", "voicemesh", "up", "--data-dir", str(self.data)]
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port), "--agent-file", str(AGENT_FILE)],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=ROOT,
            env={**base, "HF_HUB_OFFLINE": "1", **env},
            start_new_session=True,
        )
        self.out = Output(self.proc)

    def wait_for(self, pattern: str, limit_s: float = 300) -> re.Match[str]:
        deadline = time.monotonic() + limit_s
        while (m := self.out.find(pattern)) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} within {limit_s} s:\n{self.text}"
            if self.proc.poll() is not None:
                self.out.thread.join(5)
                if (m := self.out.find(pattern)) is not None:
                    return m
                raise AssertionError(f"up exited ({self.proc.returncode}):\n{self.text}")
            time.sleep(0.1)
        return m

    @property
    def text(self) -> str:
        return self.out.text

    @property
    def nats_url(self) -> str:
        return self.wait_for(r"started nats-server at (nats://127\.0\.0\.1:\d+)").group(1)

    def login(self, role: str) -> ConnectionSettings:
        """A role's NATS and Valkey login, as its environment has it (an operator's tool on this
        host, running as the same user, could read it there too)."""
        [pid] = self.role_pids(role)
        env = environ(pid)
        return ConnectionSettings(
            nats_user=env["VOICEMESH_NATS_USER"],
            nats_password=env["VOICEMESH_NATS_PASSWORD"],
            valkey_username=env["VOICEMESH_VALKEY_USERNAME"],
            valkey_password=env["VOICEMESH_VALKEY_PASSWORD"],
        )

    def role_pids(self, role: str) -> list[int]:
        found = []
        for pid in pids_with_env(f"NATS_URL={self.nats_url}"):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[-3:-1] == [b"serve", role.encode()]:
                found.append(pid)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for _, pid in embedded_servers(self.data, set()):
            os.kill(pid, signal.SIGKILL)
        self.stderr.close()


async def test_up_restarts_a_killed_llm_and_the_next_turn_is_answered(
    tmp_path: Path, say: Callable[[str], Path]
) -> None:
    """SIGKILL the only LLM instance during a call: `up` says so and starts it again, the rest of
    the stack (and the call) stays up, and the next turn is answered by the new instance."""
    from voicemesh.bus import Bus
    from voicemesh.callers.script import TurnResult
    from voicemesh.callers.websocket import call_over_websocket

    up = Up(tmp_path)
    try:
        up.wait_for(r"\bup:")
        [old] = up.role_pids("llm")
        others = {r: up.role_pids(r) for r in ("transport", "stt", "tts")}
        # the transport's login: it may ask whether a stage is up
        bus = await Bus.connect(up.nats_url, name="e2e-up", settings=up.login("transport"))
        times: dict[str, float] = {}

        async def kill_llm(_: int, turn: TurnResult) -> None:
            assert turn.bot_text and turn.latency_ms is not None, turn  # turn 1 was answered
            times["kill"] = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            await asyncio.to_thread(up.wait_for, r"llm restarted \(pid \d+\)", 60)
            while True:  # the new instance answers its health ping once its engine is proven
                try:
                    await bus.nc.request("vm.health.llm", b"{}", timeout=0.5)
                    break
                except Exception:
                    assert time.perf_counter() - times["kill"] < 120, up.text
                    await asyncio.sleep(0.1)
            times["ready"] = time.perf_counter()

        questions = [say("What is the capital of France?"), say("Tell me about the moon.")]
        result = await call_over_websocket(
            f"http://127.0.0.1:{up.port}", questions, None, after_turn=kill_llm, turn_timeout=60
        )
        await bus.close()
        _, second = result.turns
        assert second.error is None and second.bot_text, second  # answered by the new instance
        assert second.latency_ms is not None
        assert up.out.find(r"llm killed by SIGKILL; restarting it in 0\.5 s"), up.text
        [new] = up.role_pids("llm")
        assert new != old
        assert {r: up.role_pids(r) for r in others} == others  # nothing else was restarted
        assert up.proc.poll() is None  # and `up` itself kept running
        # the reply starts when the caller's second question (said after recovery) is answered
        spoken = len(load_pcm16(questions[1])) / 2 / 16000
        reply = times["ready"] + 0.3 + spoken + second.latency_ms / 1000
        back = times["ready"] - times["kill"]
        print(
            f"\nLLM SIGKILL under `voicemesh up`: back and proven {back:.1f} s after the kill; "
            f"next reply {reply - times['kill']:.1f} s after it (v2v {second.latency_ms:.0f} ms)"
        )
    finally:
        up.stop()


def test_up_stops_with_the_engine_message_when_llama_cpp_dies_with_sigill(tmp_path: Path) -> None:
    """A llama.cpp that dies with SIGILL on real input (here: at import, in a stand-in package
    put ahead of the real one) stops `up` at startup with the engine, the cause and the cure."""
    fake = tmp_path / "fake" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    up = Up(tmp_path, PYTHONPATH=str(tmp_path / "fake"))
    try:
        rc = up.proc.wait(300)
        up.out.thread.join(10)
        assert rc == 1, up.text
        assert up.out.find(r"error: exited during startup: llm exit status 4"), up.text
        assert up.out.find(
            r"voicemesh serve llm: llama.cpp died with an illegal instruction \(SIGILL\): the "
            r"installed build targets a CPU this machine does not have; run make clean && make run"
        ), up.text
        assert up.out.find(r"stopped nats-server and valkey-server"), up.text
    finally:
        up.stop()
