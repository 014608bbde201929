"""The pipecat side of benchmarks/bench_vs_pipecat.py, one turn: the pipecat 1.14 bot on the
offline engines (benchmarks/pipecat_bot.py) must answer the shared WebRTC caller audibly and
report its phases, so the comparison cannot rot unnoticed when pipecat or an engine changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_vs_pipecat import pipecat_bot, wait_ready
from tests.conftest import AGENT_FILE
from voicemesh.bench.harness import _speak
from voicemesh.callers.webrtc import AUDIBLE_DBFS, call_over_webrtc
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS
from voicemesh.transport.call.turns import dbfs

pytestmark = pytest.mark.slow


async def test_pipecat_bot_answers_one_turn_audibly(tmp_path: Path) -> None:
    (wav,) = await asyncio.to_thread(_speak, ["What is the capital of France?"], tmp_path)
    with pipecat_bot(AGENT_FILE, "matched", tmp_path / "bot.log") as (url, proc):
        await wait_ready(url, proc, limit_s=90)
        result = await call_over_webrtc(url, [wav], None, turn_timeout=30)

    (turn,) = result.turns
    assert "france" in turn.user_text.lower(), turn.user_text
    assert turn.bot_text, "no reply text"
    # timed on sound: the caller heard the bot, not just an event about it
    assert turn.latency_ms is not None and 0 < turn.latency_ms < 15_000
    pcm = bytes(turn.bot_audio)
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
    audible_s = sum(dbfs(f) > AUDIBLE_DBFS for f in frames) * FRAME_MS / 1000
    assert audible_s > 0.5, f"only {audible_s:.2f} s of audible bot audio"
    assert np.frombuffer(pcm, np.int16).std() > 100
    # pipecat's own figures reach the report: its observers and service metrics still fire
    for key in ("eou_ms", "llm_ttft_ms", "tts_ttfb_ms", "v2v_ms"):
        assert turn.phases.get(key) is not None, (key, turn.phases)
