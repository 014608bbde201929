"""Render a benchmark report (a JSON-serialisable dict) as Markdown, JSON and PNG plots.

The report schema (every section but ``machine`` and ``command`` may be missing or None, and only
what is there is rendered)::

    machine: {cores, memory_gib, python, platform, date}
    command: str
    bus_overhead: [{mode: "voicemesh" | "raw-nats", sessions, fps, seconds, frames_sent,
                    frames_received, frames_lost, p50_ms, p95_ms, p99_ms, cpu_s, samples_ms}]
    voice_to_voice: {turns: [{turn, eou_ms, stt_ms, llm_ttft_ms, tts_ttfb_ms, v2v_ms, caller_ms,
                              user_text, bot_text}]}
    capacity: {limit_ms, steps: [{sessions, p99_overhead_ms, frames_lost}], max_sessions}
    config_switch: {samples_ms, p50_ms, p95_ms, max_ms}
    goals: [{goal, target, measured, met}]

In the waterfall plot the four voice-to-voice stage figures are taken as consecutive durations
(end of utterance → transcript → first LLM token → first TTS audio) and stacked; v2v, measured end
to end, is marked on its own, so a gap or an overlap against the stacked bar is visible.

matplotlib is imported only inside :func:`write_plots`, on the Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

Report = Mapping[str, Any]

MODES = ("voicemesh", "raw-nats")
# (key, column header, colour in the waterfall)
STAGES = (
    ("eou_ms", "EOU", "#4c72b0"),
    ("stt_ms", "STT", "#dd8452"),
    ("llm_ttft_ms", "LLM TTFT", "#55a868"),
    ("tts_ttfb_ms", "TTS TTFB", "#c44e52"),
)
DPI = 100
TEXT_MAX = 60  # characters of user/bot text shown per table cell

# --- numbers ---------------------------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest sample with at least p % of the samples ≤ it."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 (nearest rank), mean and max of the samples; all None for an empty list."""
    if not samples:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    return {
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "mean": float(sum(samples) / len(samples)),
        "max": float(max(samples)),
    }


def _present(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None]


# --- Markdown --------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _int(value: int | None) -> str:
    return "—" if value is None else str(value)


def _cell(text: Any, limit: int = TEXT_MAX) -> str:
    """Table-safe text: one line, pipes escaped, cut to `limit` characters."""
    s = " ".join(str(text or "").split())
    if len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    return s.replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """A Markdown table; `align` gives one character per column: 'l', 'c' or 'r' (the default)."""
    align = align.ljust(len(header), "r")
    seps = [{"l": ":--", "c": ":-:"}.get(a, "--:") for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _heading(report: Report) -> list[str]:
    lines = ["# voicemesh benchmark report", ""]
    m = report.get("machine") or {}
    if m:
        parts = []
        if m.get("cores") is not None:
            parts.append(f"{m['cores']} cores")
        if m.get("memory_gib") is not None:
            parts.append(f"{m['memory_gib']:.1f} GiB RAM")
        if m.get("python"):
            parts.append(f"Python {m['python']}")
        if m.get("platform"):
            parts.append(str(m["platform"]))
        lines.append("**Machine:** " + ", ".join(parts) + "  ")
        if m.get("date"):
            lines.append(f"**Date:** {m['date']}  ")
    if report.get("command"):
        lines += ["**Command:**", "", "```", str(report["command"]), "```"]
    lines.append("")
    return lines


def _pair_by_sessions(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Mapping]]:
    """{sessions: {mode: row}}, keeping the first row of a repeated (mode, sessions)."""
    pairs: dict[int, dict[str, Mapping]] = {}
    for row in rows:
        pairs.setdefault(int(row["sessions"]), {}).setdefault(str(row["mode"]), row)
    return pairs


def bus_ratios(rows: Sequence[Mapping[str, Any]]) -> dict[int, float | None]:
    """voicemesh p50 ÷ raw-nats p50 per session count present in both modes (None if raw is 0)."""
    ratios: dict[int, float | None] = {}
    for sessions, by_mode in sorted(_pair_by_sessions(rows).items()):
        vm, raw = by_mode.get("voicemesh"), by_mode.get("raw-nats")
        if vm is None or raw is None:
            continue
        vm_p50, raw_p50 = vm.get("p50_ms"), raw.get("p50_ms")
        if vm_p50 is None or not raw_p50:
            ratios[sessions] = None
        else:
            ratios[sessions] = vm_p50 / raw_p50
    return ratios


