"""Prometheus metrics per connector (requests, errors by class, fallbacks, time to first result)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "voicemesh_connector_requests_total",
    "Units of work sent to a connector",
    ["stage", "connector"],
)
ERRORS = Counter(
    "voicemesh_connector_errors_total",
    "Connector failures by class (timeout, rate_limit, server, permanent, stream, network, error)",
    ["stage", "connector", "kind"],
)
FALLBACKS = Counter(
    "voicemesh_connector_fallbacks_total",
    "Units of work moved from a failed connector to the next in the chain",
    ["stage", "from_connector", "to_connector", "kind"],
)
FIRST_RESULT = Histogram(
    "voicemesh_connector_first_result_seconds",
    "Time from sending a unit of work to a connector to its first result",
    ["stage", "connector"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)
SPECULATIONS = Counter(
    "voicemesh_speculations_total",
    "Work started before the turn's end was confirmed, by outcome: started; used (it became the "
    "turn's result); discarded (started, then thrown away: the caller went on, or a newer turn "
    "began); skipped (a pause was marked while the engine was busy, so none was started). "
    "stage stt: transcriptions at the caller's pauses; stage llm: speculative replies",
    ["stage", "outcome"],
)
