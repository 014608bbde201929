"""Tool calling: the runner the LLM stage calls tools with (runner.py), the NATS tool protocol
(protocol.py), the helper that turns an async function into a tool service (service.py), and
per-tool metrics. Tool configs are modelled in voicemesh/config/tools.py."""

from voicemesh.tools.protocol import ToolRequest, idempotency_key
from voicemesh.tools.service import current_call, serve, serve_all, tool

__all__ = ["ToolRequest", "current_call", "idempotency_key", "serve", "serve_all", "tool"]
