"""One call over the WebSocket transport: caller audio in, turn detection, speech to STT over the
bus; bot audio back in order, resampled, with transcripts and per-turn latency as JSON events.

Frames from the peer: binary = PCM16 mono 16 kHz, raw (any even chunk size up to
MAX_AUDIO_MESSAGE); text = JSON control ({"type": "end"} hangs up). Frames to the peer: binary =
PCM16 mono 16 kHz; text = JSON events. A message in another format (an odd byte count, a WAV file,
an oversized chunk, text that is not a known control message) is dropped whole with an `error`
event naming the expected format; the call goes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from voicemesh.config.connectors import WebSocketTransportOptions
from voicemesh.config.logging import bind
from voicemesh.router import Flag, Frame, Kind, NotFound, Subjects
from voicemesh.router.store import UNREACHABLE
from voicemesh.transport.egress import Reorderer, Resampler
from voicemesh.transport.service import NoInstance
from voicemesh.transport.supervisor import TurnSupervisor
from voicemesh.transport.trace import TurnTrace
from voicemesh.transport.vad import RATE, Rechunker, TurnDetector

if TYPE_CHECKING:
    from voicemesh.transport.service import TransportService

log = logging.getLogger(__name__)

_CLOSE = object()

AUDIO_FORMAT = "PCM16 mono 16 kHz, raw, no WAV header"
# 2 s of audio: browsers send 20-100 ms a message; more in one message is a client bug (a whole
# file) that would otherwise run through VAD and onto the bus as one long utterance at once.
MAX_AUDIO_MESSAGE = 2 * RATE * 2
CONTROL_TYPES = ("end",)


def audio_problem(data: bytes) -> str | None:
    """Why a binary message from the peer is not audio this call takes (None: it is)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return f"binary messages must be audio as {AUDIO_FORMAT}: this one is a WAV file"
    if len(data) % 2:
        return (
            f"binary message of {len(data)} bytes is not whole samples: "
            f"send audio as {AUDIO_FORMAT} (2 bytes a sample)"
        )
    if len(data) > MAX_AUDIO_MESSAGE:
        return (
            f"binary message of {len(data)} bytes is over the {MAX_AUDIO_MESSAGE}-byte limit: "
            f"send audio as {AUDIO_FORMAT}, in chunks of 20-100 ms"
        )
    return None


