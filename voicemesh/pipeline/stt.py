"""STT stage: session-affine. One instance owns a session's audio stream through a Valkey lease,
buffers each utterance (whisper has no streaming) and sends its transcript to the next hop.

The transport asks `vm.assign.stt` (a queue group) for an owner; the instance that answers takes the
lease, subscribes to `vm.stt.<session>` before replying (same connection, so the subscription is in
place before the transport sends), and renews the lease while it holds the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from voicemesh.connectors.base import STTConnector
from voicemesh.pipeline.base import StageService
from voicemesh.router import Flag, Frame, Kind, Leases, Subjects
from voicemesh.router.store import check_session_id

log = logging.getLogger(__name__)

IDLE_RELEASE_S = 600.0


@dataclass
class Stream:
    sub: Subscription
    epoch: int = -1
    rate: int = 16000
    origin_ns: int = 0
    audio: bytearray = field(default_factory=bytearray)
    last_frame: float = field(default_factory=time.monotonic)


class STTService(StageService):
    role = "stt"

    async def setup(self) -> None:
        self.leases = Leases(
            self.store.client, owner=self.instance, ttl_ms=self.settings.lease_ttl_ms
        )
        self.streams: dict[str, Stream] = {}
        self._lock = asyncio.Lock()
        self._intake.append(
            await self.bus.nc.subscribe(
                self.subjects.assign("stt"), queue="stt", cb=self._on_assign
            )
        )
        self._heartbeat = self.bus.spawn(self._renew_forever())

    async def stop(self) -> None:
        self._heartbeat.cancel()
        for session in list(self.streams):
            await self._drop(session, release=True)
        await super().stop()

    async def _on_assign(self, msg: Msg) -> None:
        try:
            session = check_session_id(orjson.loads(msg.data)["session_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if msg.reply:
                await self.bus.nc.publish(msg.reply, orjson.dumps({"error": str(exc)}))
            return
        async with self._lock:
            holder = await self.leases.acquire(self.subjects_lease(session))
            if holder == self.instance and session not in self.streams:
                sub = await self.bus.subscribe(self.subjects.data("stt", session), self._on_audio)
                self.streams[session] = Stream(sub)
                log.info("took the audio stream of session %s", session)
        if msg.reply:
            await self.bus.nc.publish(msg.reply, orjson.dumps({"owner": holder}))

    def subjects_lease(self, session: str) -> str:
        return self.store.keys.lease("stt", session)

    async def _on_audio(self, subject: str, frame: Frame) -> None:
        session = Subjects.session_of(subject)
        stream = self.streams.get(session)
        if stream is None or frame.kind is not Kind.AUDIO or not self.current(session, frame.epoch):
            return
        stream.last_frame = time.monotonic()
        if frame.has(Flag.START) or frame.epoch != stream.epoch:
            stream.audio.clear()
            stream.epoch, stream.rate, stream.origin_ns = (
                frame.epoch,
                frame.sample_rate,
                frame.origin_ns,
            )
        stream.audio += frame.payload
        if frame.has(Flag.END):
            pcm = bytes(stream.audio)
            stream.audio.clear()
            self.track(session, frame.epoch, self._transcribe(session, frame.epoch, pcm, stream))

    async def _transcribe(self, session: str, epoch: int, pcm: bytes, stream: Stream) -> None:
        cached = await self.router.load(session)
        t0 = time.perf_counter()
        conn, text = await self.chain(cached.config).call_first(
            lambda c: c.transcribe(pcm, stream.rate),  # type: ignore[attr-defined]
        )
        assert isinstance(conn, STTConnector)
        took_ms = (time.perf_counter() - t0) * 1000
        if not self.current(session, epoch):
            return
        await self.notify(
            session,
            {
                "type": "transcript",
                "role": "user",
                "text": text,
                "epoch": epoch,
                "connector": conn.name,
                "stt_ms": round(took_ms, 1),
            },
            epoch=epoch,
        )
        if text:
            out = Frame.text(
                text,
                epoch=epoch,
                flags=Flag.START | Flag.END | Flag.LAST,
                origin_ns=stream.origin_ns,
            )
            await self.router.route_to_next(out, session)

    async def _renew_forever(self) -> None:
        period = self.settings.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session, stream in list(self.streams.items()):
                try:
                    if now - stream.last_frame > IDLE_RELEASE_S:
                        await self._drop(session, release=True)
                    elif not await self.leases.renew(self.subjects_lease(session)):
                        log.warning("lost the lease of session %s", session)
                        await self._drop(session, release=False)
                except Exception as exc:
                    log.warning("lease renewal failed: %s", exc)

    async def _drop(self, session: str, *, release: bool) -> None:
        stream = self.streams.pop(session, None)
        if stream is not None:
            await stream.sub.unsubscribe()
        if release:
            await self.leases.release(self.subjects_lease(session))

    async def session_ended(self, session: str) -> None:
        await super().session_ended(session)
        await self._drop(session, release=True)
