"""Starting every role as its own process and waiting until each answers its health ping: shared by
`voicemesh up`, the end-to-end tests and the benchmarks."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from voicemesh.bus.bus import Bus
from voicemesh.config.settings import ConnectionSettings
from voicemesh.errors import VoicemeshError
from voicemesh.servers import free_ports

ROLES = ("transport", "stt", "llm", "tts")
STAGES = ("stt", "llm", "tts")


class StartupError(VoicemeshError, RuntimeError):
    pass


class Stack:
    """Processes of every role: `instances` of each stage and one transport."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        instances: int = 1,
        http_port: int = 8080,
        http_host: str = "127.0.0.1",
    ):
        self.env = dict(env)
        self.instances = instances
        self.http_host, self.http_port = http_host, http_port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metrics_ports: dict[str, int] = {}

    def start(self) -> None:
        ports = iter(free_ports(len(STAGES) * self.instances, self.http_host))
        for role in STAGES:
            for i in range(self.instances):
                name = f"{role}-{i + 1}" if self.instances > 1 else role
                port = self.metrics_ports[name] = next(ports)
                self.spawn(name, role, VOICEMESH_METRICS_PORT=str(port))
        self.spawn(
            "transport",
            "transport",
            VOICEMESH_HTTP_HOST=self.http_host,
            VOICEMESH_HTTP_PORT=str(self.http_port),
        )

    def spawn(self, name: str, role: str, **extra_env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voicemesh", "serve", role], env={**self.env, **extra_env}
        )
        self.procs[name] = proc
        return proc

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

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
                    codes = ", ".join(f"{n} ({self.procs[n].returncode})" for n in dead)
                    raise StartupError(f"exited during startup: {codes}")
                for role in sorted(pending):
                    try:
                        # hop: -> voicemesh.pipeline.base.StageService._on_health (vm.health.<role>)
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
