"""The floor of each phase of a turn on this machine: every engine alone, on idle cores.

Voice to voice is a chain of phases; each has a cost that no pipeline can go under on the same
hardware and engines. This measures each one by itself, in one process, with nothing else
running, on the inputs of the latency benchmarks (the shipped voices the bot was not tuned on):

- smart-turn v3: one decision on a turn's audio (what end of turn must wait for after the pause);
- whisper tiny.en: one transcription of each finished utterance, whole (what STT costs once the
  audio is in: with speculative STT it runs during the pause, not after it);
- SmolLM2: first token, and the first reply unit (the first clause or 5 words: what TTS waits
  for), on the questions those utterances ask, the default agent's system prompt;
- Piper: first audio of each reply's first unit, leading silence trimmed as the TTS stage does.

The sum of the medians, plus the pause end of turn needs before smart-turn is asked (the agent's
`end_of_turn_silence_ms`) and the media path (both jitter buffers, 20 ms pacing, Opus frames), is
what voice to voice cannot go under here with these engines run one after another; speculation
overlaps whisper (and the reply) with the pause.

    .venv/bin/python benchmarks/bench_floors.py [--out benchmarks/results/floors.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from voicemesh.bench.harness import machine  # noqa: E402
from voicemesh.config.models import parse_agent_config  # noqa: E402
from voicemesh.connectors.audio import quiet_lead  # noqa: E402
from voicemesh.connectors.base import LLMConnector, STTConnector, TTSConnector  # noqa: E402
from voicemesh.connectors.registry import ConnectorPool  # noqa: E402
from voicemesh.pipeline.text import SentenceSplitter  # noqa: E402
from voicemesh.transport.call.turns import turn_complete_probability  # noqa: E402

VOICES = ROOT / "voicemesh" / "bench" / "voices"


def log(msg: str) -> None:
    print(f"bench_floors: {msg}", file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50": round(statistics.median(values), 1),
        "p95": round(values[min(len(values) - 1, int(0.95 * len(values)))], 1),
        "min": round(values[0], 1),
        "n": len(values),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    manifest = json.loads((VOICES / "manifest.json").read_text())
    items = manifest["items"] if isinstance(manifest, dict) else manifest
    finished = [i for i in items if i["label"] == "finished" and not i["human"]]
    config = parse_agent_config(args.agent.read_bytes())
    pool = ConnectorPool()
    out: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(), "phases": {}}
    try:
        whisper = await pool.get("stt", "whisper", config.options("stt", "whisper"))
        smollm2 = await pool.get("llm", "smollm2", config.options("llm", "smollm2"))
        piper = await pool.get("tts", "piper", config.options("tts", "piper"))
        assert isinstance(whisper, STTConnector) and isinstance(smollm2, LLMConnector)
        assert isinstance(piper, TTSConnector)
        audio = []
        for item in finished:
            data, rate = sf.read(str(VOICES / item["file"]), dtype="int16")
            assert rate == 16000, item["file"]
            audio.append(data.tobytes())

        log("smart-turn on each utterance...")
        turn_complete_probability(audio[0])  # the first call loads the model
        smart = []
        for pcm in audio * args.reps:
            t = time.perf_counter()
            await asyncio.to_thread(turn_complete_probability, pcm)
            smart.append((time.perf_counter() - t) * 1000)
        out["phases"]["smart_turn_ms"] = stats(smart)

        log("whisper on each utterance, whole...")
        await whisper.transcribe(audio[0], 16000)  # warm
        stt, texts = [], []
        for pcm in audio * args.reps:
            t = time.perf_counter()
            texts.append(await whisper.transcribe(pcm, 16000))
            stt.append((time.perf_counter() - t) * 1000)
        out["phases"]["whisper_ms"] = stats(stt)
        out["utterance_s"] = stats([len(p) / 2 / 16000 * 1000 for p in audio])

        log("SmolLM2 first token and first unit on each question...")
        system = [{"role": "system", "content": config.system_prompt}]
        ttft, unit, replies = [], [], []
        for text in texts[: len(audio)] * args.reps:
            splitter = SentenceSplitter(first_words=5, early_first=True)
            t, first, got = time.perf_counter(), None, None
            pieces = []
            async for piece in smollm2.stream([*system, {"role": "user", "content": text}]):
                first = first or (time.perf_counter() - t) * 1000
                pieces.append(piece)
                done = splitter.push(piece)
                if done and got is None:
                    got = ((time.perf_counter() - t) * 1000, done[0])
                    break
            if got is None:
                rest = splitter.flush()
                got = ((time.perf_counter() - t) * 1000, rest[0] if rest else "".join(pieces))
            ttft.append(first or got[0])
            unit.append(got[0])
            replies.append(got[1])
        out["phases"]["llm_ttft_ms"] = stats(ttft)
        out["phases"]["llm_first_unit_ms"] = stats(unit)

        log("Piper first audio of each first unit...")
        first_audio = []
        async for _ in piper.synthesize("Hello."):  # warm
            pass
        for text in replies:
            t = time.perf_counter()
            async for pcm in piper.synthesize(text):
                if len(pcm) > quiet_lead(pcm, piper.sample_rate):
                    first_audio.append((time.perf_counter() - t) * 1000)
                    break
        out["phases"]["piper_first_audio_ms"] = stats(first_audio)
    finally:
        await pool.aclose()
    out["load_after"] = os.getloadavg()
    return out


def markdown(report: dict[str, Any], pause_ms: int, mark_ms: int) -> str:
    m, p = report["machine"], report["phases"]
    rows = [
        ("pause before smart-turn is asked", None, f"{pause_ms} ms (end_of_turn_silence_ms)"),
        ("pause before STT speculates", None, f"{mark_ms} ms (pause_mark_ms)"),
        ("smart-turn v3, one decision", p["smart_turn_ms"], ""),
        ("whisper tiny.en, the whole utterance", p["whisper_ms"], ""),
        ("SmolLM2 first token", p["llm_ttft_ms"], ""),
        ("SmolLM2 first unit (first clause or 5 words)", p["llm_first_unit_ms"], ""),
        ("Piper first audio of that unit", p["piper_first_audio_ms"], ""),
    ]
    lines = [
        "# The floor of each phase, every engine alone on idle cores",
        "",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['date']}",
        f"- Load average before / after: {', '.join(f'{x:.1f}' for x in report['load_before'])} /"
        f" {', '.join(f'{x:.1f}' for x in report['load_after'])}",
        f"- Inputs: the {report['utterance_s']['n']} finished synthesized utterances of the shipped"
        f" voice set (median {report['utterance_s']['p50']:.0f} ms of audio); the questions"
        " whisper heard in them; the first units SmolLM2 answered",
        "",
        "| phase | p50 | p95 | min | n |",
        "|---|---|---|---|---|",
    ]
    for name, s, note in rows:
        if s is None:
            lines.append(f"| {name} | {note} | | | |")
        else:
            lines.append(
                f"| {name} | {s['p50']:.0f} ms | {s['p95']:.0f} ms | {s['min']:.0f} ms | {s['n']} |"
            )
    serial = pause_ms + sum(
        p[k]["p50"]
        for k in ("smart_turn_ms", "whisper_ms", "llm_first_unit_ms", "piper_first_audio_ms")
    )
    overlapped = max(mark_ms + p["whisper_ms"]["p50"], pause_ms + p["smart_turn_ms"]["p50"]) + sum(
        p[k]["p50"] for k in ("llm_first_unit_ms", "piper_first_audio_ms")
    )
    lines += [
        "",
        f"Engines one after another (pause, smart-turn, whisper, first unit, first audio): "
        f"**{serial:.0f} ms** p50 before the media path. As the default agent runs them, "
        f"whisper from the {mark_ms} ms mark beside smart-turn (speculative STT) and the reply "
        f"on its transcript at once (speculative reply): **{overlapped:.0f} ms**. The media "
        "path adds both jitter buffers (20 ms each here), up to 20 ms of pacing and Opus "
        "framing, and the network; the VAD hears the end of speech a window or two late.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1, help="passes over the utterances")
    parser.add_argument("--agent", type=Path, default=ROOT / "config" / "agent-config.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "floors.md")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    options = parse_agent_config(args.agent.read_bytes()).transport_options("webrtc")
    pause = int(getattr(options, "end_of_turn_silence_ms", 200))
    mark = int(getattr(options, "pause_mark_ms", None) or pause)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report, pause, mark)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
