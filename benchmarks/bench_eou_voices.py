"""End of turn on voices we did not tune on: smart-turn alone vs smart-turn + the transcript.

    .venv/bin/python benchmarks/bench_eou_voices.py

Offline, no stack. Each WAV of the shipped set (voicemesh/bench/voices: espeak-ng, flite,
festival and human voices, finished or cut mid-clause) gets 2.5 s of its own noise floor after
it and goes through the transport's `TurnDetector` frame by frame with the default agent's
settings (Silero 0.7/0.35, smart_turn asked after 200 ms of silence, 2 s cap). At every pause
where the detector asks smart-turn, we record its probability and, as the speculative STT stage
would, transcribe the turn's audio so far with whisper tiny.en (the STT connector's engine), judge
the text (voicemesh/transport/call/endpoint.py) and combine the two.

Per WAV, for each detector, from the last voiced frame before the turn ends:
- end: when the turn ends. smart-turn alone ends when its answer lands (its inference cost,
  rounded up to 20 ms frames) if it says > 0.5, else at the 2 s cap. Combined ends when both
  answers are in (the slower of smart-turn and whisper, run side by side as in the live call),
  or after the combiner's hold or cap.
- transcript ready: when the reply could start. Alone, STT runs after the end; combined, the
  speculative transcript is already there.
Accuracy counts a finished utterance as right when its turn ends before the cap, and a cut one
when it waits for the cap; a false end is a cut utterance (or a pause inside one) ended early.
The engines' costs are their CPU time spread over their threads (smart-turn 1, whisper 2): what
each takes alone on the machine, which a shared 2-core machine's wall clock does not show. The
wall times of the run are reported beside them.
Writes benchmarks/results/eou-voices.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from voicemesh.bench import voices
from voicemesh.config.connectors import TurnOptions, WhisperOptions
from voicemesh.connectors.stt.whisper import WhisperSTT, pcm16_to_float
from voicemesh.connectors.threads import clamp_threads
from voicemesh.transport.call import turns as vad
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS, RATE
from voicemesh.transport.call.endpoint import (
    EndpointPolicy,
    TextJudgement,
    combine,
    judge_text,
)
from voicemesh.transport.call.turns import TurnDetector

OUT = Path(__file__).resolve().parent / "results" / "eou-voices.md"
PAD_S = 2.5
QUIET_FLOOR = 16.0  # int16 σ of the floor under clean WAVs (~-66 dBFS), as bench_eou.py


@dataclass
class Ask:
    frame: int  # the frame on which the detector asked smart-turn (10th silent frame)
    pcm: bytes
    p: float = 0.0
    p_ms: float = 0.0  # CPU time: the cost alone on the machine
    p_wall_ms: float = 0.0  # wall time in this (shared) run
    text: str = ""
    stt_ms: float = 0.0
    stt_wall_ms: float = 0.0
    judgement: TextJudgement | None = None


@dataclass
class Row:
    item: voices.VoiceItem
    asks: list[Ask]
    speech_end: int  # last voiced frame of the WAV's speech
    alone_end_ms: float
    alone_ready_ms: float
    alone_early: bool
    alone_false: bool
    combined_end_ms: float
    combined_ready_ms: float
    combined_early: bool
    combined_false: bool
    reason: str = ""
    final_text: str = ""
    p_final: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def frames_of(item: voices.VoiceItem) -> list[bytes]:
    audio, rate = sf.read(str(item.path), dtype="int16")
    assert rate == RATE and audio.ndim == 1
    sigma = 32768 * 10 ** (item.noise_dbfs / 20) if item.noise_dbfs is not None else QUIET_FLOOR
    pad = np.random.default_rng(len(item.file)).normal(0, sigma, int(PAD_S * RATE))
    x = np.concatenate((audio.astype(np.float64), pad))
    x = np.pad(x, (0, -x.size % (FRAME_BYTES // 2)))
    pcm = np.clip(x, -32768, 32767).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


async def pauses(options: TurnOptions, frames: list[bytes]) -> tuple[list[Ask], list[bool], int]:
    """Every pause the detector asks smart-turn about, with the audio it would send, when the
    model never says finished (so the turn runs to the cap through every pause)."""
    asks: list[Ask] = []

    def never(pcm: bytes) -> float:
        asks.append(Ask(frame=-1, pcm=pcm))
        return 0.0

    real = vad.turn_complete_probability
    vad.turn_complete_probability = never
    try:
        det = TurnDetector(options)
        voiced: list[bool] = []
        end = -1
        for i, frame in enumerate(frames):
            n = len(asks)
            events = await det.push(frame)
            voiced.append(det.last_voiced)
            await det.settle()
            if len(asks) > n:
                asks[-1].frame = i
            if any(ev.kind == "end" for ev in events):
                end = i
                break
    finally:
        vad.turn_complete_probability = real
    if end < 0:
        raise RuntimeError("the turn never ended")
    return asks, voiced, end


async def smart_turn_alone(options: TurnOptions, frames: list[bytes]) -> tuple[int, float | None]:
    """The real detector, for a check that the replay below reproduces it frame for frame."""
    det = TurnDetector(options)
    for i, frame in enumerate(frames):
        events = await det.push(frame)
        if any(ev.kind == "end" for ev in events):
            return i, det.last_decision
        await det.settle()
    raise RuntimeError("the turn never ended")


def frames_for(ms: float) -> int:
    return max(1, math.ceil(ms / FRAME_MS))


def evaluate(
    item: voices.VoiceItem,
    asks: list[Ask],
    voiced: list[bool],
    cap_end: int,
    policy: EndpointPolicy,
    stt_full_ms: float,
) -> Row:
    end_frames = TurnOptions(turn="smart_turn").end_of_turn_silence_ms // FRAME_MS
    cap_frames = policy.max_silence_ms // FRAME_MS
    speech_end = max(i for i, v in enumerate(voiced) if v)

    def resumes(after: int, until: int) -> bool:
        return any(voiced[after + 1 : until + 1])

    # smart-turn alone: the first pause it calls finished, when its answer lands.
    alone = None
    for a in asks:
        if a.p > policy.threshold:
            land = a.frame + frames_for(a.p_ms)
            if not resumes(a.frame, land):
                alone = (a, land)
                break
    if alone is not None:
        a, land = alone
        last = a.frame - end_frames
        alone_end = (land - last) * FRAME_MS
        alone_early, alone_false = True, item.label == "unfinished" or last < speech_end
    else:
        last = cap_end - cap_frames
        alone_end, alone_early, alone_false = cap_frames * FRAME_MS, False, False
    alone_ready = alone_end + stt_full_ms

    # combined: both answers must be in before the combiner can end the turn.
    combined = None
    for a in asks:
        silence_at_answer = end_frames * FRAME_MS + max(a.p_ms, a.stt_ms)
        d = combine(a.p, a.judgement, policy, silence_ms=round(silence_at_answer))
        last = a.frame - end_frames
        end_ms = max(d.end_after_ms, silence_at_answer)
        end = last + frames_for(end_ms)
        if end - last >= cap_frames:
            end = last + cap_frames  # the cap ends the turn whatever is still running
        if not resumes(a.frame, end):
            combined = (a, end, d.reason)
            break
    if combined is None:  # every pause was followed by speech before its deadline
        raise RuntimeError(f"{item.file}: no pause ended the turn")
    a, end, reason = combined
    last = a.frame - end_frames
    combined_end = (end - last) * FRAME_MS
    combined_early = end - last < cap_frames
    combined_false = combined_early and (item.label == "unfinished" or last < speech_end)
    # the transcript is ready when the turn ends (whisper ran beside smart-turn); a cap that
    # fired before whisper finished still waits for it
    combined_ready = max(combined_end, end_frames * FRAME_MS + a.stt_ms)
    return Row(
        item,
        asks,
        speech_end,
        alone_end,
        alone_ready,
        alone_early,
        alone_false,
        combined_end,
        combined_ready,
        combined_early,
        combined_false,
        reason=reason,
        final_text=a.text,
        p_final=a.p,
    )


def right(row: Row, combined: bool) -> bool:
    early = row.combined_early if combined else row.alone_early
    false = row.combined_false if combined else row.alone_false
    return (early and not false) if row.item.label == "finished" else not early


async def main(policy: EndpointPolicy, limit: int | None) -> str:
    options = TurnOptions(vad="silero", turn="smart_turn", preroll_ms=300)
    vad.preload(options)
    stt = WhisperSTT(WhisperOptions())
    stt._run(np.zeros(RATE, np.float32))  # load and warm the model

    threads = clamp_threads(WhisperOptions().cpu_threads)

    def transcribe(pcm: bytes) -> tuple[str, float, float]:
        """The text, its CPU time spread over whisper's threads (what it would take alone on
        the machine), and its wall time here."""
        t0, c0 = time.perf_counter(), time.process_time()
        text = stt._run(pcm16_to_float(pcm, RATE))
        cpu = (time.process_time() - c0) * 1000 / threads
        return text, cpu, (time.perf_counter() - t0) * 1000

    rows: list[Row] = []
    items = list(voices.load().items)[:limit]
    for n, item in enumerate(items, 1):
        frames = frames_of(item)
        asks, voiced, cap_end = await pauses(options, frames)
        for a in asks:
            t0, c0 = time.perf_counter(), time.thread_time()
            a.p = vad.turn_complete_probability(a.pcm)  # one thread: its CPU time is its cost
            a.p_ms = (time.thread_time() - c0) * 1000
            a.p_wall_ms = (time.perf_counter() - t0) * 1000
            a.text, a.stt_ms, a.stt_wall_ms = transcribe(a.pcm)
            a.judgement = judge_text(a.text)
        # alone, STT starts at the end on the whole turn: the last pause's audio plus the
        # silence after it, about the same length as the last ask's
        stt_full_ms = asks[-1].stt_ms
        row = evaluate(item, asks, voiced, cap_end, policy, stt_full_ms)
        voiced = voiced + [False] * 2
        real_end, real_p = await smart_turn_alone(options, frames)
        # settle lets each answer land on the next frame, which acts on it if it is silent
        replay = next((a for a in asks if a.p > policy.threshold and not voiced[a.frame + 1]), None)
        if replay is not None:
            assert real_p is not None and real_end == replay.frame + 1, (item.file, real_end)
        else:
            assert real_end == cap_end, (item.file, real_end, cap_end)
        rows.append(row)
        print(
            f"[{n}/{len(items)}] {item.file}: p={row.p_final:.2f} "
            f"{row.alone_end_ms:.0f}→{row.combined_end_ms:.0f} ms {row.final_text!r} "
            f"({row.reason})",
            flush=True,
        )
    return report(rows, policy)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def report(rows: list[Row], policy: EndpointPolicy) -> str:
    import onnxruntime

    by_voice: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_voice[r.item.voice].append(r)

    def summary(name: str, rs: list[Row]) -> str:
        cells = [name, str(len(rs))]
        for combined in (False, True):
            acc = sum(right(r, combined) for r in rs) / len(rs)
            false = sum((r.combined_false if combined else r.alone_false) for r in rs)
            cells += [f"{acc:.0%}", str(false)]
        fin = [r for r in rs if r.item.label == "finished"]
        for combined in (False, True):
            ends = [r.combined_end_ms if combined else r.alone_end_ms for r in fin]
            cells.append(f"{statistics.median(ends):.0f}" if ends else "–")
        for combined in (False, True):
            ready = [r.combined_ready_ms if combined else r.alone_ready_ms for r in fin]
            cells.append(f"{statistics.median(ready):.0f}" if ready else "–")
        return "| " + " | ".join(cells) + " |"

    fin = [r for r in rows if r.item.label == "finished"]
    unf = [r for r in rows if r.item.label == "unfinished"]
    p_fin = [r.asks[-1].p for r in fin]
    p_unf = [r.asks[-1].p for r in unf]
    lines = [
        "# End of turn on voices we did not tune on",
        "",
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"{os.cpu_count()} cores shared with other work. Default agent's turn settings: "
        f"Silero 0.7/0.35, smart_turn asked after 200 ms, {policy.max_silence_ms} ms cap. "
        "Combiner: finished text ends the "
        f"turn when smart-turn ≥ {policy.finished_threshold}, else after "
        f"{policy.finished_hold_ms} ms; unfinished text waits for the cap; no words: smart-turn "
        f"alone (> {policy.threshold}). {len(rows)} WAVs ({len(fin)} finished, {len(unf)} cut "
        "mid-clause), voicemesh/bench/voices; made by benchmarks/bench_eou_voices.py.",
        "",
        "Times are ms from the last voiced frame; end p50 and ready p50 over finished "
        "utterances (ready = transcript in hand, when the LLM can start).",
        "",
        "| voice | WAVs | accuracy alone | false ends alone | accuracy combined "
        "| false ends combined | end p50 alone | end p50 combined | ready p50 alone "
        "| ready p50 combined |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(summary(v, rs) for v, rs in by_voice.items()),
        summary("**all**", rows),
        "",
        "smart-turn's probability at the last pause: finished p50 "
        f"{statistics.median(p_fin):.2f} (min {min(p_fin):.2f}, max {max(p_fin):.2f}), "
        f"{sum(p > policy.threshold for p in p_fin)}/{len(p_fin)} over {policy.threshold}; "
        f"cut p50 {statistics.median(p_unf):.2f} (max {max(p_unf):.2f}), "
        f"{sum(p > policy.threshold for p in p_unf)}/{len(p_unf)} over {policy.threshold}.",
        "",
        "Costs per pause, as used for the times above (CPU time over the engine's threads: "
        "what each takes alone on the machine; the wall time of this shared run in brackets): "
        f"smart-turn p50 {statistics.median(a.p_ms for r in rows for a in r.asks):.0f} ms "
        f"[{statistics.median(a.p_wall_ms for r in rows for a in r.asks):.0f}], "
        f"whisper tiny.en p50 {statistics.median(a.stt_ms for r in rows for a in r.asks):.0f} ms "
        f"[{statistics.median(a.stt_wall_ms for r in rows for a in r.asks):.0f}], p95 "
        f"{pct([a.stt_ms for r in rows for a in r.asks], 95):.0f} ms "
        f"[{pct([a.stt_wall_ms for r in rows for a in r.asks], 95):.0f}]. Load average at the "
        f"end: {os.getloadavg()[0]:.1f}.",
        "",
        "## Per WAV",
        "",
        "| file | label | pauses | P(smart-turn) | transcript | text verdict "
        "| end alone | end combined | why |",
        "|---|---|---:|---:|---|---|---:|---:|---|",
    ]
    for r in rows:
        j = r.asks[-1].judgement if r.asks else None
        mark_a = "" if right(r, False) else " ✗"
        mark_c = "" if right(r, True) else " ✗"
        lines.append(
            f"| {r.item.file} | {r.item.label} | {len(r.asks)} | {r.p_final:.2f} "
            f"| {r.final_text} | {j.verdict if j else '–'} | {r.alone_end_ms:.0f}{mark_a} "
            f"| {r.combined_end_ms:.0f}{mark_c} | {r.reason} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, help="only the first N WAVs (a smoke run)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    text = asyncio.run(main(EndpointPolicy(), args.limit))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
