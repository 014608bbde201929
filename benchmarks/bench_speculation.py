"""What speculative STT saves per turn: END to final transcript, with whisper, in-process.

    .venv/bin/python benchmarks/bench_speculation.py [--runs 5]

An STT stage with the default agent's whisper (tiny.en) runs in this process on embedded NATS
and Valkey. The packaged proof utterance ("What is the weather like today?", 1.5 s) and 200 ms
of silence go onto `vm.stt.<sid>` as the transport sends them, then the END, in three ways:

- off: no mark; the END (plain) starts the transcription, as on main;
- on, turn confirmed at once: a PAUSE mark (the moment smart-turn is asked), the END|PAUSE
  60 ms later (smart-turn's ~45 ms decision, acted on at the next 20 ms frame);
- on, turn confirmed late: the END|PAUSE 1.8 s after the mark (smart-turn called the turn
  unfinished and smart_turn_max_silence_ms ended it; or a text signal waited for the
  transcript).

It prints END to transcript (p50 over the runs), the ratio to "off" in the same run, and how
many transcriptions each turn cost. The machine may be shared: trust the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.connectors import metrics
from voicemesh.connectors.proof import utterance
from voicemesh.pipeline import STTService
from voicemesh.servers import start_nats, start_valkey
from voicemesh.state import ConfigStore
from voicemesh.transport.call.audio import FRAME_BYTES, RATE

AGENT_FILE = Path(__file__).resolve().parent.parent / "config" / "agent-config.json"
MODES = {"off": None, "on, confirmed at once": 0.06, "on, confirmed late": 1.8}


def requests() -> float:
    return metrics.REQUESTS.labels("stt", "whisper")._value.get()


async def main(runs: int) -> None:
    data = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    nats, valkey = start_nats(data), start_valkey(data)
    prefix = f"b{uuid.uuid4().hex[:8]}"
    settings = Settings(
        nats_url=nats.url, valkey_url=valkey.url, subject_prefix=prefix, key_prefix=prefix
    )
    store = ConfigStore.from_url(valkey.url, key_prefix=prefix)
    bus = await Bus.connect(nats.url, name="bench")
    subjects = Subjects(prefix)
    stt = STTService(settings.model_copy(update={"preload": False}))
    try:
        await stt.start()
        config = parse_agent_config(AGENT_FILE.read_bytes())
        sid = (await store.create_session(config)).session_id
        await bus.nc.request(subjects.assign("stt"), orjson.dumps({"session_id": sid}), 5)
        finals: asyncio.Queue[tuple[float, dict]] = asyncio.Queue()

        async def on_event(subject: str, frame: Frame) -> None:
            if frame.kind is Kind.EVENT and (event := frame.as_event).get("final"):
                await finals.put((time.perf_counter(), event))

        await bus.subscribe(subjects.data("transport", sid), on_event)
        await bus.settle()
        pcm, rate = utterance()
        assert rate == RATE
        pcm += bytes(-len(pcm) % FRAME_BYTES)
        chunks = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
        quiet = [bytes(FRAME_BYTES)] * 10  # the 200 ms pause before the mark
        epoch = 0

        async def turn(gap: float | None) -> tuple[float, float, str]:
            nonlocal epoch
            epoch += 1
            await bus.publish(
                subjects.ctl(sid), Frame.event({"type": "turn", "epoch": epoch}, epoch=epoch)
            )
            seq = 0

            async def send(payload: bytes, flags: Flag = Flag.NONE) -> None:
                nonlocal seq
                first = Flag.START if seq == 0 else Flag.NONE
                frame = Frame.audio(
                    payload, sample_rate=RATE, epoch=epoch, seq=seq, flags=flags | first
                )
                seq += 1
                await bus.publish(subjects.data("stt", sid), frame)

            for chunk in chunks + quiet:
                await send(chunk)
            before = requests()
            end = Flag.END | Flag.LAST
            if gap is not None:
                await send(b"", Flag.PAUSE)
                await bus.nc.flush()
                await asyncio.sleep(gap)
                end |= Flag.PAUSE
            t0 = time.perf_counter()
            await send(b"", end)
            at, event = await asyncio.wait_for(finals.get(), 30)
            await asyncio.sleep(0.1)  # let a discarded speculation finish before the next turn
            return (at - t0) * 1000, requests() - before, event["text"]

        await turn(None)  # warm-up: loads whisper
        took: dict[str, list[float]] = {m: [] for m in MODES}
        cost: dict[str, float] = {}
        for _ in range(runs):
            for mode, gap in MODES.items():
                ms, n, text = await turn(gap)
                took[mode].append(ms)
                cost[mode] = n
        off = statistics.median(took["off"])
        print(f"whisper tiny.en on a 1.5 s utterance, {runs} runs, text {text!r}")
        print({m: [round(x) for x in v] for m, v in took.items()})
        print("| mode | END → transcript p50 (ms) | ÷ off | transcriptions per turn |")
        print("|---|---|---|---|")
        for mode in MODES:
            p50 = statistics.median(took[mode])
            print(f"| {mode} | {p50:.1f} | {p50 / off:.2f} | {cost[mode]:.0f} |")
    finally:
        await stt.stop()
        await bus.close()
        await store.close()
        nats.stop()
        valkey.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
