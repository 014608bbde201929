"""Prometheus metrics of the bus: frame age per hop, dropped frames."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

FRAME_AGE = Histogram(
    "voicemesh_frame_age_seconds",
    "Time from a frame's origin (its header timestamp) to its arrival at a stage",
    ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DROPPED = Counter(
    "voicemesh_frames_dropped_total",
    "Bus messages dropped because they were not valid frames",
    ["subject"],
)
