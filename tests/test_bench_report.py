"""The benchmark report renderer: Markdown figures, JSON round trip, and the PNG plots."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest

from voicemesh.bench.report import (
    bus_ratios,
    render_markdown,
    summarize,
    write_json,
    write_plots,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bus_row(mode: str, sessions: int, base_ms: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    samples = [round(base_ms * rng.lognormvariate(0, 0.35), 4) for _ in range(500)]
    stats = summarize(samples)
    return {
        "mode": mode,
        "sessions": sessions,
        "fps": 50,
        "seconds": 10.0,
        "frames_sent": 500,
        "frames_received": 500 - sessions // 10,
        "frames_lost": sessions // 10,
        "p50_ms": stats["p50"],
        "p95_ms": stats["p95"],
        "p99_ms": stats["p99"],
        "cpu_s": round(0.01 * sessions * (2 if mode == "voicemesh" else 1), 3),
        "samples_ms": samples,
    }


def bus_only_report() -> dict[str, Any]:
    rows = []
    for i, sessions in enumerate((1, 10, 50)):
        rows.append(bus_row("voicemesh", sessions, 0.6 + 0.02 * sessions, seed=i))
        rows.append(bus_row("raw-nats", sessions, 0.25 + 0.01 * sessions, seed=100 + i))
    return {
        "machine": {
            "cores": 8,
            "memory_gib": 15.6,
            "python": "3.12.3",
            "platform": "Linux-6.8-x86_64",
            "date": "2025-06-01T12:00:00Z",
        },
        "command": "voicemesh bench --sessions 1,10,50 --seconds 10",
        "bus_overhead": rows,
    }


TURNS = [
    (1, 310.0, 42.5, 180.0, 95.0, 660.0, "Hello, who are you?", "I am a voice assistant."),
    (2, 295.0, 38.0, 150.0, 90.0, 601.0, "What's the weather | today?", "I can't check that."),
    (3, 320.0, None, 210.0, 101.0, 700.0, "Tell me a joke", "Why did the frame cross the bus?"),
    (4, 305.0, 40.0, 160.0, None, None, "Thanks", ""),
]


def full_report() -> dict[str, Any]:
    report = bus_only_report()
    report["voice_to_voice"] = {
        "turns": [
            {
                "turn": turn,
                "eou_ms": eou,
                "stt_ms": stt,
                "llm_ttft_ms": llm,
                "tts_ttfb_ms": tts,
                "v2v_ms": v2v,
                "caller_ms": v2v + 45.0 if v2v is not None else None,
                "user_text": user,
                "bot_text": bot,
            }
            for turn, eou, stt, llm, tts, v2v, user, bot in TURNS
        ]
    }
    report["capacity"] = {
        "limit_ms": 5.0,
        "steps": [
            {"sessions": 10, "p99_overhead_ms": 1.2, "frames_lost": 0},
            {"sessions": 100, "p99_overhead_ms": 3.9, "frames_lost": 0},
            {"sessions": 200, "p99_overhead_ms": 7.25, "frames_lost": 3},
        ],
        "max_sessions": 100,
    }
    switch = [0.8, 1.1, 0.9, 1.4, 2.6, 1.0, 0.95, 1.2, 1.3, 0.85]
    stats = summarize(switch)
    report["config_switch"] = {
        "samples_ms": switch,
        "p50_ms": stats["p50"],
        "p95_ms": stats["p95"],
        "max_ms": stats["max"],
    }
    report["goals"] = [
        {"goal": "bus overhead p99", "target": "≤ 5 ms", "measured": "1.2 ms", "met": True},
        {"goal": "voice to voice p50", "target": "≤ 500 ms", "measured": "660 ms", "met": False},
    ]
    return report


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- summarize ---------------------------------------------------------------------------------


def test_summarize_nearest_rank() -> None:
    s = summarize([float(i) for i in range(100, 0, -1)])  # 1..100, unsorted
    assert (s["p50"], s["p95"], s["p99"], s["max"]) == (50.0, 95.0, 99.0, 100.0)
    assert s["mean"] == pytest.approx(50.5)
    assert summarize([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0, "mean": 7.0, "max": 7.0}
    assert summarize([1.0, 2.0, 3.0, 4.0])["p50"] == 2.0  # a sample, not an interpolation
    assert summarize([]) == {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}


# --- Markdown ----------------------------------------------------------------------------------


def test_markdown_full_report() -> None:
    report = full_report()
    md = render_markdown(report)
    assert md.startswith("# voicemesh benchmark report")
    assert "8 cores, 15.6 GiB RAM, Python 3.12.3, Linux-6.8-x86_64" in md
    assert report["command"] in md

    rows = {(r["mode"], r["sessions"]): r for r in report["bus_overhead"]}
    vm, raw = rows[("voicemesh", 10)], rows[("raw-nats", 10)]
    assert (
        f"| voicemesh | 10 | {vm['p50_ms']:.2f} | {vm['p95_ms']:.2f} | {vm['p99_ms']:.2f} |" in md
    )
    assert "| 1 / 500 |" in md  # frames lost / sent at 10 sessions
    ratio = vm["p50_ms"] / raw["p50_ms"]
    assert bus_ratios(report["bus_overhead"])[10] == pytest.approx(ratio)
    assert f"| 10 | {vm['p50_ms']:.2f} | {raw['p50_ms']:.2f} | {ratio:.2f}× |" in md
    assert md.count("×") == 3  # one ratio per session count

    assert "| 1 | 310.0 | 42.5 | 180.0 | 95.0 | 660.0 | 705.0 | Hello, who are you? |" in md
    assert "| 3 | 320.0 | — | 210.0 | 101.0 | 700.0 | 745.0 |" in md  # missing: a dash
    assert "What's the weather \\| today?" in md  # pipes in text escaped
    # nearest-rank p50 over the turns that have each figure
    assert "| **p50** | **305.0** | **40.0** | **160.0** | **95.0** | **660.0** | **705.0** |" in md

    assert "Limit: p99 bus overhead ≤ 5 ms." in md
    assert "| 200 | 7.25 | 3 |" in md
    assert "**Max sessions within the limit:** 100" in md
    assert "| 1.00 | 2.60 | 2.60 |" in md  # config switch p50 / p95 / max
    assert "| bus overhead p99 | ≤ 5 ms | 1.2 ms | ✅ |" in md
    assert "| voice to voice p50 | ≤ 500 ms | 660 ms | ❌ |" in md


def test_markdown_renders_only_present_sections() -> None:
    report = bus_only_report()
    report["voice_to_voice"] = None
    report["capacity"] = None
    md = render_markdown(report)
    assert "## Bus overhead" in md
    for absent in ("## Voice to voice", "## Capacity", "## Config switch", "## Goals"):
        assert absent not in md
    # a session count measured in one mode only gets no ratio
    report["bus_overhead"].append(bus_row("voicemesh", 500, 2.0, seed=9))
    assert 500 not in bus_ratios(report["bus_overhead"])
    assert render_markdown(report).count("×") == 3
    assert render_markdown({"command": "x"}).startswith("# voicemesh benchmark report")


# --- files -------------------------------------------------------------------------------------


def test_json_round_trips(tmp_path: Path) -> None:
    report = full_report()
    path = write_json(report, tmp_path / "sub" / "report.json")
    assert orjson.loads(path.read_bytes()) == report
    assert path.read_text().startswith('{\n  "machine"')  # indented


def test_write_report_all_sections(tmp_path: Path) -> None:
    paths = write_report(full_report(), tmp_path)
    assert set(paths) == {"markdown", "json", "latency-cdf", "waterfall"}
    assert paths["markdown"].read_text(encoding="utf-8") == render_markdown(full_report())
    assert orjson.loads(paths["json"].read_bytes()) == full_report()
    for key in ("latency-cdf", "waterfall"):
        png = paths[key]
        assert png.name == f"{key}.png" and png.parent == tmp_path
        width, height = png_size(png)
        assert width >= 800 and height >= 300  # 100 dpi on a 10-inch-wide figure
        assert png.stat().st_size > 10_000  # lines and text were drawn, not a blank canvas


def test_write_plots_bus_only(tmp_path: Path) -> None:
    written = write_plots(bus_only_report(), tmp_path)
    assert [p.name for p in written] == ["latency-cdf.png"]  # no turns, no waterfall
    assert png_size(written[0]) == (1000, 600)
    assert written[0].stat().st_size > 10_000
    assert not (tmp_path / "waterfall.png").exists()
    assert write_plots({"command": "x"}, tmp_path / "empty") == []