def _bus_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Bus overhead", ""]
    fps = {r.get("fps") for r in rows}
    seconds = {r.get("seconds") for r in rows}
    if len(fps) == 1 and len(seconds) == 1 and None not in fps | seconds:
        lines += [
            f"Each session sends {fps.pop()} frames/s for {seconds.pop():g} s; "
            "latency is the per-frame round trip.",
            "",
        ]
    body = [
        [
            str(r["mode"]),
            _int(r.get("sessions")),
            _num(r.get("p50_ms")),
            _num(r.get("p95_ms")),
            _num(r.get("p99_ms")),
            f"{_int(r.get('frames_lost'))} / {_int(r.get('frames_sent'))}",
            _num(r.get("cpu_s")),
        ]
        for r in rows
    ]
    header = ["mode", "sessions", "p50 ms", "p95 ms", "p99 ms", "frames lost / sent", "CPU s"]
    lines += _table(header, body, align="l")
    ratios = bus_ratios(rows)
    if ratios:
        pairs = _pair_by_sessions(rows)
        body = [
            [
                str(s),
                _num(pairs[s]["voicemesh"].get("p50_ms")),
                _num(pairs[s]["raw-nats"].get("p50_ms")),
                "—" if ratio is None else f"{ratio:.2f}×",
            ]
            for s, ratio in ratios.items()
        ]
        lines += [
            "",
            "voicemesh p50 ÷ raw-nats p50, both measured in this run:",
            "",
            *_table(["sessions", "voicemesh p50 ms", "raw-nats p50 ms", "ratio"], body),
        ]
    lines.append("")
    return lines


def _v2v_section(
    turns: Sequence[Mapping[str, Any]], inconsistent: Sequence[int] = (), voices: str | None = None
) -> list[str]:
    keys = [k for k, _, _ in STAGES] + ["v2v_ms", "caller_ms"]
    header = (
        ["turn"]
        + [f"{h} ms" for _, h, _ in STAGES]
        + ["V2V ms", "at caller ms", "user said", "bot said"]
    )
    body = [
        [_int(t.get("turn"))]
        + [_num(t.get(k), 1) for k in keys]
        + [_cell(t.get("user_text")), _cell(t.get("bot_text"))]
        for t in turns
    ]
    p50s = [percentile(_present(t.get(k) for t in turns), 50) for k in keys]
    body.append(["**p50**"] + [f"**{_num(v, 1)}**" for v in p50s] + ["", ""])
    lines = ["## Voice to voice", ""]
    if voices:
        said_by = ", ".join(f"{t.get('turn')}: {t['voice']}" for t in turns if t.get("voice"))
        lines += [f"Caller's voices: {voices}" + (f" (turn {said_by})." if said_by else "."), ""]
    if inconsistent:
        lines += [
            f"**INVALID run: on turns {', '.join(map(str, inconsistent))} the caller's figure is "
            "below the transport's, which cannot be (the caller's includes both media paths).**",
            "",
        ]
    lines += [
        "Clocks: the stage columns and V2V are the transport's (from its VAD's last voiced frame "
        "to its first bot audio out); *at caller* is the WebRTC caller's, from the last voiced "
        "frame it sent (Silero, as the transport) to the first audible bot audio out of its "
        "jitter buffer. Both are durations on this machine's monotonic clock.",
        "",
    ]
    lines += _table(header, body, align="rrrrrrrll")
    lines.append("")
    return lines


def _capacity_section(cap: Mapping[str, Any]) -> list[str]:
    lines = ["## Capacity", ""]
    limit = cap.get("limit_ms")
    if limit is not None:
        lines += [f"Limit: p99 bus overhead ≤ {limit:g} ms.", ""]
    steps = cap.get("steps") or []
    if steps:
        body = [
            [_int(s.get("sessions")), _num(s.get("p99_overhead_ms")), _int(s.get("frames_lost"))]
            for s in steps
        ]
        lines += _table(["sessions", "p99 overhead ms", "frames lost"], body)
        lines.append("")
    most = cap.get("max_sessions")
    lines += [f"**Max sessions within the limit:** {'not determined' if most is None else most}"]
    lines.append("")
    return lines


def _config_switch_section(cs: Mapping[str, Any]) -> list[str]:
    samples = cs.get("samples_ms") or []
    stats = summarize(samples)
    p50 = cs.get("p50_ms", stats["p50"])
    p95 = cs.get("p95_ms", stats["p95"])
    top = cs.get("max_ms", stats["max"])
    lines = ["## Config switch", ""]
    if samples:
        lines += [f"{len(samples)} config switches measured.", ""]
    lines += _table(["p50 ms", "p95 ms", "max ms"], [[_num(p50), _num(p95), _num(top)]])
    lines.append("")
    return lines


