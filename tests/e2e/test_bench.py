"""`voicemesh bench --quick` end to end: its own servers, every role, the raw relay chain, a real
call with the offline engines, and a report with figures in every section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow


def test_bench_quick_writes_a_full_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "voicemesh",
            "bench",
            "--quick",
            "--sessions",
            "1,10",
            "--capacity-steps",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = orjson.loads((out / "report.json").read_bytes())
    rows = {(r["mode"], r["sessions"]): r for r in report["bus_overhead"]}
    assert set(rows) == {(m, n) for m in ("raw-nats", "voicemesh") for n in (1, 10)}
    for row in rows.values():
        assert row["frames_sent"] == row["sessions"] * 50 * 4  # 3 s measured + 1 s warm-up
        assert row["frames_lost"] == 0, row
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert report["capacity"]["steps"][0]["sessions"] == 10
    switch = report["config_switch"]
    assert switch["missed"] == 0 and len(switch["samples_ms"]) == 4
    turns = report["voice_to_voice"]["turns"]
    assert len(turns) == 2
    for turn in turns:
        assert turn["user_text"] and turn["bot_text"]
        assert turn["v2v_ms"] and turn["stt_ms"] and turn["llm_ttft_ms"] and turn["tts_ttfb_ms"]
        assert turn["v2v_ms"] > turn["eou_ms"]
    goals = {g["goal"]: g for g in report["goals"]}
    assert "config switch applied (p95)" in goals
    markdown = (out / "report.md").read_text()
    assert "## Bus overhead" in markdown and "## Voice to voice" in markdown
    for png in ("latency-cdf.png", "waterfall.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Bus overhead" in run.stdout  # the report is printed too
