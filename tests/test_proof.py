"""Engines proven on real input (voicemesh/connectors/proof.py): a crash of the child that proves
an engine becomes a message naming the engine and the cause, and a result that is not real work
(a one-token reply, silence) fails the proof."""

from __future__ import annotations

import signal
import stat
import sys
from pathlib import Path

import pytest

from voicemesh.config.connectors import ScriptedOptions, SmolLM2Options, ToneOptions
from voicemesh.connectors.llm.scripted import ScriptedLLM
from voicemesh.connectors.proof import EngineError, explain, prove, prove_isolated, utterance
from voicemesh.connectors.tts.tone import ToneTTS


def test_sigill_is_explained_with_the_cure() -> None:
    message = explain("llama.cpp", "llm", "smollm2", -signal.SIGILL, [])
    assert message == (
        "llama.cpp died with an illegal instruction (SIGILL): the installed build targets a CPU "
        "this machine does not have; run make clean && make run"
    )


def test_other_deaths_name_the_engine_and_the_cause() -> None:
    crashed = explain("Piper (onnxruntime)", "tts", "piper", -signal.SIGSEGV, [])
    assert crashed == "Piper (onnxruntime) (tts connector 'piper') crashed on real input (SIGSEGV)"
    failed = explain("llama.cpp", "llm", "smollm2", 1, ["Traceback ...", "OSError: bad GGUF", ""])
    assert failed == "llama.cpp (llm connector 'smollm2') failed on real input: OSError: bad GGUF"


def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """The child's interpreter replaced by a shell script: the real subprocess path, with a
    child that behaves as `script` says."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))


async def test_a_child_killed_by_sigill_becomes_the_engine_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real subprocess path, with an interpreter that dies the way the native build did."""
    fake_python(tmp_path, monkeypatch, "cat >/dev/null\nkill -ILL $$")
    with pytest.raises(
        EngineError, match=r"^llama.cpp died with an illegal instruction \(SIGILL\)"
    ):
        await prove_isolated("llm", "smollm2", SmolLM2Options(), "llama.cpp", timeout_s=30)


async def test_a_child_that_hangs_is_stopped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_python(tmp_path, monkeypatch, "exec sleep 30")
    with pytest.raises(EngineError, match=r"did not finish real work in 1 s"):
        await prove_isolated("llm", "smollm2", SmolLM2Options(), "llama.cpp", timeout_s=1)


async def test_a_one_token_reply_is_not_proof() -> None:
    """The SIGILL build answered a one-token prompt: a reply that short proves nothing."""
    with pytest.raises(EngineError, match=r"scripted gave 1 tokens for a real question"):
        await prove(ScriptedLLM(ScriptedOptions(replies=["Paris."])))
    ok = await prove(ScriptedLLM(ScriptedOptions(replies=["Paris is famous for its art."])))
    assert ok.startswith("scripted: 6 tokens in ")


async def test_speech_must_be_audible_and_long_enough() -> None:
    summary = await prove(ToneTTS(ToneOptions()))
    assert summary.startswith("tone: ") and " s of speech in " in summary
    with pytest.raises(EngineError, match=r"near silence"):
        await prove(ToneTTS(ToneOptions(ms_per_word=10)))


def test_the_packaged_utterance_is_real_speech() -> None:
    pcm, rate = utterance()
    assert rate == 16000 and 1.0 < len(pcm) / 2 / rate < 3.0
