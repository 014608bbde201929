"""Prometheus metrics per tool: calls by status, and latency.

A tool's name comes from a config, so a label per name would let configs grow the metrics
without bound; past MAX_NAMES distinct names in one process, further names are counted under
"other" (docs/security.md)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MAX_NAMES = 200
OTHER = "other"

CALLS = Counter(
    "voicemesh_tool_calls_total",
    "Tool calls by tool, handler type and status (ok, error, timeout, cancelled)",
    ["tool", "handler", "status"],
)
SECONDS = Histogram(
    "voicemesh_tool_seconds",
    "Time from a tool call's start to its result",
    ["tool", "handler"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_seen: set[str] = set()


def label(name: str) -> str:
    """The metric label of a tool name (bounded: see the module docstring)."""
    if name in _seen:
        return name
    if len(_seen) >= MAX_NAMES:
        return OTHER
    _seen.add(name)
    return name


def observe(name: str, handler: str, status: str, seconds: float) -> None:
    tool = label(name)
    CALLS.labels(tool, handler, status).inc()
    SECONDS.labels(tool, handler).observe(seconds)
