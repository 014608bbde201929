"""OpenTelemetry traces of each turn, exported over OTLP/HTTP (JSON) when
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, and nothing at all
otherwise: every function here returns at its first line while no exporter is configured, and
no OpenTelemetry package is imported.

One turn is one trace, and its ids are *derived*, not carried: the trace id is the 64-bit id the
logs already carry (voicemesh.bus.subjects.trace_id, from the session and the turn epoch that
every frame holds) left-padded to OTel's 128 bits, and the root span's id is derived the same
way. So every role puts its spans under the transport's root span without a byte of trace
context on the wire: the per-frame path is untouched, on NATS headers or in the frame header.

Spans (start and end are taken where the work happens, so each role's clock is its own):
  turn (transport, root): the caller's last voiced frame → first bot audio sent
    eou, stt, first_audio (transport): the phases of voicemesh.transport.call.trace.TurnTrace
    stt | llm | tts (each stage instance): one per unit of work it took (an utterance, the LLM
    turn, each TTS sentence), with its instance, index and outcome

The exporter is ours (a few dozen lines over httpx) rather than opentelemetry-sdk: the SDK pins
opentelemetry-api to its own version, which would move the one our dependencies already pull
in, and deterministic root span ids need a custom id generator there anyway. Spans are batched
and posted once a second by a background task; a full queue or a failed post drops spans (with
one warning), never delays a turn. Span attributes carry ids and names, never what was said.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from voicemesh.bus.subjects import trace_id as log_trace_id

log = logging.getLogger(__name__)

MAX_QUEUE = 4096  # spans waiting for the next post; more are dropped
FLUSH_S = 1.0


def otel_trace_id(session: str, epoch: int) -> str:
    """The turn's OTel trace id (32 hex): the logs' trace id, zero-padded on the left."""
    return log_trace_id(session, epoch).rjust(32, "0")


def root_span_id(session: str, epoch: int) -> str:
    """The turn's root span id (16 hex), which every role can compute."""
    return hashlib.blake2s(f"root:{session}:{epoch}".encode(), digest_size=8).hexdigest()


def _span_id() -> str:
    return os.urandom(8).hex()


def _value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


def _attrs(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in attrs.items() if v is not None]


def endpoint_from(env: Mapping[str, str]) -> str | None:
    """Where traces go: the signal's own URL as given, else `<endpoint>/v1/traces`."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + "/v1/traces"
    return None


def headers_from(env: Mapping[str, str]) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS (`k=v,k2=v2`, as the spec writes them): often a collector's
    API key, so never logged."""
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS", "")
    out = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            from urllib.parse import unquote

            out[key.strip()] = unquote(value.strip())
    return out


@dataclass
class Exporter:
    url: str
    service: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    queue: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    users: int = 0
    _task: asyncio.Task[None] | None = None
    _warned: bool = False

    def add(self, span: dict[str, Any]) -> None:
        if len(self.queue) >= MAX_QUEUE:
            self.dropped += 1
            return
        self.queue.append(span)

    def body(self, spans: list[dict[str, Any]]) -> bytes:
        return orjson.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": _attrs({"service.name": self.service})},
                        "scopeSpans": [{"scope": {"name": "voicemesh"}, "spans": spans}],
                    }
                ]
            }
        )

    async def flush(self) -> None:
        if not self.queue:
            return
        import httpx

        spans, self.queue = self.queue, []
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                r = await client.post(
                    self.url,
                    content=self.body(spans),
                    headers={"Content-Type": "application/json", **self.headers},
                )
                r.raise_for_status()
        except Exception as exc:  # a collector that is down costs the spans, never a turn
            self.dropped += len(spans)
            if not self._warned:
                self._warned = True
                log.warning("OTLP export to %s failed, spans dropped: %s", self.url, exc)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()


#: the process's exporter while any role in it runs with tracing on; None: tracing is off
EXPORTER: Exporter | None = None


async def start(env: Mapping[str, str] | None = None, *, service: str = "voicemesh") -> bool:
    """Turn tracing on for this process if the environment names an OTLP endpoint (every role
    calls this at start; roles sharing a process share one exporter). True if on."""
    global EXPORTER
    env = os.environ if env is None else env
    url = endpoint_from(env)
    if url is None:
        return False
    if EXPORTER is None:
        EXPORTER = Exporter(url, env.get("OTEL_SERVICE_NAME") or service, headers_from(env))
        EXPORTER._task = asyncio.ensure_future(EXPORTER.run())
    EXPORTER.users += 1
    return True


async def stop() -> None:
    """A role stops: the last one out posts what is left and turns tracing off."""
    global EXPORTER
    exporter = EXPORTER
    if exporter is None:
        return
    exporter.users -= 1
    if exporter.users > 0:
        return
    EXPORTER = None
    if exporter._task is not None:
        exporter._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exporter._task
    await exporter.flush()


def span(
    name: str,
    session: str,
    epoch: int,
    start_ns: int,
    end_ns: int,
    *,
    root: bool = False,
    attrs: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record one finished span of turn `epoch` of `session` (the root with `root`, else a child
    of it). Times are Unix nanoseconds."""
    exporter = EXPORTER
    if exporter is None:
        return
    record: dict[str, Any] = {
        "traceId": otel_trace_id(session, epoch),
        "spanId": root_span_id(session, epoch) if root else _span_id(),
        "name": name,
        "kind": 1,  # internal
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(max(end_ns, start_ns)),
        "attributes": _attrs(
            {
                "voicemesh.session": session,
                "voicemesh.turn": epoch,
                "voicemesh.trace_id": log_trace_id(session, epoch),
                **(attrs or {}),
            }
        ),
        "status": {"code": 2, "message": error} if error else {"code": 1},
    }
    if not root:
        record["parentSpanId"] = root_span_id(session, epoch)
    exporter.add(record)


def enabled() -> bool:
    return EXPORTER is not None


def perf_to_unix_ns(t: float) -> int:
    """A time.perf_counter() reading as Unix nanoseconds (the transport times turns with the
    former; OTLP wants the latter)."""
    return time.time_ns() - int((time.perf_counter() - t) * 1e9)
