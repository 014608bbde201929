"""The NATS side of the bus: frames in and out, with bad frames dropped, counted and logged once.

Handlers run in the subscription's order; one that starts slow work (an LLM turn) hands it to
`spawn`, so the subscription is never blocked and in-flight work is drained on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from voicemesh.bus.codec import Frame, FrameError, Kind, decode, encode
from voicemesh.bus.metrics import DROPPED, FRAME_AGE
from voicemesh.config.connections import nats_options, redact_url
from voicemesh.config.settings import ConnectionSettings
from voicemesh.errors import VoicemeshError

log = logging.getLogger(__name__)

FrameHandler = Callable[[str, Frame], Awaitable[None]]
#: one audio frame in this many feeds the frame-age histogram (docs/operations.md)
AGE_SAMPLE = 16


class BusError(VoicemeshError, ConnectionError):
    """NATS refused the connection for a reason retrying cannot fix (credentials, TLS)."""


def _fatal(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError):
        return True
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text or "tls" in text


def _explain(where: str, exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) or "tls" in str(exc).lower():
        reason = getattr(exc, "reason", None) or str(exc)
        return (
            f"TLS with NATS at {where} failed: {reason}. Check VOICEMESH_NATS_TLS_CA (the CA of "
            "the server's certificate) and, if the server wants a client certificate, "
            "VOICEMESH_NATS_TLS_CERT and VOICEMESH_NATS_TLS_KEY"
        )
    return (
        f"NATS at {where} refused the connection ({str(exc).removeprefix('nats: ')}): set "
        "VOICEMESH_NATS_USER and VOICEMESH_NATS_PASSWORD, VOICEMESH_NATS_TOKEN or "
        "VOICEMESH_NATS_CREDS (or put the credentials in NATS_URL)"
    )


class Bus:
    def __init__(self, nc: Client, *, name: str = "voicemesh"):
        self.nc = nc
        self.name = name
        self.dropped = 0
        self._warned: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: how often the connection came back after a drop (a cluster node died, a network
        #: blip), and when last: what was sent to this client meanwhile is gone (core NATS keeps
        #: nothing), which the transport's turn supervisor takes as a reason to resend
        self.reconnects = 0
        self.reconnected_at = 0.0

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str = "voicemesh",
        settings: ConnectionSettings | None = None,
        **kw: Any,
    ) -> Bus:
        """Connect with the credentials and TLS of `settings` (read from the environment when not
        given). An unreachable server is retried forever, as roles may start before NATS; a
        server that refuses our credentials or our TLS fails at once with a clear BusError."""
        options = nats_options(settings if settings is not None else ConnectionSettings())
        options.update(kw)
        where = redact_url(url)
        fatal: list[BaseException] = []
        connecting: asyncio.Future[None] | None = None

        async def on_error(exc: Exception) -> None:
            if connecting is not None and not connecting.done() and _fatal(exc):
                # It may come from the connect loop or from the client's reader task: either way,
                # stop the loop (it would retry forever) and report it below.
                fatal.append(exc)
                connecting.cancel()
                return
            log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            if nc.is_closed:  # our own close or drain: nothing is wrong
                log.debug("nats: connection closed")
            else:
                log.warning("nats: disconnected")

        made: list[Bus] = []

        async def on_reconnect() -> None:
            at = nc.connected_url  # a parsed URL that may hold a password: host and port only
            log.info("nats: reconnected to %s", f"{at.hostname}:{at.port}" if at else "?")
            for bus in made:
                bus.reconnects += 1
                bus.reconnected_at = time.monotonic()

        nc = Client()
        # NATS_URL may list a cluster's seeds, comma-separated: the client tries each in turn
        # and, after a node dies, reconnects to another (it also learns the rest from the
        # cluster, but a seed list still works when the first seed is the dead one)
        seeds = [u.strip() for u in url.split(",") if u.strip()]
        # Credentials inside the URL hold for that URL only: a node the client learns from the
        # cluster (not in NATS_URL) would be tried without them and refuse it.
        first = urlsplit(seeds[0]) if seeds else None
        if (
            first is not None
            and first.username
            and not any(k in options for k in ("user", "token", "user_credentials"))
        ):
            if first.password is not None:
                options["user"], options["password"] = (
                    unquote(first.username),
                    unquote(first.password),
                )
            else:
                options["token"] = unquote(first.username)
        connecting = asyncio.ensure_future(
            nc.connect(
                seeds,
                name=name,
                max_reconnect_attempts=-1,
                # nats-py annotates this int but only uses it as seconds (asyncio.wait_for,
                # asyncio.sleep, a time comparison), where a float works: a wrong annotation
                reconnect_time_wait=0.25,  # type: ignore[arg-type]
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **options,
            )
        )
        try:
            await connecting
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if fatal and isinstance(exc, asyncio.CancelledError):
                raise BusError(_explain(where, fatal[0])) from None
            raise
        bus = cls(nc, name=name)
        made.append(bus)
        return bus

    async def settle(self) -> None:
        """Make sure the server has every subscription made so far. nats-py 2.16's flush() can
        send its PING ahead of SUBs still queued in the client, so one flush is not proof."""
        await self.nc.flush()
        await self.nc.flush()

    async def publish(self, subject: str, frame: Frame) -> None:
        await self.nc.publish(subject, encode(frame))

    async def subscribe(
        self,
        subject: str,
        handler: FrameHandler,
        *,
        queue: str = "",
        hop: str | None = None,
    ) -> Subscription:
        """`hop` names the stage for the frame-age histogram (time since the frame's origin)."""
        age = FRAME_AGE.labels(hop) if hop else None
        audio_frames = 0

        # Runs once per frame (50 a second per call): one coroutine, no wrapper around the
        # handler, and the histogram (a lock and a bucket search) fed one audio frame in
        # AGE_SAMPLE: its quantiles stay the same, and a unit's text or event frames, a few
        # per turn, are all observed.
        async def on_msg(msg: Msg) -> None:
            nonlocal audio_frames
            try:
                frame = decode(msg.data)
            except FrameError as exc:
                self._bad(msg.subject, exc)
                return
            if age is not None:
                if frame.kind is not Kind.AUDIO:
                    age.observe(max(0, time.time_ns() - frame.origin_ns) / 1e9)
                else:
                    audio_frames += 1
                    if audio_frames % AGE_SAMPLE == 0:
                        age.observe(max(0, time.time_ns() - frame.origin_ns) / 1e9)
            try:
                await handler(msg.subject, frame)
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg, pending_msgs_limit=65536)

    def _bad(self, subject: str, exc: Exception) -> None:
        self.dropped += 1
        kind = subject.rsplit(".", 1)[0]
        DROPPED.labels(kind).inc()
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("dropped malformed frame on %s: %s (logged once per subject)", subject, exc)

    def spawn(self, coro: Awaitable[Any], *, what: str = "task") -> asyncio.Task[Any]:
        """Run work in the background; failures are logged (with the caller's log context),
        cancellation is silent, and `drain` waits for whatever is still running."""

        async def guarded() -> Any:
            try:
                return await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Finish in-flight handlers, then close the connection."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception as exc:  # reconnecting or already gone: nothing left to flush
                log.info("nats drain skipped (%s); closing", type(exc).__name__)
                await self.close()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if not self.nc.is_closed:
            await self.nc.close()
