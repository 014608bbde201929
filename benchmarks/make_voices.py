"""Makes the shipped test set of voices the bot was never tuned on (voicemesh/bench/voices/).

    apt-get install -y espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts
    .venv/bin/python benchmarks/make_voices.py

Run once; the WAVs and manifest.json are committed, so neither tests nor benchmarks need these
synthesizers. Every voice here is another engine than the bot's Piper "joe" (a VITS model):
espeak-ng (formant synthesis, five accents/variants at different speeds and pitches), flite
(CMU clustergen voices), festival (a diphone voice and an HTS voice), and a real human voice:
the spoken channel names that alsa-utils ships in /usr/share/sounds/alsa (the only human speech
found on this machine; the venv and pip's offline packages carry none).

Unfinished utterances are cut mid-clause. They are synthesized with a trailing comma, which
makes every engine here use a continuation contour rather than a final fall, as a person cut
off mid-sentence would; the manifest keeps the text without it. Each WAV is 16 kHz mono PCM16,
silence trimmed to 150 ms before and 300 ms after the speech; every third one carries a light
seeded noise floor (its level is in the manifest, so a benchmark pads the pause with the same).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

RATE = 16000
OUT = Path(__file__).resolve().parent.parent / "voicemesh" / "bench" / "voices"
LEAD_S, TRAIL_S = 0.15, 0.30
NOISE_DBFS = -50.0  # RMS of the light noise floor (speech is normalized to -20 dBFS RMS)
TARGET_RMS_DBFS = -20.0

FINISHED = [
    "What is the capital of France?",
    "Tell me a fun fact about cats.",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "Book a table for two at seven.",
    "I need to change my flight to Tuesday.",
    "Thanks, that is all I needed.",
    "Can you recommend a good book?",
    "Turn off the lights in the kitchen.",
]
UNFINISHED = [
    "I want to book a table for",
    "What is the capital of",
    "So I was thinking that maybe we could",
    "I would like to order a",
    "Can you tell me about the",
    "My phone number is five five five, two one",
    "I need a flight to Boston and",
    "Well, um",
    "How far is it from here to",
    "Remind me to call my mother because",
]

# (id, synthesizer, how to call it)
VOICES: list[tuple[str, str, list[str]]] = [
    ("espeak-en-us", "espeak-ng", ["-v", "en-us", "-s", "165"]),
    ("espeak-en-gb-f3", "espeak-ng", ["-v", "en-gb+f3", "-s", "150", "-p", "62"]),
    ("espeak-scotland-m7", "espeak-ng", ["-v", "en-gb-scotland+m7", "-s", "180", "-p", "38"]),
    ("espeak-en-029-f4", "espeak-ng", ["-v", "en-029+f4", "-s", "140", "-p", "55"]),
    ("espeak-rp-m3-fast", "espeak-ng", ["-v", "en-gb-x-rp+m3", "-s", "200", "-p", "45"]),
    ("flite-slt", "flite", ["slt"]),
    ("flite-rms", "flite", ["rms"]),
    ("flite-awb", "flite", ["awb"]),
    ("festival-kal", "festival", ["voice_kal_diphone"]),
    ("festival-slt-hts", "festival", ["voice_cmu_us_slt_arctic_hts"]),
]
PER_VOICE = 2  # finished and unfinished each, rotated over the texts so each text gets 2 voices

# Human speech shipped by alsa-utils; each is a short finished phrase.
HUMAN = [
    ("Front_Center.wav", "Front center."),
    ("Front_Left.wav", "Front left."),
    ("Rear_Right.wav", "Rear right."),
]
ALSA = Path("/usr/share/sounds/alsa")


def synthesize(synth: str, args: list[str], text: str, wav: Path) -> None:
    if synth == "espeak-ng":
        cmd = ["espeak-ng", *args, "-w", str(wav), text]
    elif synth == "flite":
        cmd = ["flite", "-voice", args[0], "-t", text, "-o", str(wav)]
    else:
        txt = wav.with_suffix(".txt")
        txt.write_text(text + "\n")
        cmd = ["text2wave", "-o", str(wav), "-eval", f"({args[0]})", str(txt)]
    subprocess.run(cmd, check=True, capture_output=True)


def to_16k(wav: Path) -> np.ndarray:
    audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    return soxr.resample(mono, rate, RATE) if rate != RATE else mono


def trim(x: np.ndarray) -> np.ndarray:
    """Keeps LEAD_S before the first and TRAIL_S after the last sample above -40 dBFS."""
    loud = np.nonzero(np.abs(x) > 0.01)[0]
    if loud.size == 0:
        raise RuntimeError("no speech in the synthesized audio")
    speech = x[loud[0] : loud[-1] + 1]
    return np.concatenate(
        (
            np.zeros(int(LEAD_S * RATE), np.float32),
            speech,
            np.zeros(int(TRAIL_S * RATE), np.float32),
        )
    )


def finish(x: np.ndarray, noise_dbfs: float | None, seed: int) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x[np.abs(x) > 0.01] ** 2)))
    x = x * (10 ** (TARGET_RMS_DBFS / 20) / max(rms, 1e-6))
    if noise_dbfs is not None:
        x = x + np.random.default_rng(seed).normal(0, 10 ** (noise_dbfs / 20), x.size)
    return np.clip(x * 32768, -32768, 32767).astype(np.int16)


def main() -> int:
    for tool in ("espeak-ng", "flite", "text2wave"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: see this script's docstring for the apt line", file=sys.stderr)
            return 1
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.wav"):
        old.unlink()
    items: list[dict[str, object]] = []
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for v, (voice, synth, args) in enumerate(VOICES):
            for k in range(PER_VOICE):
                for label, texts in (("finished", FINISHED), ("unfinished", UNFINISHED)):
                    text = texts[(v * PER_VOICE + k) % len(texts)]
                    spoken = text if label == "finished" else text + ","
                    raw = Path(tmp) / f"{voice}-{label}-{k}.wav"
                    synthesize(synth, args, spoken, raw)
                    noise = NOISE_DBFS if n % 3 == 2 else None
                    pcm = finish(trim(to_16k(raw)), noise, seed=n)
                    name = f"{voice}-{label[0]}{k}.wav"
                    sf.write(str(OUT / name), pcm, RATE, subtype="PCM_16")
                    items.append(
                        {
                            "file": name,
                            "text": text,
                            "label": label,
                            "voice": voice,
                            "synthesizer": synth,
                            "settings": " ".join(args),
                            "human": False,
                            "noise_dbfs": noise,
                        }
                    )
                    n += 1
        for src, text in HUMAN:
            if not (ALSA / src).exists():
                print(f"skipping {src}: alsa-utils is not installed", file=sys.stderr)
                continue
            pcm = finish(trim(to_16k(ALSA / src)), None, seed=0)
            name = "human-alsa-" + src.lower().replace("_", "-")
            sf.write(str(OUT / name), pcm, RATE, subtype="PCM_16")
            items.append(
                {
                    "file": name,
                    "text": text,
                    "label": "finished",
                    "voice": "human-alsa",
                    "synthesizer": "human recording (alsa-utils /usr/share/sounds/alsa)",
                    "settings": "",
                    "human": True,
                    "noise_dbfs": None,
                }
            )
    manifest = {
        "rate": RATE,
        "lead_ms": int(LEAD_S * 1000),
        "trail_ms": int(TRAIL_S * 1000),
        "made_by": "benchmarks/make_voices.py",
        "items": items,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in OUT.glob("*.wav"))
    print(f"wrote {len(items)} WAVs, {size / 1e6:.2f} MB, to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
