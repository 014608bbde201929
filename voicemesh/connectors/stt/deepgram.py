"""Deepgram live transcription over its websocket (`/v1/listen`) on the official deepgram-sdk (v7).

The stage opens a stream when an utterance starts and sends each 20 ms frame as it arrives, so the
transcript is mostly done when the user stops speaking: `finish()` sends CloseStream and waits only
for the last final segment and the server's Metadata. Interim results (and each final segment) go
to `on_interim` as the running text of the utterance. `transcribe()` streams a whole buffered
utterance at once: the replay path when another connector failed mid-utterance.

The SDK's async live client (`client.listen.v1.connect`) is used as is, except that its websocket
connect refuses redirects (`_no_redirects`): `environment` points it at any Deepgram-compatible
host on the egress allow-list (`base_url`, e.g. a self-hosted Deepgram or the loopback server), it
sends `Authorization: Token <key>`, and it parses server messages into typed models. Failures are
turned into ConnectorErrors here, with no secret in their text:
- handshake rejected with an HTTP status (401, 429, 5xx) → `errors.from_status`;
- connection refused or reset before the socket opened → network;
- an Error message or a close before `finish` completed → server (close code 1011, Error message),
  permanent (1008: Deepgram could not decode the audio, a config problem), network (dropped with
  no close frame); and stream, whichever the cause, once results had already come.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from voicemesh.config.connectors import DeepgramOptions
from voicemesh.connectors.base import STTConnector, STTStream
from voicemesh.connectors.errors import ConnectorError, FailureKind, from_status

log = logging.getLogger(__name__)

#: Bytes per websocket message on the replay path (100 ms at 16 kHz); live frames go as they come.
REPLAY_CHUNK_MS = 100
#: How long closing a socket may wait for the server's close frame before the TCP is dropped.
CLOSE_TIMEOUT_S = 1.0

Interim = Callable[[str], Awaitable[None]]

# Closing sockets after `finish` returned, so the transcript is not held up by the close handshake.
_closing: set[asyncio.Task[None]] = set()


def _redirect_refused() -> ConnectorError:
    return ConnectorError(
        FailureKind.PERMANENT,
        "deepgram websocket: the server answered a redirect; redirects are not followed",
    )


def _no_redirects(connect: Any) -> Any:
    """`connect` (websockets' legacy or asyncio client, whichever the SDK holds) with redirects
    refused. Both follow a redirect to any host by default: the legacy one keeps every header but
    Authorization, and either would stream the caller's audio to wherever the redirect points."""
    if getattr(connect, "_voicemesh_no_redirects", False):
        return connect
    if hasattr(connect, "handle_redirect"):  # websockets.legacy.client.Connect

        class LegacyNoRedirect(connect):
            _voicemesh_no_redirects = True

            def handle_redirect(self, uri: str) -> None:
                raise _redirect_refused()

        return LegacyNoRedirect
    if hasattr(connect, "process_redirect"):  # websockets.asyncio.client.connect

        class NoRedirect(connect):
            _voicemesh_no_redirects = True

            def process_redirect(self, exc: Exception) -> Exception | str:
                return _redirect_refused()

        return NoRedirect
    raise ConnectorError(FailureKind.PERMANENT, "deepgram: unknown websockets client")


@functools.cache
def _sdk() -> tuple[Any, Any, Any]:
    # deepgram-sdk 7 drives websockets' legacy client, which warns on import under websockets >= 14.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import deepgram.listen.v1.client as listen  # imported lazily by the client, which warns
        from deepgram import AsyncDeepgramClient
        from deepgram.core.api_error import ApiError
        from deepgram.environment import DeepgramClientEnvironment
    # The SDK offers no option for it: the live client's connect is swapped, in the SDK's module
    # only, for one that refuses redirects.
    listen.websockets_client_connect = _no_redirects(listen.websockets_client_connect)
    return AsyncDeepgramClient, ApiError, DeepgramClientEnvironment


def _environment(base_url: str | None, env_cls: Any) -> Any:
    if not base_url:
        return env_cls.PRODUCTION
    ws = base_url.rstrip("/")
    if ws.startswith("http"):  # http(s)://host → ws(s)://host
        ws = "ws" + ws[4:]
    http = "http" + ws[2:]
    return env_cls(base=http, production=ws, agent=ws, agent_rest=http)


def _field(msg: Any, name: str, default: Any = None) -> Any:
    if isinstance(msg, dict):
        return msg.get(name, default)
    return getattr(msg, name, default)


def _transcript(msg: Any) -> str:
    alternatives = _field(_field(msg, "channel"), "alternatives") or []
    return str(_field(alternatives[0], "transcript", "") or "").strip() if alternatives else ""


class DeepgramSTT(STTConnector):
    name = "deepgram"
    streaming = True
    can_probe = True
    options: DeepgramOptions

    def __init__(self, options: DeepgramOptions):
        super().__init__(options)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            client_cls, _, env_cls = _sdk()
            self._client = client_cls(
                api_key=self.options.api_key,
                environment=_environment(self.options.base_url, env_cls),
            )
        return self._client

    async def warmup(self) -> None:
        await asyncio.to_thread(_sdk)  # a cold SDK import is not for the event loop
        _ = self.client

    async def open_stream(self, sample_rate: int, on_interim: Interim | None = None) -> STTStream:
        stream = DeepgramStream(on_interim)
        await stream.open(self, sample_rate)
        return stream

    async def transcribe(self, pcm: bytes, sample_rate: int) -> str:
        if not pcm:
            return ""
        stream = await self.open_stream(sample_rate)
        try:
            step = max(2, sample_rate * 2 * REPLAY_CHUNK_MS // 1000)
            for i in range(0, len(pcm), step):
                await stream.send(pcm[i : i + step])
            return await stream.finish()
        finally:
            await stream.aclose()

    async def probe(self) -> None:
        """Open a live stream (handshake: key, rate limit, server health) and close it."""
        stream = await self.open_stream(16000)
        await stream.aclose()


class DeepgramStream(STTStream):
    """One utterance on one Deepgram websocket."""

    def __init__(self, on_interim: Interim | None):
        self.on_interim = on_interim
        self.finals: list[str] = []
        self.results = 0  # Results messages received: a failure after one is a stream failure
        self.error: ConnectorError | None = None
        self._stack = contextlib.AsyncExitStack()
        self._socket: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._done = asyncio.Event()  # Metadata received or the socket ended
        self._closing_sent = False
        self._closed = False
        self._last_interim = ""

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self, conn: DeepgramSTT, sample_rate: int) -> None:
        _, api_error, _ = _sdk()
        o = conn.options
        try:
            self._socket = await self._stack.enter_async_context(
                conn.client.listen.v1.connect(
                    model=o.model,
                    language=o.language,
                    encoding="linear16",
                    sample_rate=str(sample_rate),
                    channels="1",
                    interim_results="true" if o.interim_results else "false",
                    smart_format="true" if o.smart_format else "false",
                )
            )
        except ConnectorError:
            raise  # a redirect refused
        except api_error as exc:
            # (its `headers` are the request's, Authorization included: never put them in text)
            status = exc.status_code or 0
            raise from_status(
                status, f"deepgram rejected the websocket: HTTP {status} {exc.body}"
            ) from None
        except TimeoutError:
            raise ConnectorError(
                FailureKind.TIMEOUT, "deepgram websocket: open timed out"
            ) from None
        except (OSError, EOFError) as exc:
            raise ConnectorError(
                FailureKind.NETWORK, f"deepgram websocket: {type(exc).__name__}: {exc}"
            ) from None
        except TypeError as exc:
            # the SDK calling a websockets client it no longer matches: no retry will help
            raise ConnectorError(
                FailureKind.PERMANENT, f"deepgram-sdk and websockets disagree: {exc}"
            ) from None
        except Exception as exc:
            # websockets' own handshake errors (an invalid upgrade, a malformed response)
            raise ConnectorError(
                FailureKind.NETWORK, f"deepgram websocket handshake: {type(exc).__name__}: {exc}"
            ) from None
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, pcm: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self._closing_sent or self._socket is None:
            raise ConnectorError(FailureKind.ERROR, "deepgram stream already finished")
        if not pcm:
            return
        try:
            await self._socket.send_media(pcm)
        except Exception as exc:
            await self._wait_reader()
            raise self.error or self._fail(
                FailureKind.NETWORK, f"send failed: {type(exc).__name__}: {exc}"
            ) from None

    async def finish(self) -> str:
        if self.error is not None:
            raise self.error
        if self._socket is None:
            raise ConnectorError(FailureKind.ERROR, "deepgram stream is not open")
        if not self._closing_sent:
            self._closing_sent = True
            try:
                await self._socket.send_close_stream()
            except Exception:
                pass  # the reader reports how the socket ended
        await self._done.wait()
        if self.error is not None:
            raise self.error
        self._close_in_background()
        return " ".join(self.finals)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._stack.aclose()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                self._abort()
                raise
            self._abort()  # no close frame back in time, or the socket was already gone
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader

    def _close_in_background(self) -> None:
        task = asyncio.ensure_future(self.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    def _abort(self) -> None:
        transport = getattr(getattr(self._socket, "_websocket", None), "transport", None)
        if transport is not None:
            transport.abort()

    # --- receiving ---------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for msg in self._socket:
                kind = _field(msg, "type")
                if kind == "Results":
                    await self._on_results(msg)
                elif kind == "Metadata" and self._closing_sent:
                    break  # the last message of a stream that was told to close
                elif kind == "Error":
                    detail = _field(msg, "description") or _field(msg, "message") or "error"
                    variant = _field(msg, "variant") or _field(msg, "code") or ""
                    self._fail(FailureKind.SERVER, f"error message: {variant} {detail}".strip())
                    self._done.set()  # fail `send` and `finish` now, not when the socket closes
            else:
                if not self._closing_sent:
                    self._fail(FailureKind.NETWORK, "socket closed before the stream finished")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(*self._closed_kind(exc))
        finally:
            self._done.set()

    async def _on_results(self, msg: Any) -> None:
        self.results += 1
        text = _transcript(msg)
        if _field(msg, "is_final"):
            if text:
                self.finals.append(text)
            running = " ".join(self.finals)
        else:
            running = " ".join([*self.finals, text]) if text else ""
        if running and running != self._last_interim and self.on_interim is not None:
            self._last_interim = running
            try:
                await self.on_interim(running)
            except Exception as exc:  # a consumer's bug must not kill the transcription
                log.warning("deepgram on_interim callback failed: %s", exc)

    def _closed_kind(self, exc: BaseException) -> tuple[FailureKind, str]:
        rcvd = getattr(exc, "rcvd", None)
        code = getattr(rcvd, "code", None)
        reason = getattr(rcvd, "reason", "") or ""
        if code is None:
            return FailureKind.NETWORK, f"connection lost ({type(exc).__name__}: {exc})"
        what = f"socket closed with code {code} {reason}".strip()
        if code == 1008:  # DATA-0000: the audio could not be decoded: the encoding is wrong
            return FailureKind.PERMANENT, what
        if code in (1000, 1001):
            return FailureKind.NETWORK, what
        return FailureKind.SERVER, what

    def _fail(self, kind: FailureKind, message: str) -> ConnectorError:
        if self.error is None:
            if self.results and kind is not FailureKind.PERMANENT:
                message = f"died after {self.results} results: {kind}: {message}"
                kind = FailureKind.STREAM
            self.error = ConnectorError(kind, f"deepgram {message}")
        return self.error

    async def _wait_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._done.wait()
