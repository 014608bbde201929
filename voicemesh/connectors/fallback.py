"""Primary-then-fallback over a stage's connector chain.

A connector that fails to load, or fails before producing anything, hands the unit of work to the
next one in the chain, so the work is not lost. A failure after the first result is re-raised
(resuming mid-stream on another connector is the fallback issue's work).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from voicemesh.config.models import AgentConfig
from voicemesh.connectors.base import Connector
from voicemesh.connectors.registry import ConnectorPool

log = logging.getLogger(__name__)

T = TypeVar("T")


class AllConnectorsFailed(RuntimeError):
    pass


class Chain:
    """A session's connectors for one stage, loaded on first use (from the process-wide pool)."""

    def __init__(self, pool: ConnectorPool, config: AgentConfig, stage: str):
        self.pool, self.config, self.stage = pool, config, stage
        self.names = config.stage(stage).chain

    async def get(self, name: str) -> Connector:
        return await self.pool.get(self.stage, name, self.config.options(self.stage, name))

    async def preload(self) -> list[str]:
        """Load every connector now; returns the errors (a failed one is retried on use)."""
        errors = []
        for name in self.names:
            try:
                await self.get(name)
            except Exception as exc:
                errors.append(f"{self.stage} connector {name}: {exc}")
        return errors

    def _failed(self, name: str, exc: Exception, errors: list[str]) -> None:
        log.warning("%s connector %s failed: %s; trying the next", self.stage, name, exc)
        errors.append(f"{name}: {exc}")

    async def call_first(self, work: Callable[[Connector], Awaitable[T]]) -> tuple[Connector, T]:
        errors: list[str] = []
        for name in self.names:
            try:
                conn = await self.get(name)
                return conn, await work(conn)
            except Exception as exc:
                self._failed(name, exc, errors)
        raise AllConnectorsFailed(f"every {self.stage} connector failed: " + "; ".join(errors))

    async def stream_first(
        self, work: Callable[[Connector], AsyncIterator[T]]
    ) -> AsyncIterator[tuple[Connector, T]]:
        errors: list[str] = []
        for name in self.names:
            started = False
            try:
                conn = await self.get(name)
                async for item in work(conn):
                    started = True
                    yield conn, item
                return
            except Exception as exc:
                if started:
                    raise
                self._failed(name, exc, errors)
        raise AllConnectorsFailed(f"every {self.stage} connector failed: " + "; ".join(errors))
