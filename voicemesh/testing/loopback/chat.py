"""What the chat (LLM) loopback servers share: their base (`ChatServer`: scripted replies, the
request's capture, its API key and injected failure, the streamed pieces and how a stream dies),
replies cut into streamed pieces, the rest of a reply after an assistant prefill, and server-sent
events. Each provider's wire format (routes, bodies, SSE events, error bodies) is its own class's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from voicemesh.testing.loopback.base import Failure, LoopbackServer, StreamCut, wait_for_disconnect

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


class ChatServer(LoopbackServer):
    """A loopback chat provider answering from scripted `replies`, in turn. A subclass builds its
    provider's routes, bodies and SSE events and says how it refuses (`error_response`); this
    base records each request (`last_request`, `last_headers`), applies the injected failure and
    `api_key`, and streams the reply's pieces, cut short by a "die" failure as `die_how` says."""

    default_reply = "Hello from the loopback server."

    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        chunk_words: int = 1,
        space_after: bool = False,
        chunk_delay_s: float = 0.0,
        retry_after_s: int = 2,
        die_how: DieHow = "cut",
        api_key: str | None = None,
    ) -> None:
        self.replies = list(replies or [self.default_reply])
        self.chunk_words = chunk_words
        self.space_after = space_after
        self.chunk_delay_s = chunk_delay_s
        self.retry_after_s = retry_after_s
        self.die_how: DieHow = die_how
        self.served = 0
        self.last_request: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        #: When set, requests without this key are refused with the provider's 401.
        self.api_key = api_key
        super().__init__()

    # --- replies -----------------------------------------------------------------------------

    def answer(self, messages: list[dict[str, Any]]) -> str:
        """The text to send: the next scripted reply, or the rest of one the request prefills."""
        reply = self.replies[self.served % len(self.replies)]
        self.served += 1
        return continue_prefill(reply, self.replies, messages)

    def pieces(self, text: str) -> list[str]:
        return split_pieces(text, self.chunk_words, space_after=self.space_after)

    # --- requests and failures ---------------------------------------------------------------

    def error_response(self, failure: Failure) -> Response | None:
        """The provider's error for an injected failure; None for one that is not an error."""
        raise NotImplementedError

    def take(self, request: Request) -> Failure:
        """The failure for this request (a wrong key is a 401); records its headers."""
        failure = self.take_failure()
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        if self.api_key is not None and credential(request) != self.api_key:
            return Failure("401")
        return failure

    async def receive(self, request: Request) -> tuple[Failure, dict[str, Any]]:
        """`take`, then the request's JSON body, recorded as `last_request`."""
        failure = self.take(request)
        body = orjson.loads(await request.body())
        self.last_request = body
        return failure, body

    async def refusal(self, request: Request, failure: Failure) -> Response | None:
        """How the request is refused: "hang" answers only once the client has gone away, an
        error mode is the provider's error; None to answer it."""
        if failure.mode == "hang":
            await wait_for_disconnect(request)
            return Response(status_code=499)
        return self.error_response(failure)

    # --- streaming ---------------------------------------------------------------------------

    @staticmethod
    def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    async def stream(
        self,
        pieces: list[str],
        failure: Failure,
        *,
        head: list[bytes],
        delta: Callable[[str], bytes],
        tail: Callable[[], list[bytes]],
        error_event: bytes,
        unit: str,
    ) -> AsyncIterator[bytes]:
        """The events of a streamed reply: `head`, a `delta` a piece, then `tail`. A "die"
        failure stops after `failure.after` pieces and then, by `die_how`: "cut" closes the
        connection mid-body, "error_event" sends `error_event`, "clean" just ends the body."""
        die_after = failure.after if failure.mode == "die" else None
        for event in head:
            yield event
        for i, piece in enumerate(pieces):
            if die_after is not None and i >= die_after:
                break
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            yield delta(piece)
        else:
            die_after = None
        if die_after is not None:
            if self.die_how == "cut":
                raise StreamCut(f"loopback cut the stream after {die_after} {unit}")
            if self.die_how == "error_event":
                yield error_event
            return  # "clean": the body ends without the provider's end events
        for event in tail():
            yield event
