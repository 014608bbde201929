"""The shipped set of voices we did not tune on (voicemesh/bench/voices): the manifest matches
the files, and the harness can play them instead of the bot's own voice."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from voicemesh.bench import voices
from voicemesh.bench.harness import Plan, caller_turns
from voicemesh.cli import build_parser


def test_manifest_matches_the_wavs() -> None:
    shipped = voices.load()
    files = {p.name for p in voices.DIR.glob("*.wav")}
    listed = [item.file for item in shipped.items]
    assert len(listed) == len(set(listed))
    assert set(listed) == files  # no WAV without a line, no line without a WAV
    total = 0
    for item in shipped.items:
        info = sf.info(str(item.path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), item.file
        assert 0.3 < info.duration < 6, item.file
        assert item.text.strip(), item.file
        total += item.path.stat().st_size
    assert total < 3.2e6  # small enough to live in the repository


def test_both_classes_many_voices_none_of_them_the_bots() -> None:
    items = voices.load().items
    assert {i.label for i in items} == {"finished", "unfinished"}
    synth = {i.voice for i in items if not i.human}
    assert len(synth) > 1
    for label in ("finished", "unfinished"):
        assert len({i.voice for i in items if i.label == label}) > 1
    assert not any("piper" in i.synthesizer.lower() or "joe" in i.voice for i in items)
    assert {i.synthesizer for i in items} >= {"espeak-ng", "flite", "festival"}
    assert any(i.human for i in items)
    assert any(i.noise_dbfs is not None for i in items)


def test_turns_go_round_the_voices() -> None:
    picked = voices.turns(12)
    assert all(i.label == "finished" for i in picked)
    assert len({i.voice for i in picked[:10]}) == 10  # a short run already hears ten voices
    assert len(voices.turns(100)) == 100


def test_the_harness_caller_speaks_the_shipped_voices_by_default(tmp_path: Path) -> None:
    """`voicemesh bench` measured voice to voice with the bot's own Piper voice only; now its
    caller speaks voices the bot was not tuned on unless told otherwise."""
    args = build_parser().parse_args(["bench", "--quick"])
    assert args.voices == "shipped"
    assert build_parser().parse_args(["bench", "--voices", "joe"]).voices == "joe"
    assert Plan([1], 1.0, [1], 1.0, 1, 1, set()).voices == "shipped"
    spoken = caller_turns("shipped", 4, tmp_path)
    assert len(spoken) == 4
    assert len({voice for _, voice, _ in spoken}) == 4
    for wav, voice, text in spoken:
        assert wav.is_file() and wav.parent == voices.DIR
        assert "joe" not in voice and text
    assert not list(tmp_path.iterdir())  # nothing synthesized
    with pytest.raises(ValueError, match="unknown voice set"):
        caller_turns("nobody", 1, tmp_path)
