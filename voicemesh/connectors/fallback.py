"""Primary-then-fallback over a stage's connector chain, so a unit of work is never lost.

Triggers: any exception, no first result within the stage's attempt_timeout_ms (and a stream that
stalls that long between results), HTTP 429/5xx, permanent errors (401/403/invalid request, a
missing secret), and a stream that dies midway. The unit moves to the next connector with what was
already delivered, so the stage can resume instead of restarting: the LLM continues the reply
after the text already sent, TTS re-synthesizes the sentence from where audio stopped, STT replays
the buffered utterance. Failed connectors are skipped by every instance (HealthBoard) until a
background probe finds them healthy; when every connector is marked down they are still tried in
order, since a stale mark must not refuse work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from voicemesh.config.connectors import DEFAULT_ATTEMPT_TIMEOUT_MS
from voicemesh.config.models import AgentConfig
from voicemesh.config.secrets import credential_fields
from voicemesh.connectors import metrics
from voicemesh.connectors.base import Connector
from voicemesh.connectors.errors import ConnectorError, FailureKind, classify
from voicemesh.connectors.health import ConnectorId, HealthBoard, fingerprint
from voicemesh.connectors.registry import ConnectorPool
from voicemesh.errors import VoicemeshError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The attempt timeout of the last connector left in the order (see Chain.limit_s).
LAST_RESORT_S = 60.0


class AllConnectorsFailed(VoicemeshError, RuntimeError):
    """`str()` has each connector's detail (for the logs); `public` and `code` are what a caller
    is told."""

    def __init__(self, stage: str, errors: list[tuple[str, ConnectorError]]):
        self.stage = stage
        self.errors = errors
        detail = "; ".join(f"{name}: {err}" for name, err in errors)
        super().__init__(f"every {stage} connector failed: {detail}")

    @property
    def public(self) -> str:
        each = "; ".join(f"{name}: {err.public}" for name, err in self.errors)
        return f"{self.stage} provider failed: {each}" if each else f"{self.stage} failed"

    @property
    def code(self) -> str:
        return self.errors[-1][1].code if self.errors else INTERNAL_CODE


#: The code of a failure that is not a provider's (a bug, the store): its text stays in the logs.
INTERNAL_CODE = "STAGE_INTERNAL_3100"


def caller_error(stage: str, exc: BaseException) -> tuple[str, str]:
    """(text, code) a caller and the stored context get for a failed unit of work: short and
    generic. The provider's words (which may quote whatever its host answered) stay in the logs."""
    if isinstance(exc, AllConnectorsFailed):
        return exc.public, exc.code
    if isinstance(exc, ConnectorError):
        return f"{stage} provider failed: {exc.public}", exc.code
    return f"{stage} failed (see the stage's logs)", INTERNAL_CODE


def _credentials(conn: Connector | None) -> list[str]:
    """The connector's resolved credential values, to cut from a failure's detail."""
    if conn is None:
        return []
    options = conn.options
    return [
        value
        for name in credential_fields(type(options))
        if isinstance(value := getattr(options, name, None), str) and value
    ]


