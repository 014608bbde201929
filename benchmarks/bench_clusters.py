"""Bus overhead and capacity on a 3-node NATS cluster + a Valkey Cluster (3 masters, 3 replicas)
against one nats-server + one valkey-server, and the single nodes again with tracing on (an
OTLP endpoint set: voicemesh/bus/tracing.py), in one run on one machine (issue 18).

For each backend it starts the servers on loopback, every role as a process (pass-through
connectors, no engines loaded), and three raw nats-py relays, then measures what
`voicemesh bench` measures (voicemesh/bench/harness.py):

- bus overhead: 640 B frames paced at 50/s per session through transport → stt → llm → tts →
  transport (the stage services) and through the raw 3-relay chain; per-frame p50/p99, loss;
- capacity: the most sessions before the loop's p99 passes 20 ms or a frame is lost;
- the Valkey work of a turn as the store does it (config read, epoch, context append, a claim
  taken and finished), p50/p99 per turn.

On the cluster every relay is connected to another node, so each raw hop crosses a route (the
worst case); the stages pick a node each from the seed list, as deployed roles do.

    python benchmarks/bench_clusters.py --quick      # a few seconds per step (checks it works)
    python benchmarks/bench_clusters.py              # the figures in docs/operations.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from voicemesh.bench.harness import (
    HOPS,
    PREFIX,
    RAW,
    Env,
    bus_loop,
    capacity,
    passthrough_config,
    stack_env,
)
from voicemesh.bench.report import summarize
from voicemesh.launcher import Stack
from voicemesh.servers import (
    free_port,
    start_nats,
    start_nats_cluster,
    start_valkey,
    start_valkey_cluster,
)
from voicemesh.state import ConfigStore


def relays(urls: list[str]) -> list[subprocess.Popen[bytes]]:
    """The raw chain, relay i on node i (mod the nodes)."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "voicemesh.bench.relay",
                urls[i % len(urls)],
                f"{RAW}.{src}",
                f"{RAW}.{dst}",
            ],
            stdout=subprocess.DEVNULL,
        )
        for i, (src, dst) in enumerate(itertools.pairwise(HOPS))
    ]


async def store_turns(store: ConfigStore, turns: int) -> dict[str, Any]:
    """The store's Valkey work of one turn, `turns` times, one after another (ms per turn)."""
    sid = (await store.create_session(passthrough_config(), ttl_s=600)).session_id
    claims = store.claims(owner="bench", ttl_ms=3000)
    times = []
    for _ in range(turns):
        t0 = time.perf_counter()
        await store.get_config(sid)
        epoch = await store.next_epoch(sid)
        await store.append_context(sid, {"role": "user", "content": "hello", "epoch": epoch})
        key = claims.key("llm", sid, epoch)
        await claims.take(key)
        await claims.finish(key)
        times.append((time.perf_counter() - t0) * 1000)
    await store.delete_config(sid)
    return summarize(times)


class Collector:
    """A loopback OTLP/HTTP endpoint that accepts and counts what it gets (for tracing on)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        collector = self
        self.posts = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                collector.posts += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def measure(backend: str, quick: bool) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix=f"vm-bench-{backend}-"))
    collector = Collector() if backend == "traced" else None
    if backend in ("single", "traced"):
        n, v = start_nats(data), start_valkey(data)
        nats_urls, valkey_url, servers = [n.url], v.url, [n, v]
    else:
        nc_, vc = start_nats_cluster(data), start_valkey_cluster(data)
        nats_urls, valkey_url, servers = [x.url for x in nc_.nodes], vc.url, [nc_, vc]
    seeds = ",".join(nats_urls)
    extra = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url} if collector else {}
    env_vars = stack_env(seeds, valkey_url, VOICEMESH_PRELOAD="0", **extra)
    store = ConfigStore.from_url(valkey_url, key_prefix=PREFIX)
    stack = Stack(env_vars, instances=1, http_port=free_port())
    chain: list[subprocess.Popen[bytes]] = []
    client = None
    try:
        stack.start()
        chain = relays(nats_urls)
        await stack.wait_ready(seeds, PREFIX, limit_s=300, progress=lambda _: None)
        client = await nats.connect(nats_urls[0], name="bench-client")
        await asyncio.sleep(0.5)
        env = Env(data, servers[0], servers[1], stack, chain, store, client, "")  # type: ignore[arg-type]
        sessions, seconds = (10, 2.0) if quick else (50, 10.0)
        raw = await bus_loop(env, "raw", sessions, seconds=seconds)
        loop = await bus_loop(env, "voicemesh", sessions, seconds=seconds)
        steps = [10, 40] if quick else [50, 100, 200, 300, 400]
        cap = await capacity(
            env, steps, limit_ms=20.0, seconds=2.0 if quick else 5.0, tick=lambda: None
        )
        valkey_turn = await store_turns(store, 50 if quick else 500)
        return {
            "backend": backend,
            "sessions": sessions,
            "raw": raw,
            "voicemesh": loop,
            "capacity": cap,
            "valkey_turn": valkey_turn,
        }
    finally:
        if client is not None:
            await client.close()
        for r in chain:
            r.terminate()
        await asyncio.to_thread(stack.stop)
        for r in chain:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.wait(5)
        await store.close()
        for s in servers:
            s.stop()
        if collector is not None:
            collector.close()


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short steps: check that it works")
    args = ap.parse_args()
    names = ("single", "cluster", "traced")
    rows = [await measure(b, args.quick) for b in names]
    print(f"\n{'':30}" + "".join(f"{n:>18}" for n in ("single", "cluster", "single+tracing")))
    for label, get in (
        ("raw 4-hop p50 / p99 ms", lambda r: (r["raw"]["p50_ms"], r["raw"]["p99_ms"])),
        (
            "voicemesh loop p50 / p99 ms",
            lambda r: (r["voicemesh"]["p50_ms"], r["voicemesh"]["p99_ms"]),
        ),
        (
            "Valkey work of a turn p50/p99",
            lambda r: (r["valkey_turn"]["p50"], r["valkey_turn"]["p99"]),
        ),
    ):
        cells = [f"{fmt(a)} / {fmt(b)}" for a, b in map(get, rows)]
        print(f"{label:30}" + "".join(f"{c:>18}" for c in cells))
    lost = [f"{r['raw']['frames_lost']} / {r['voicemesh']['frames_lost']}" for r in rows]
    print(f"{'frames lost raw / voicemesh':30}" + "".join(f"{c:>18}" for c in lost))
    cap = [str(r["capacity"]["max_sessions"]) for r in rows]
    print(f"{'capacity (p99 <= 20 ms)':30}" + "".join(f"{c:>18}" for c in cap))
    print(f"({rows[0]['sessions']} sessions at 50 frames/s each for the loop figures)")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
