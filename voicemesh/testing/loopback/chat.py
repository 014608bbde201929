"""What the chat (LLM) loopback servers share: scripted replies cut into streamed pieces, the
rest of a reply after an assistant prefill, the request's API key, and server-sent events."""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson
from starlette.requests import Request

DieHow = Literal["cut", "clean", "error_event"]


def split_pieces(text: str, per_chunk: int = 1, *, space_after: bool = False) -> list[str]:
    """Word chunks that concatenate back to `text` exactly; each carries the whitespace before
    its words (" quick"), or with `space_after` the whitespace after them ("quick ")."""
    if space_after:
        lead = text[: len(text) - len(text.lstrip())]
        words = re.findall(r"\S+\s*", text) or ([lead] if lead else [])
        if words and lead and not words[0].startswith(lead):
            words[0] = lead + words[0]
    else:
        words = re.findall(r"\s*\S+|\s+$", text)
    return ["".join(words[i : i + per_chunk]) for i in range(0, len(words), per_chunk)]


def content_text(content: Any) -> str:
    """A message's text, whether a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def credential(request: Request) -> str | None:
    """The API key a request carries: `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return head + b"data: " + body + b"\n\n"


def continue_prefill(reply: str, replies: list[str], messages: list[dict[str, Any]]) -> str:
    """What to send for `reply`: as it is, unless the request ends with an assistant message that
    starts `reply` or another of `replies`; then the rest of that one after the prefill."""
    last = messages[-1] if messages else {}
    if isinstance(last, dict) and last.get("role") == "assistant":
        prefix = content_text(last.get("content"))
        for candidate in (reply, *replies):
            if prefix and candidate.startswith(prefix):
                return candidate[len(prefix) :]
    return reply