class Chain:
    """A session's connectors for one stage, loaded on first use from the process-wide pool."""

    def __init__(
        self,
        pool: ConnectorPool,
        config: AgentConfig,
        stage: str,
        *,
        health: HealthBoard | None = None,
        on_fallback: Callable[[str, str, ConnectorError], None] | None = None,
    ):
        self.pool, self.config, self.stage, self.health = pool, config, stage, health
        #: told (failed connector, the one taking over, why) once per failover
        self.on_fallback = on_fallback
        sc = config.stage(stage)
        self.names = sc.chain
        timeout_ms = sc.attempt_timeout_ms or DEFAULT_ATTEMPT_TIMEOUT_MS.get(stage, 5000)
        self.timeout_s = timeout_ms / 1000
        self.probe_interval_ms = sc.probe_interval_ms
        self.failures: list[tuple[str, ConnectorError]] = []
        self._moves_told = 0

    def limit_s(self, name: str, order: list[str]) -> float:
        """The attempt timeout is a reason to fail over: with nowhere left to go (the last
        connector of the order), waiting is better than losing the unit, up to LAST_RESORT_S (a
        local engine busy with other sessions' work is slow, not failed)."""
        return self.timeout_s if name != order[-1] else max(self.timeout_s, LAST_RESORT_S)

    def cid(self, name: str) -> ConnectorId:
        return (self.stage, name, fingerprint(self.config.options(self.stage, name)))

    def order(self) -> list[str]:
        """Healthy connectors first, in chain order; those marked down, or that already failed
        this unit of work (a live STT stream before its replay), last."""
        failed = {n for n, _ in self.failures}
        down = {
            n
            for n in self.names
            if n in failed or (self.health is not None and self.health.is_down(self.cid(n)))
        }
        return [n for n in self.names if n not in down] + [n for n in self.names if n in down]

    async def get(self, name: str) -> Connector:
        return await self.pool.get(self.stage, name, self.config.options(self.stage, name))

    def lease(self, name: str) -> contextlib.AbstractAsyncContextManager[Connector]:
        """The connector, held for one unit of work: the pool does not close it meanwhile."""
        return self.pool.lease(self.stage, name, self.config.options(self.stage, name))

    async def preload(self) -> list[str]:
        """Load every connector now; returns the errors (a failed one is retried on use)."""
        errors = []
        for name in self.names:
            try:
                await self.get(name)
            except Exception as exc:
                errors.append(f"{self.stage} connector {name}: {exc}")
        return errors

    async def failed(
        self, name: str, conn: Connector | None, exc: BaseException, started: bool
    ) -> ConnectorError:
        err = classify(exc, started=started).scrubbed(_credentials(conn))
        self.failures.append((name, err))
        metrics.ERRORS.labels(self.stage, name, err.kind).inc()
        log.warning("%s connector %s failed (%s): %s", self.stage, name, err.code, err)
        # A local engine serves one request at a time: one that timed out was most likely busy
        # with other sessions' work, not broken. This unit fails over, but marking the engine
        # down would send every session to the fallback while it is free again a moment later.
        busy = err.kind is FailureKind.TIMEOUT and conn is not None and conn.engine is not None
        if busy:
            log.info(
                "%s connector %s is a local engine: not marked down for a timeout", self.stage, name
            )
        elif self.health is not None:
            hold_ms = max(3 * self.probe_interval_ms, int((err.retry_after_s or 0) * 1000))
            await self.health.mark_down(
                self.cid(name),
                err,
                hold_ms=hold_ms,
                probe=conn.probe if conn is not None and conn.can_probe else None,
                probe_interval_ms=self.probe_interval_ms,
            )
        return err

    def _moved(self, to: str) -> None:
        # once per failure: a chain used again (the LLM's next tool round) has moved already
        if len(self.failures) > self._moves_told:
            self._moves_told = len(self.failures)
            name, err = self.failures[-1]
            metrics.FALLBACKS.labels(self.stage, name, to, err.kind).inc()
            if self.on_fallback is not None:
                self.on_fallback(name, to, err)

    async def call_first(self, work: Callable[[Connector], Awaitable[T]]) -> tuple[Connector, T]:
        """One-shot work (an STT utterance): the result must come within the attempt timeout."""
        order = self.order()
        for name in order:
            conn: Connector | None = None
            limit = self.limit_s(name, order)
            try:
                async with self.lease(name) as conn:
                    self._moved(name)
                    metrics.REQUESTS.labels(self.stage, name).inc()
                    t0 = time.perf_counter()
                    async with asyncio.timeout(limit):
                        result = await work(conn)
                metrics.FIRST_RESULT.labels(self.stage, name).observe(time.perf_counter() - t0)
                return conn, result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError) and conn is not None:
                    exc = ConnectorError(
                        FailureKind.TIMEOUT, f"no result within {limit * 1000:.0f} ms"
                    )
                await self.failed(name, conn, exc, started=False)
        raise AllConnectorsFailed(self.stage, self.failures)

    async def stream(
        self, work: Callable[[Connector, list[T]], AsyncIterator[T]]
    ) -> AsyncGenerator[tuple[Connector, T], None]:
        """Streamed work (an LLM reply, a TTS sentence). `work(conn, delivered)` gets what earlier
        connectors already delivered for this unit, to resume after it rather than repeat it."""
        delivered: list[T] = []
        order = self.order()
        for name in order:
            conn: Connector | None = None
            limit = self.limit_s(name, order)
            got = 0
            try:
                async with self.lease(name) as conn:
                    self._moved(name)
                    metrics.REQUESTS.labels(self.stage, name).inc()
                    stream = work(conn, list(delivered))
                    try:
                        t0 = time.perf_counter()
                        while True:
                            try:
                                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                                # cancellation (a barge-in) that lands as the item completes.
                                async with asyncio.timeout(limit):
                                    item = await anext(stream)
                            except StopAsyncIteration:
                                return
                            except TimeoutError:
                                what = "first result" if not got else "next result (stream stalled)"
                                raise ConnectorError(
                                    FailureKind.TIMEOUT, f"no {what} within {limit * 1000:.0f} ms"
                                ) from None
                            if not got:
                                metrics.FIRST_RESULT.labels(self.stage, name).observe(
                                    time.perf_counter() - t0
                                )
                            got += 1
                            delivered.append(item)
                            yield conn, item
                    finally:
                        # before the lease ends: the connector may be closed with it
                        if hasattr(stream, "aclose"):
                            try:
                                await stream.aclose()
                            except Exception:
                                pass
            except asyncio.CancelledError:
                raise
            except GeneratorExit:
                raise
            except Exception as exc:
                await self.failed(name, conn, exc, started=got > 0)
        raise AllConnectorsFailed(self.stage, self.failures)
