"""Starting every role as its own process and waiting until each answers its health ping: shared by
`voicemesh up`, the end-to-end tests and the benchmarks. `up` then supervises the roles: one that
exits is restarted with backoff, while the rest of the stack keeps serving; one that keeps dying
stops the stack with its last words, since restarting it forever would hide the cause."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from voicemesh.bus.bus import Bus
from voicemesh.config.settings import ConnectionSettings
from voicemesh.config.stages import PROCESSING, Stage
from voicemesh.errors import VoicemeshError
from voicemesh.servers import free_ports

ROLES: tuple[Stage, ...] = tuple(Stage)  # every role, the transport included
STAGES = PROCESSING  # the stage services
#: `voicemesh serve`'s exit status when a local engine cannot run on this machine: restarting
#: cannot help, so supervision stops at once with the role's message.
ENGINE_FAILED = 4
#: Lines of each role's output kept for the message when it dies.
TAIL_LINES = 30


class StartupError(VoicemeshError, RuntimeError):
    pass


class CrashLoop(StartupError):
    """A role exited too often, or cannot run at all: the stack stops."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Stack:
    """Processes of every role: `instances` of each stage and one transport."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        instances: int = 1,
        http_port: int = 8080,
        http_host: str = "127.0.0.1",
        role_env: Mapping[str, Mapping[str, str]] | None = None,
    ):
        self.env = dict(env)
        #: per role, what only that role's processes get (its own NATS and Valkey credentials)
        self.role_env = {role: dict(e) for role, e in (role_env or {}).items()}
        self.instances = instances
        self.http_host, self.http_port = http_host, http_port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metrics_ports: dict[str, int] = {}
        #: what each process was started as, so supervision can start it again
        self.specs: dict[str, tuple[str, dict[str, str]]] = {}
        self.tails: dict[str, deque[str]] = {}

    def start(self) -> None:
        ports = iter(free_ports(len(STAGES) * self.instances, self.http_host))
        for role in STAGES:
            for i in range(self.instances):
                name = f"{role}-{i + 1}" if self.instances > 1 else str(role)
                port = self.metrics_ports[name] = next(ports)
                self.spawn(name, role, VOICEMESH_METRICS_PORT=str(port))
        self.spawn(
            str(Stage.TRANSPORT),
            Stage.TRANSPORT,
            VOICEMESH_HTTP_HOST=self.http_host,
            VOICEMESH_HTTP_PORT=str(self.http_port),
        )

    def spawn(self, name: str, role: str, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start a role; its output goes on to ours, and its last lines are kept for the message
        if it dies."""
        self.specs[name] = (role, extra_env)
        proc = subprocess.Popen(
            self.command(role),
            env={**self.env, **self.role_env.get(role, {}), **extra_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        tail = self.tails[name] = deque(maxlen=TAIL_LINES)
        threading.Thread(target=_relay, args=(proc, tail), daemon=True).start()
        self.procs[name] = proc
        return proc

    def command(self, role: str) -> list[str]:
        return [sys.executable, "-m", "voicemesh", "serve", role]

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        role, extra_env = self.specs[name]
        return self.spawn(name, role, **extra_env)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def last_words(self, name: str, lines: int = 12) -> str:
        """The end of a dead role's output, indented for the console."""
        tail = list(self.tails.get(name, ()))[-lines:]
        return "\n".join(f"    {line}" for line in tail) if tail else "    (no output)"

    def death(self, name: str) -> str:
        code = self.procs[name].returncode
        return f"{name} {describe_exit(code)}; its last lines:\n{self.last_words(name)}"

    async def supervise(
        self,
        stopping: Callable[[], bool],
        say: Callable[[str], None],
        *,
        max_exits: int = 5,
        window_s: float = 60.0,
        first_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        """Until `stopping()`: restart each role that exits, after a backoff that doubles with
        each exit in the last `window_s`. Raises CrashLoop when a role exits `max_exits` times
        within `window_s`, or exits because its engine cannot run here (ENGINE_FAILED)."""
        exits: dict[str, deque[float]] = {}
        due: dict[str, float] = {}  # name -> when to start it again
        while not stopping():
            now = time.monotonic()
            for name in self.dead():
                if name in due:
                    continue
                code = self.procs[name].returncode
                if code == ENGINE_FAILED:
                    raise CrashLoop(f"{self.death(name)}\n  (its engine cannot run here: stopping)")
                recent = exits.setdefault(name, deque())
                recent.append(now)
                while recent and now - recent[0] > window_s:
                    recent.popleft()
                if len(recent) >= max_exits:
                    raise CrashLoop(
                        f"{name} exited {len(recent)} times within {window_s:.0f} s: stopping "
                        f"the stack. Last exit: {self.death(name)}"
                    )
                backoff = min(first_backoff_s * 2 ** (len(recent) - 1), max_backoff_s)
                due[name] = now + backoff
                say(
                    f"{name} {describe_exit(code)}; restarting it in {backoff:.1f} s "
                    f"(exit {len(recent)} of {max_exits} allowed within {window_s:.0f} s); "
                    "the rest of the stack keeps running"
                )
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    proc = self.respawn(name)
                    say(f"{name} restarted (pid {proc.pid})")
            await asyncio.sleep(0.2)

    async def wait_ready(
        self,
        nats_url: str,
        prefix: str,
        *,
        limit_s: float = 600.0,
        progress: Callable[[str], None] = lambda _: None,
        settings: ConnectionSettings | None = None,
    ) -> None:
        """Until every role answers `<prefix>.health.<role>`; fails fast if a process exits.
        `settings` has NATS credentials and TLS (default: from the environment)."""
        bus = await Bus.connect(nats_url, name="voicemesh-launcher", settings=settings)
        nc = bus.nc
        try:
            pending, start, noted = set(ROLES), time.monotonic(), time.monotonic()
            while pending:
                if dead := self.dead():
                    raise StartupError(
                        "exited during startup: " + "\n".join(self.death(n) for n in dead)
                    )
                for role in sorted(pending):
                    try:
                        # hop: -> voicemesh.role.Role._on_health (vm.health.<role>)
                        await nc.request(f"{prefix}.health.{role}", b"{}", timeout=0.5)
                    except Exception:
                        continue
                    pending.discard(role)
                    progress(f"  {role} ready ({time.monotonic() - start:.1f} s)")
                if time.monotonic() - start > limit_s:
                    raise StartupError(f"timed out waiting for {', '.join(sorted(pending))}")
                if pending and time.monotonic() - noted > 10:
                    noted = time.monotonic()
                    progress(f"  waiting for {', '.join(sorted(pending))} (loading engines)...")
                await asyncio.sleep(0.2)
        finally:
            await bus.close()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (each role drains), then SIGKILL whatever is left after `timeout`."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _relay(proc: subprocess.Popen[bytes], tail: deque[str]) -> None:
    """Pass a role's output (its log) on to our stderr line by line, keeping its last lines."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # our stderr is gone (closed pipe, ended test capture)
            pass