class Call:
    def __init__(self, service: TransportService, session_id: str, ws: WebSocket):
        self.svc, self.session, self.ws = service, session_id, ws
        self.subjects: Subjects = service.subjects
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.reorder = Reorderer()
        self.resample = Resampler(RATE)
        self.epoch = 0
        self.seq = 0
        self.utterance: list[Frame] = []
        self.trace = TurnTrace(session_id, 0)
        self.supervisor = TurnSupervisor(service, session_id)
        self.ingress = "stt"

    async def run(self) -> None:
        bind(session=self.session)
        cached = await self.svc.router.load(self.session)
        config = cached.config
        transport = config.stage("transport")
        options = (
            config.options("transport", "websocket")
            if "websocket" in transport.chain
            else WebSocketTransportOptions()
        )
        detector, chunker = TurnDetector(options), Rechunker()
        sub = await self.svc.bus.subscribe(
            self.subjects.data("transport", self.session), self._egress
        )
        sender = asyncio.create_task(self._send_loop())
        watcher = asyncio.create_task(self._supervise())
        await self._event(
            {"type": "session", "session_id": self.session, "version": cached.version}
        )
        log.info("call started")
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("bytes") is not None:
                    problem = audio_problem(msg["bytes"])
                    if problem is not None:
                        await self._event({"type": "error", "error": problem})
                        continue
                    for frame in chunker.push(msg["bytes"]):
                        events = detector.push(frame)
                        if detector.last_voiced and (detector.speaking or events):
                            self.trace.voiced()
                        for ev in events:
                            await self._turn_event(ev.kind, ev.frames)
                elif msg.get("text") is not None:
                    try:
                        ctl = orjson.loads(msg["text"])
                    except orjson.JSONDecodeError:
                        await self._event({"type": "error", "error": "text frames must be JSON"})
                        continue
                    kind = ctl.get("type") if isinstance(ctl, dict) else None
                    if kind == "end":
                        break
                    known = ", ".join(f'{{"type": "{t}"}}' for t in CONTROL_TYPES)
                    await self._event(
                        {
                            "type": "error",
                            "error": f"unknown control message {msg['text'][:100]!r}; "
                            f"text frames are JSON control messages: {known}",
                        }
                    )
        except WebSocketDisconnect:
            pass
        except NotFound:
            await self._event({"type": "error", "error": f"session {self.session} has ended"})
            log.info("session deleted or expired during the call")
        except Exception as exc:  # the caller hears why, rather than a dropped socket
            log.exception("call failed")
            await self._event({"type": "error", "error": f"the call failed: {exc}"})
        finally:
            watcher.cancel()
            await sub.unsubscribe()
            self.out.put_nowait(_CLOSE)
            await asyncio.gather(sender, return_exceptions=True)
            await self.svc.bus.publish(
                self.subjects.ctl(self.session), Frame.event({"type": "call_end"})
            )
            log.info("call ended")

    # --- caller → bus ------------------------------------------------------------------------

    async def _turn_event(self, kind: str, frames: tuple[bytes, ...]) -> None:
        if kind == "start":
            # Where caller audio goes is the session's flow's business (stt in every valid flow
            # today); it is re-read per turn so a live config change applies.
            self.ingress = await self.svc.router.next_stage(self.session)
            try:
                self.epoch = await self.svc.store.next_epoch(self.session, at_least=self.epoch + 1)
                valkey_down = False
            except UNREACHABLE as exc:  # number the turn here; Valkey catches up on the next one
                self.epoch, valkey_down = self.epoch + 1, True
                log.warning("Valkey unreachable, turn %d numbered by the call: %s", self.epoch, exc)
            self.reorder.reset(self.epoch)
            self.trace, self.seq = TurnTrace(self.session, self.epoch), 0
            self.supervisor.begin(self.epoch)
            if valkey_down:
                self.supervisor.valkey_lost()
            self.trace.voiced()
            bind(turn=self.epoch, trace_id=self.trace.trace_id)
            self.utterance = []
            await self.svc.bus.publish(
                self.subjects.ctl(self.session),
                Frame.event({"type": "turn", "epoch": self.epoch}, epoch=self.epoch),
            )
            await self._event({"type": "turn", "epoch": self.epoch})
            try:
                await self.svc.ensure_owner(self.ingress, self.session)
            except NoInstance as exc:
                log.error("%s", exc)
                await self._event({"type": "error", "error": str(exc), "epoch": self.epoch})
        for pcm in frames:
            flags = Flag.START if self.seq == 0 else Flag.NONE
            frame = Frame.audio(pcm, sample_rate=RATE, epoch=self.epoch, seq=self.seq, flags=flags)
            self.seq += 1
            self.utterance.append(frame)
            await self.svc.bus.publish(self.subjects.data(self.ingress, self.session), frame)
        if kind == "end":
            end = Frame.audio(b"", sample_rate=RATE, epoch=self.epoch, seq=self.seq, flags=Flag.END)
            self.utterance.append(end)
            self.trace.ended()
            try:
                if await self.svc.ensure_owner(self.ingress, self.session, replay=self.utterance):
                    log.info("stt owner changed: replayed %d frames", len(self.utterance))
                else:
                    await self.svc.bus.publish(self.subjects.data(self.ingress, self.session), end)
            except NoInstance as exc:
                log.error("%s", exc)
                await self._event({"type": "error", "error": str(exc), "epoch": self.epoch})
            self.supervisor.ended(self.utterance)
            self.utterance = []
            await self._event({"type": "user_stopped", "epoch": self.epoch})

    # --- bus → caller ------------------------------------------------------------------------

    async def _egress(self, subject: str, frame: Frame) -> None:
        if frame.kind is Kind.EVENT:
            if frame.epoch >= self.epoch:
                event = frame.as_event
                if frame.epoch == self.trace.epoch:
                    self.trace.on_event(event)
                    self.supervisor.on_event(event, frame.epoch)
                await self._event(event)
            return
        if frame.kind is not Kind.AUDIO:
            return
        for f in self.reorder.push(frame):
            pcm = self.resample(f.payload, f.sample_rate)
            if pcm:
                if f.epoch == self.trace.epoch and self.trace.audio_out():
                    metrics = self.trace.observe()
                    await self._event(
                        {"type": "bot_started", "epoch": f.epoch, "latency_ms": metrics["v2v_ms"]}
                    )
                    await self._event(metrics)
                    log.info(
                        "turn %d: voice-to-voice %s ms",
                        f.epoch,
                        metrics["v2v_ms"],
                        extra={"fields": {**metrics, "session": self.session}},
                    )
                self.out.put_nowait(pcm)
            if f.has(Flag.LAST):
                self.supervisor.reply_done(f.epoch)
                await self._event({"type": "bot_done", "epoch": f.epoch})

    async def _supervise(self) -> None:
        """Every third of a lease TTL, resend the unit the reply waits for if its worker died."""
        while True:
            await asyncio.sleep(self.supervisor.ttl_s / 3)
            try:
                await self.supervisor.check(self.reorder.next_index)
            except asyncio.CancelledError:
                raise
            except UNREACHABLE:
                self.supervisor.valkey_lost()
            except Exception as exc:  # NATS down for a moment: try again next time
                log.warning("turn supervision skipped: %s", exc)

    async def _event(self, body: dict[str, Any]) -> None:
        self.out.put_nowait(orjson.dumps(body).decode())

    async def _send_loop(self) -> None:
        while (item := await self.out.get()) is not _CLOSE:
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_text(item)
            except (WebSocketDisconnect, RuntimeError):
                return
