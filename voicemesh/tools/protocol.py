"""The NATS tool protocol, shared by the LLM stage (requester) and `serve` (the service side).
docs/wire-protocol.md, "Tools", describes it for services written without voicemesh.

Request (JSON, no NATS headers):
    {"name": "get_weather", "arguments": {...}, "call_id": "call_0_0",
     "idempotency_key": "<session>:<epoch>:<call_id>", "session_id": "...", "epoch": 3}
Reply (JSON): {"result": <any JSON>} or {"error": "what went wrong"}.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ToolRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    arguments: dict[str, Any]
    call_id: str
    idempotency_key: str
    session_id: str = ""
    epoch: int = 0


def idempotency_key(session: str, epoch: int, call_id: str) -> str:
    """Names one call of one turn: the same on a redelivered turn or after a fallback, so a
    handler that remembers it does the work once."""
    return f"{session}:{epoch}:{call_id}"