def _goals_section(goals: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [
        [
            _cell(g.get("goal"), 200),
            _cell(g.get("target"), 200),
            _cell(g.get("measured"), 200),
            "✅" if g.get("met") else "❌",
        ]
        for g in goals
    ]
    lines = ["## Goals", ""]
    lines += _table(["goal", "target", "measured", "met"], body, align="lllc")
    lines.append("")
    return lines


def render_markdown(report: Report) -> str:
    lines = _heading(report)
    if report.get("bus_overhead"):
        lines += _bus_section(report["bus_overhead"])
    v2v = report.get("voice_to_voice") or {}
    if turns := v2v.get("turns"):
        lines += _v2v_section(turns, v2v.get("inconsistent_turns") or [], v2v.get("voices"))
    if report.get("capacity"):
        lines += _capacity_section(report["capacity"])
    if report.get("config_switch"):
        lines += _config_switch_section(report["config_switch"])
    if report.get("goals"):
        lines += _goals_section(report["goals"])
    return "\n".join(lines).rstrip() + "\n"


# --- files -----------------------------------------------------------------------------------


def write_json(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    path.write_bytes(orjson.dumps(report, option=options))
    return path


def _cdf_series(report: Report) -> list[tuple[str, Mapping[str, Any], list[float]]]:
    """(label, style, sorted positive samples) per line of the CDF plot."""
    rows = report.get("bus_overhead") or []
    sessions = sorted({int(r["sessions"]) for r in rows})
    series: list[tuple[str, Mapping[str, Any], list[float]]] = []
    for r in rows:
        samples = sorted(v for v in r.get("samples_ms") or [] if v and v > 0)
        if not samples:
            continue
        # colour by session count, line style by mode
        shade = sessions.index(int(r["sessions"])) / max(1, len(sessions) - 1)
        style = {
            "shade": shade,
            "linestyle": "-" if r["mode"] == "voicemesh" else "--",
            "linewidth": 1.6,
        }
        p99 = percentile(samples, 99)
        label = f"{r['mode']}, {r['sessions']} sess (p99 {p99:.2f} ms)"
        series.append((label, style, samples))
    turns = (report.get("voice_to_voice") or {}).get("turns") or []
    v2v = sorted(v for v in _present(t.get("v2v_ms") for t in turns) if v > 0)
    if v2v:
        style = {"color": "black", "linestyle": "-", "linewidth": 2.4}
        label = f"voice to voice, {len(v2v)} turns (p50 {percentile(v2v, 50):.0f} ms)"
        series.append((label, style, v2v))
    return series


def _plot_cdf(plt: Any, report: Report, path: Path) -> bool:
    series = _cdf_series(report)
    if not series:
        return False
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(10, 6))
    for label, style, samples in series:
        color = style.get("color") or cmap(0.1 + 0.75 * style["shade"])
        n = len(samples)
        ax.step(
            samples,
            [(i + 1) / n for i in range(n)],
            where="post",
            label=label,
            color=color,
            linestyle=style["linestyle"],
            linewidth=style["linewidth"],
        )
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        ax.axhline(q, color="grey", linewidth=0.7, linestyle=":")
        ax.annotate(
            name,
            (1.0, q),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="grey",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("fraction of samples ≤ latency")
    ax.set_title("Latency CDF: bus round trip per (mode, sessions) and voice to voice")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _plot_waterfall(plt: Any, report: Report, path: Path) -> bool:
    turns = (report.get("voice_to_voice") or {}).get("turns") or []
    keys = [k for k, _, _ in STAGES] + ["v2v_ms"]
    turns = [t for t in turns if any(t.get(k) is not None for k in keys)]
    if not turns:
        return False
    fig, ax = plt.subplots(figsize=(10, max(3.0, 1.6 + 0.55 * len(turns))))
    labels = [f"turn {t.get('turn', i + 1)}" for i, t in enumerate(turns)]
    ys = list(range(len(turns)))
    widest = max(
        max(sum(_present(t.get(k) for k, _, _ in STAGES)), t.get("v2v_ms") or 0) for t in turns
    )
    left = [0.0] * len(turns)
    for key, name, color in STAGES:
        widths = [float(t.get(key) or 0.0) for t in turns]
        bars = ax.barh(ys, widths, left=left, height=0.6, color=color, label=name)
        for bar, width in zip(bars, widths, strict=True):
            if width >= 0.04 * widest:  # value inside the segment when it fits
                ax.text(
                    bar.get_x() + width / 2,
                    bar.get_y() + bar.get_height() / 2,
                    f"{width:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                )
        left = [a + b for a, b in zip(left, widths, strict=True)]
    v2v_label: str | None = "v2v (end to end)"
    for y, t in zip(ys, turns, strict=True):
        v2v = t.get("v2v_ms")
        if v2v is None:
            continue
        ax.plot([v2v, v2v], [y - 0.4, y + 0.4], color="black", linewidth=2.2, label=v2v_label)
        v2v_label = None  # one legend entry
        ax.annotate(
            f"v2v {v2v:.0f} ms",
            (v2v, y),
            xytext=(5, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()  # first turn on top
    ax.set_xlim(0, widest * 1.18)
    ax.set_xlabel("ms since the user stopped speaking")
    ax.set_title("Voice-to-voice waterfall per turn: EOU → STT → LLM TTFT → TTS TTFB")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: names[i] == "v2v (end to end)")  # v2v last
    ax.legend(
        [handles[i] for i in order],
        [names[i] for i in order],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=5,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def write_plots(report: Report, out_dir: str | Path) -> list[Path]:
    """latency-cdf.png and waterfall.png, each only when the report has data for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (("latency-cdf.png", _plot_cdf), ("waterfall.png", _plot_waterfall)):
        if plot(plt, report, out / name):
            written.append(out / name)
    return written


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """report.md, report.json and the plots; keys "markdown", "json" and each plot's stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(render_markdown(report), encoding="utf-8")
    paths = {"markdown": md, "json": write_json(report, out / "report.json")}
    for png in write_plots(report, out):
        paths[png.stem] = png
    return paths
