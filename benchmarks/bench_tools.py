"""A NATS tool round trip through the LLM stage beside a raw NATS request/reply, in one run.

    python benchmarks/bench_tools.py [--calls 2000] [--quick]

Three measures on the same embedded nats-server and valkey-server, the tool service in this
process on its own connection (voicemesh.tools.serve), alternating so load hits all alike:

- raw: nats-py request/reply with the same payload to a plain responder;
- runner: ToolRunner.run (arguments parsed and schema-checked, the request, the reply parsed and
  capped, metrics);
- stage: LLMService._call, what the stage does per call (tool_call event, the run, the result
  appended to the context in Valkey, tool_result event).

Target (issue 15): stage p50 less than 2 ms above raw.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
import orjson

from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.connectors.base import ToolCall
from voicemesh.pipeline import LLMService
from voicemesh.servers import start_nats, start_valkey
from voicemesh.tools import serve
from voicemesh.tools.runner import ToolRunner

ROOT = Path(__file__).resolve().parent.parent


async def weather(city: str) -> dict[str, object]:
    return {"city": city, "forecast": "sunny", "celsius": 21}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(calls: int) -> dict[str, dict[str, float]]:
    data = Path(tempfile.mkdtemp(prefix="bench-tools-"))
    nats_srv, valkey_srv = start_nats(data), start_valkey(data)
    try:
        settings = Settings(
            nats_url=nats_srv.url,
            valkey_url=valkey_srv.url,
            subject_prefix="vm",
            key_prefix="bt",
            preload=False,
        )
        service_nc = await nats.connect(nats_srv.url)
        await serve(service_nc, "tools.weather", weather)

        async def raw_responder(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(
                orjson.dumps({"result": await weather(**orjson.loads(msg.data)["arguments"])})
            )

        await service_nc.subscribe("tools.raw", cb=raw_responder)
        await service_nc.flush()

        agent = orjson.loads((ROOT / "examples" / "weather-agent.json").read_bytes())
        config = parse_agent_config(agent)
        tools = config.tools
        llm = LLMService(settings.model_copy(update={"instance_id": "bench-llm"}))
        await llm.start()
        sid = (await llm.store.create_session(config)).session_id
        runner = ToolRunner(llm.bus.nc, settings)
        nc = llm.bus.nc
        call = ToolCall(id="call_0_0", name="get_weather", arguments='{"city": "Paris"}')
        body = orjson.dumps(
            {
                "name": "get_weather",
                "arguments": {"city": "Paris"},
                "call_id": "call_0_0",
                "idempotency_key": f"{sid}:1:call_0_0",
                "session_id": sid,
                "epoch": 1,
            }
        )
        out: dict[str, list[float]] = {"raw": [], "runner": [], "stage": []}
        for i in range(calls + 50):
            t0 = time.perf_counter()
            await nc.request("tools.raw", body, timeout=5)
            t1 = time.perf_counter()
            outcome = await runner.run(tools, call, session=sid, epoch=1)
            t2 = time.perf_counter()
            await llm._call(sid, 1, tools, call)
            t3 = time.perf_counter()
            assert outcome.status == "ok", outcome
            if i >= 50:  # warm-up
                out["raw"].append((t1 - t0) * 1000)
                out["runner"].append((t2 - t1) * 1000)
                out["stage"].append((t3 - t2) * 1000)
        await runner.aclose()
        await llm.stop()
        await service_nc.close()
        return {
            k: {"p50": statistics.median(v), "p99": pct(v, 0.99), "n": len(v)}
            for k, v in out.items()
        }
    finally:
        nats_srv.stop()
        valkey_srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 calls")
    args = parser.parse_args()
    result = asyncio.run(run(200 if args.quick else args.calls))
    raw = result["raw"]
    for name, r in result.items():
        print(
            f"{name:7s} p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  "
            f"(p50 +{r['p50'] - raw['p50']:.3f} ms, p99 +{r['p99'] - raw['p99']:.3f} ms "
            f"over raw; n={r['n']:.0f})"
        )


if __name__ == "__main__":
    main()
