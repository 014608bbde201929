"""Failover time per failure kind, against the configured attempt timeout.

    .venv/bin/python benchmarks/bench_fallback.py [--runs 20] [--timeout-ms 400]

An LLM turn runs through `Chain` with the OpenAI connector (primary) and the Anthropic connector
(fallback), both on loopback servers speaking the real protocols. For each failure kind the
primary is told to fail, and the benchmark prints, as p50/p95 over the runs:

- detect: request start → the primary's failure is known (for "hang" this is the timeout);
- failover: the primary's failure → the fallback's first token;
- total: request start → first token the caller gets;
- next: the next request, once the primary is marked down in the shared health board (it is
  skipped at once, by every instance);

and the baseline: first token from the healthy fallback alone, measured in the same run.
Real nats-server and valkey-server are started for the health board.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from voicemesh.bus import Bus
from voicemesh.config.models import parse_agent_config
from voicemesh.connectors.base import Connector, LLMConnector
from voicemesh.connectors.fallback import Chain
from voicemesh.connectors.health import HealthBoard
from voicemesh.connectors.registry import ConnectorPool
from voicemesh.servers import start_nats, start_valkey
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.anthropic import AnthropicServer
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer

REPLY = "The tide comes in at noon. Boats wait by the pier."
KINDS = ["error", "429", "500", "401", "hang", "die"]
MESSAGES = [{"role": "user", "content": "when is the tide?"}]


class TimedChain(Chain):
    """Chain that notes when a failure was detected."""

    failed_at: float | None = None

    async def failed(self, *args: Any, **kw: Any) -> Any:
        self.failed_at = time.perf_counter()
        return await super().failed(*args, **kw)


def config(primary_url: str, fallback_url: str, timeout_ms: int, order: list[str]) -> Any:
    root = Path(__file__).resolve().parent.parent
    data = orjson.loads((root / "config" / "agent-config.json").read_bytes())
    data["connectors"]["llm"] = {
        "primary": order[0],
        "fallback": order[1:],
        "attempt_timeout_ms": timeout_ms,
        "probe_interval_ms": 60_000,
        "config": {
            "openai": {"base_url": f"{primary_url}/v1", "model": "gpt-x", "api_key": None},
            "anthropic": {"base_url": fallback_url, "model": "claude-x", "api_key": "${BENCH}"},
        },
    }
    return parse_agent_config(data)


def _work(conn: Connector, _: list[str]) -> Any:
    assert isinstance(conn, LLMConnector)
    return conn.stream(MESSAGES)


async def first_token(chain: Chain) -> float:
    t0 = time.perf_counter()
    async for _ in chain.stream(_work):
        return time.perf_counter() - t0
    raise RuntimeError("no token")


async def through_failure(chain: TimedChain) -> tuple[float, float, float]:
    """Run a whole reply: (request → first token, request → failure, failure → next token)."""
    t0 = time.perf_counter()
    first = after = None
    async for _ in chain.stream(_work):
        now = time.perf_counter()
        first = first if first is not None else now - t0
        if chain.failed_at is not None and after is None:
            after = now - chain.failed_at
    assert first is not None and chain.failed_at is not None and after is not None
    return first, chain.failed_at - t0, after


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


async def main(runs: int, timeout_ms: int) -> None:
    import os

    os.environ.setdefault("BENCH", "bench-key")
    os.environ.setdefault("VOICEMESH_SECRET_ENV", "llm.anthropic:BENCH")  # allow ${BENCH}
    os.environ.setdefault("VOICEMESH_EGRESS_PRIVATE", "on")  # the providers are loopback servers
    data = Path(tempfile.mkdtemp(prefix="vm-bench-"))
    nats, valkey = start_nats(data), start_valkey(data)
    primary = OpenAIChatServer([REPLY], chunk_words=2)
    fallback = AnthropicServer([REPLY], chunk_words=2)
    await primary.start()
    await fallback.start()
    bus = await Bus.connect(nats.url)
    store = ConfigStore.from_url(valkey.url, key_prefix="bench")
    pool = ConnectorPool()
    try:
        base_cfg = config(primary.url, fallback.url, timeout_ms, ["anthropic"])
        baseline = [await first_token(Chain(pool, base_cfg, "llm")) for _ in range(runs)]
        rows = []
        for kind in KINDS:
            detect, failover, total, following = [], [], [], []
            for i in range(runs):
                health = HealthBoard(
                    store=store,
                    nc=bus.nc,
                    key_prefix=f"b{kind}{i}",
                    subject=f"bench.health.{kind}.{i}",
                    instance="bench",
                )
                await health.start()
                cfg = config(primary.url, fallback.url, timeout_ms, ["openai", "anthropic"])
                primary.fail(kind, after=3)  # type: ignore[arg-type]
                got, failed, resumed = await through_failure(
                    TimedChain(pool, cfg, "llm", health=health)
                )
                detect.append(failed)
                total.append(got)
                failover.append(resumed)
                following.append(await first_token(Chain(pool, cfg, "llm", health=health)))
                await health.stop()
            rows.append((kind, detect, failover, total, following))
            primary.heal()
        await print_table(rows, baseline, timeout_ms, runs)
    finally:
        await pool.aclose()
        await store.close()
        await bus.close()
        await primary.stop()
        await fallback.stop()
        nats.stop()
        valkey.stop()


async def print_table(rows: list[Any], baseline: list[float], timeout_ms: int, runs: int) -> None:
    b50 = pct(baseline, 50)
    print(
        f"LLM failover, OpenAI loopback → Anthropic loopback, attempt_timeout_ms={timeout_ms}, "
        f"{runs} runs each; baseline (healthy fallback alone) first token p50 {b50:.1f} ms"
    )
    print()
    print(
        "| failure | detect p50 / p95 ms | failover p50 / p95 ms | total p50 ms | "
        "total ÷ baseline | next request p50 ms (primary marked down) |"
    )
    print("|---|---|---|---|---|---|")
    for kind, detect, failover, total, following in rows:
        print(
            f"| {kind} | {pct(detect, 50):.1f} / {pct(detect, 95):.1f} | "
            f"{pct(failover, 50):.1f} / {pct(failover, 95):.1f} | {pct(total, 50):.1f} | "
            f"{pct(total, 50) / b50:.2f} | {pct(following, 50):.1f} |"
        )
    print()
    print(
        '"die": the primary streams 3 chunks, then its connection is cut; total is its first '
        "token, and failover is the time from the cut to the fallback's continuation."
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--timeout-ms", type=int, default=400)
    args = ap.parse_args()
    asyncio.run(main(args.runs, args.timeout_ms))
