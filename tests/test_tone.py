"""The `tone` TTS (voicemesh/connectors/tts/tone.py) streams its sine chunk by chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from voicemesh.config.connectors import ToneOptions
from voicemesh.connectors.tts.tone import ToneTTS


def all_at_once(text: str, opts: ToneOptions) -> list[bytes]:
    """The tone as it was computed before it streamed: the whole sentence, then sliced."""
    words = max(1, len(text.split()))
    total = opts.sample_rate * opts.ms_per_word * words // 1000
    chunk = opts.sample_rate // 10
    t = np.arange(total) / opts.sample_rate
    pcm = (np.sin(2 * np.pi * opts.frequency_hz * t) * 8000).astype(np.int16).tobytes()
    return [pcm[i : i + chunk * 2] for i in range(0, len(pcm), chunk * 2)]


@pytest.mark.parametrize(
    "opts",
    [
        ToneOptions(),
        ToneOptions(sample_rate=48000, frequency_hz=523.25, ms_per_word=333),
        ToneOptions(sample_rate=22050, frequency_hz=97.0, ms_per_word=10),
    ],
)
@pytest.mark.parametrize("text", ["Hello there, how are you today?", "", "one"])
async def test_chunks_are_bit_identical_to_the_whole_tone(opts: ToneOptions, text: str) -> None:
    got = [c async for c in ToneTTS(opts).synthesize(text)]
    assert got == all_at_once(text, opts)  # same chunks, same samples: the phase runs on


async def test_a_10k_word_sentence_starts_without_computing_all_of_it() -> None:
    """Before, 10k words made 19.2 M samples in float64 before the first chunk (GBs)."""
    opts = ToneOptions()
    text = " ".join(["word"] * 10_000)
    stream = ToneTTS(opts).synthesize(text)
    tracemalloc.start()
    try:
        first = await anext(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await stream.aclose()  # type: ignore[attr-defined]
    assert len(first) == opts.sample_rate // 10 * 2
    assert first == all_at_once("one", opts)[0]
    assert peak < 4_000_000  # the word count's split and one chunk; the whole tone is 150 MB+
