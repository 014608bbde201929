"""Primary-then-fallback over a stage's connector chain.

A connector that fails before producing anything hands the unit of work to the next one in the
chain, so the work is not lost. (A failure after the first result is re-raised for now.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from voicemesh.config.models import AgentConfig
from voicemesh.connectors.base import Connector
from voicemesh.connectors.registry import ConnectorPool

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Connector)
T = TypeVar("T")


class AllConnectorsFailed(RuntimeError):
    pass


async def chain_of(pool: ConnectorPool, config: AgentConfig, stage: str) -> list[Connector]:
    sc = config.stage(stage)
    return [await pool.get(stage, name, config.options(stage, name)) for name in sc.chain]


async def call_first(
    connectors: list[Connector], work: Callable[[Connector], Awaitable[T]]
) -> tuple[Connector, T]:
    errors: list[str] = []
    for conn in connectors:
        try:
            return conn, await work(conn)
        except Exception as exc:
            log.warning("%s connector %s failed: %s; trying the next", conn.stage, conn.name, exc)
            errors.append(f"{conn.name}: {exc}")
    raise AllConnectorsFailed("; ".join(errors))


async def stream_first(
    connectors: list[Connector], work: Callable[[Connector], AsyncIterator[T]]
) -> AsyncIterator[tuple[Connector, T]]:
    errors: list[str] = []
    for conn in connectors:
        started = False
        try:
            async for item in work(conn):
                started = True
                yield conn, item
            return
        except Exception as exc:
            if started:
                raise
            log.warning("%s connector %s failed: %s; trying the next", conn.stage, conn.name, exc)
            errors.append(f"{conn.name}: {exc}")
    raise AllConnectorsFailed("; ".join(errors))
