"""One call, whatever transport carries it (peer.py): caller audio through turn detection onto the
bus towards STT; bot audio back from the bus put in order, resampled, queued and paced out in real
time; barge-in; transcripts and per-turn latency as JSON events (the caller events of
voicemesh/bus/events.py: the call builds each one as its model, and parses what the stages send
beside the flow, dropping with a warning what is not an event of theirs).

A barge-in (the caller speaks over the bot, or while its reply is being generated) drops the queued
bot audio at once, broadcasts `interrupt` on `vm.ctl.<session>` so the LLM and TTS instances cancel
the old turn's work, and stores in the conversation context what the caller actually heard of the
reply rather than what was generated.

All of this is done once, here, for every carrier: a carrier only converts its media (peer.py), so
a call behaves the same over a WebSocket, WebRTC, a phone line or a Daily room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from voicemesh.bus import Flag, Frame, Kind, Subjects
from voicemesh.bus.events import (
    BotDone,
    BotStarted,
    CallEnd,
    CallerEvent,
    End,
    ErrorEvent,
    EventError,
    HangUp,
    Interrupt,
    Interrupted,
    Session,
    Transcript,
    Turn,
    TurnEnded,
    TurnStarted,
    UserStopped,
    parse_ctl_event,
    parse_side_event,
)
from voicemesh.config.connectors import TurnOptions
from voicemesh.config.logging import bind
from voicemesh.config.stages import Stage
from voicemesh.state import NotFound
from voicemesh.state.store import UNREACHABLE, best_effort
from voicemesh.transport.call.audio import FRAME_MS, RATE, Rechunker
from voicemesh.transport.call.egress import Reorderer, Resampler
from voicemesh.transport.call.host import CallHost, NoInstance
from voicemesh.transport.call.limits import (
    RATE_CHECK_BYTES,
    TOO_FAST_CODE,
    AudioRate,
    CallerTooFast,
)
from voicemesh.transport.call.peer import Peer
from voicemesh.transport.call.playout import Playout, truncate
from voicemesh.transport.call.rtvi import Refused
from voicemesh.transport.call.supervisor import Stalled, TurnSupervisor
from voicemesh.transport.call.trace import TurnTrace
from voicemesh.transport.call.turns import TurnDetector

log = logging.getLogger(__name__)

FRAME_S = FRAME_MS / 1000


class Call:
    def __init__(self, service: CallHost, session_id: str, peer: Peer):
        self.svc, self.session, self.peer = service, session_id, peer
        self.subjects: Subjects = service.subjects
        self.reorder = Reorderer()
        self.resample = Resampler(peer.out_rate)
        self.playout = Playout(peer.out_rate, FRAME_MS, max_s=service.settings.playout_max_s)
        self._audio_ready = asyncio.Event()
        self.epoch = 0
        self.seq = 0
        self.utterance: list[Frame] = []
        self.trace = TurnTrace(session_id, 0)
        self.supervisor = TurnSupervisor(service, session_id)
        self.ingress: str = Stage.STT
        #: where caller audio goes, formatted once per turn, not once per 20 ms frame
        self._ingress_subject = self.subjects.data(self.ingress, session_id)
        self.options: TurnOptions = TurnOptions()
        #: the reply being generated or played: its epoch, until its last audio has been played
        self.replying: int | None = None
        self.sentences: dict[int, str] = {}  # the text of that reply, by sentence index
        self._ignoring = False  # a turn spoken over the bot with barge-in off
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ended = asyncio.Event()  # the session was deleted: hang up
        self._abandoned = 0  # the last turn given up for want of a stage instance
        settings = service.settings
        self.rate = AudioRate(settings.caller_audio_max_rate, settings.caller_audio_burst_s)
        self.max_utterance_s = settings.max_utterance_s
        self.detector: TurnDetector | None = None
        #: the caller's turn is open (started, not ended): a reply of its epoch is speculative
        self._turn_open = False
        #: seq of the turn's latest pause mark, to match its speculative transcript
        self._mark_seq: int | None = None
        #: what a speculative reply sent before its turn ended: played (and its events sent)
        #: once the turn ends in that pause, dropped if the caller goes on
        self._held: list[tuple[str, Frame]] = []
        #: the LLM called end_call in this turn: hang up once its reply has been played
        self._hang_up_after: int | None = None
        peer.tap = self._watched

    async def _watched(self, event: CallerEvent) -> None:
        """A copy of a caller event for the console (voicemesh.transport.api.watch), with the
        carrier's name: best effort, a lost copy costs a watcher one line, never the call."""
        body = b'{"transport":"%s","event":%s}' % (self.peer.name.encode(), event.wire_json())
        try:
            # hop: -> voicemesh.transport.api.console.Watch.on_msg (vm.watch.<sid>)
            await self.svc.bus.nc.publish(self.subjects.watch(self.session), body)
        except Exception as exc:  # a closed or slow connection: drop the copy
            log.debug("watch copy dropped: %s", exc)

    @property
    def bot_busy(self) -> bool:
        """The bot is generating or speaking: caller speech now is a barge-in."""
        return self.replying is not None

    async def run(self) -> None:
        bind(session=self.session)
        pacer = watcher = sub = ctl = None
        try:
            cached = await self.svc.router.load(self.session)
            options = cached.config.transport_options(self.peer.name)
            assert isinstance(options, TurnOptions)  # every transport's options extend TurnOptions
            self.options = options
            detector = TurnDetector(self.options, max_utterance_s=self.max_utterance_s)
            self.detector = detector
            chunker = Rechunker()
            # hop: <- voicemesh.pipeline.tts.TTSService._synthesize (vm.transport.<sid>)
            sub = await self.svc.bus.subscribe(
                self.subjects.data(Stage.TRANSPORT, self.session), self._egress
            )
            # hop: <- transport.api.service.TransportService.session_deleted (vm.ctl.<sid>)
            ctl = await self.svc.bus.subscribe(self.subjects.ctl(self.session), self._control)
            pacer = asyncio.create_task(self._pace())
            pacer.add_done_callback(self._pacer_done)
            watcher = asyncio.create_task(self._supervise())
            await self.peer.send_event(Session(session_id=self.session, version=cached.version))
            log.info("call started on %s", self.peer.name)
            # The STT stream is assigned now, not at the first turn: that turn starts sooner,
            # and goes through even if Valkey is down by then (the owner is known). In the
            # background: with no STT instance up, assigning retries for seconds.
            self._spawn(self._assign_early())
            received = 0  # bytes not yet counted against the rate
            while (pcm := await self.peer.receive()) is not None:
                # counted per ~100 ms of audio, not per message: a check per 20 ms frame cost
                # ~5% of this loop (benchmarks/test_micro.py::test_call_frames)
                received += len(pcm)
                if received >= RATE_CHECK_BYTES:
                    self.rate.take(received)
                    received = 0
                for frame in chunker.push(pcm):
                    events = await detector.push(frame, bot_speaking=self.bot_busy)
                    if detector.last_voiced and (detector.speaking or events):
                        self.trace.voiced()
                    for ev in events:
                        await self._turn_event(ev.kind, ev.frames, cut=ev.cut, paused=ev.paused)
            if self._ended.is_set():
                log.info("session deleted during the call: hung up")
        except NotFound:
            await self.peer.send_event(ErrorEvent(error=f"session {self.session} has ended"))
            log.info("session deleted or expired during the call")
        except CallerTooFast as exc:
            log.warning("call refused: %s", exc)
            await self.peer.send_event(ErrorEvent(error=str(exc)))
            self.peer.refuse(TOO_FAST_CODE, "caller audio too fast")
        except Exception as exc:  # the caller hears that it failed, rather than a dropped line
            log.exception("call failed")
            # the exception's own words stay in the log: they may name hosts, paths or values
            name = type(exc).__name__
            await self.peer.send_event(ErrorEvent(error=f"the call failed ({name})"))
        finally:
            for task in (watcher, pacer, *self._tasks):
                if task is not None:
                    task.cancel()
            for subscription in (sub, ctl):
                if subscription is not None:
                    await subscription.unsubscribe()
            await asyncio.gather(
                *(t for t in (watcher, pacer, *self._tasks) if t), return_exceptions=True
            )
            # hop: -> voicemesh.pipeline.base.StageService._on_ctl (vm.ctl.<sid>)
            await self.svc.bus.publish(self.subjects.ctl(self.session), Frame.event(CallEnd()))
            await self.peer.close()
            log.info("call ended")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _assign_early(self) -> None:
        try:
            self._set_ingress(await self.svc.router.next_stage(self.session))
            await self.svc.ensure_owner(self.ingress, self.session)
        except Exception as exc:  # NATS or Valkey away, no instance up: the first turn retries
            log.warning("no %s owner yet (the first turn tries again): %s", self.ingress, exc)

    async def _control(self, subject: str, frame: Frame) -> None:
        """The session was deleted (`end` on `vm.ctl`): tell the caller, then hang up."""
        if frame.kind is not Kind.EVENT:
            return
        try:
            event = parse_ctl_event(frame.payload)
        except EventError as exc:
            log.warning("dropped an event on %s: %s", subject, exc)
            return
        if isinstance(event, End) and not self._ended.is_set():
            self._ended.set()
            await self.peer.send_event(ErrorEvent(error=f"session {self.session} was deleted"))
            self.peer.hang_up()

    # --- caller → bus ------------------------------------------------------------------------

    async def _turn_event(
        self, kind: str, frames: tuple[bytes, ...], *, cut: bool = False, paused: bool = False
    ) -> None:
        if kind == "resume" and self.options.speculative_reply and not self._ignoring:
            await self._resume_turn()
        if kind == "start":
            if self.bot_busy and not self.options.barge_in:
                self._ignoring = True  # half duplex: speech over the bot is not a turn
                return
            if self.bot_busy:
                await self._interrupt()
            await self._start_turn()
        if self._ignoring:
            self._ignoring = kind != "end"
            return
        for pcm in frames:
            flags = Flag.START if self.seq == 0 else Flag.NONE
            frame = Frame.audio(pcm, sample_rate=RATE, epoch=self.epoch, seq=self.seq, flags=flags)
            self.seq += 1
            self.utterance.append(frame)
            # hop: -> voicemesh.pipeline.stt.STTService._on_audio (vm.stt.<sid>)
            await self.svc.bus.publish(self._ingress_subject, frame)
        if kind == "pause":
            await self._mark_pause()
        if kind == "end":
            await self._end_turn(cut=cut, paused=paused)

    async def _mark_pause(self) -> None:
        """The caller paused: mark the point on the audio stream itself, so STT knows exactly
        which audio came before it, and may transcribe that while the end of turn is decided.
        The mark takes a seq like any frame of the utterance (a pass-through flow relays it to
        the reorderer, which must see no gap) and is replayed with it."""
        flags = Flag.PAUSE | (Flag.SPECULATE if self.options.speculative_reply else Flag.NONE)
        mark = Frame.audio(b"", sample_rate=RATE, epoch=self.epoch, seq=self.seq, flags=flags)
        self._mark_seq = self.seq
        self.seq += 1
        self.utterance.append(mark)
        # hop: -> voicemesh.pipeline.stt.STTService._on_audio (vm.stt.<sid>)
        await self.svc.bus.publish(self._ingress_subject, mark)

    async def _start_turn(self, *, continues: int | None = None) -> None:
        # Where caller audio goes is the session's flow's business (stt in every valid flow
        # today); it is re-read per turn so a live config change applies.
        self._set_ingress(await self.svc.router.next_stage(self.session))
        try:
            self.epoch = await self.svc.store.next_epoch(self.session, at_least=self.epoch + 1)
            valkey_down = False
        except UNREACHABLE as exc:  # number the turn here; Valkey catches up on the next one
            self.epoch, valkey_down = self.epoch + 1, True
            log.warning("Valkey unreachable, turn %d numbered by the call: %s", self.epoch, exc)
        self.reorder.reset(self.epoch)
        self._turn_open, self._mark_seq, self._held = True, None, []
        self.trace, self.seq = TurnTrace(self.session, self.epoch), 0
        self.supervisor.begin(self.epoch)
        if valkey_down:
            self.supervisor.valkey_lost()
        self.trace.voiced()
        bind(turn=self.epoch, trace_id=self.trace.trace_id)
        self.utterance = []
        # hop: -> voicemesh.pipeline.base.StageService._on_ctl (vm.ctl.<sid>)
        await self.svc.bus.publish(
            self.subjects.ctl(self.session),
            Frame.event(Turn(epoch=self.epoch), epoch=self.epoch),
        )
        await self.peer.send_event(TurnStarted(epoch=self.epoch, continues=continues))
        # In the background: with no instance up, assigning waits up to stage_wait_ms, and the
        # caller's audio must keep flowing meanwhile (the end of the turn replays it anyway).
        self._spawn(self._own_ingress(self.epoch))

    def _set_ingress(self, stage: str) -> None:
        self.ingress = stage
        self._ingress_subject = self.subjects.data(stage, self.session)

    async def _own_ingress(self, epoch: int) -> None:
        try:
            await self.svc.ensure_owner(self.ingress, self.session)
        except NoInstance as exc:
            await self._abandon(Stalled(self.ingress, epoch, str(exc)))

    async def _end_turn(self, *, cut: bool = False, paused: bool = False) -> None:
        # END|LAST: the utterance is the turn's one unit, so a flow that relays it unchanged
        # (pass-through stages) brings back a complete reply, not one waiting for more.
        # PAUSE: nothing voiced since the last mark, so STT's transcript of the audio up to that
        # mark is the utterance's (the VAD knows; STT would have to guess from the audio).
        flags = Flag.END | Flag.LAST | (Flag.PAUSE if paused else Flag.NONE)
        end = Frame.audio(b"", sample_rate=RATE, epoch=self.epoch, seq=self.seq, flags=flags)
        self.utterance.append(end)
        self.trace.ended()
        self.replying, self.sentences = self.epoch, {}
        self._turn_open = False
        self.supervisor.ended(self.utterance)
        self._spawn(self._hand_over(self.epoch, self.utterance, end))
        self.utterance = []
        if cut:
            log.warning(
                "turn %d cut at the %g s utterance limit (VOICEMESH_MAX_UTTERANCE_S)",
                self.epoch,
                self.max_utterance_s,
            )
        stopped = UserStopped(epoch=self.epoch, reason="max_utterance" if cut else None)
        await self.peer.send_event(stopped)
        if paused and self.options.speculative_reply:
            # the reply made at this pause is the turn's: the LLM may store it now
            # hop: -> voicemesh.pipeline.base.StageService._on_ctl (vm.ctl.<sid>)
            await self.svc.bus.publish(
                self.subjects.ctl(self.session),
                Frame.event(TurnEnded(epoch=self.epoch), epoch=self.epoch),
            )
        held, self._held = self._held, []
        for subject, frame in held:
            await self._egress(subject, frame)

    async def _resume_turn(self) -> None:
        """The caller went on after a pause where a speculative reply may have started. The
        turn moves to a new epoch, so every stage drops the old one's work (the reply included)
        as for any newer turn, and the new epoch's audio begins with everything said so far:
        STT transcribes the whole utterance at its end."""
        said = [f.payload for f in self.utterance if f.payload]
        old = self.epoch
        self._held = []
        await self._start_turn(continues=old)
        log.info("caller went on after a pause: turn %d moved to %d", old, self.epoch)
        await self._turn_event("audio", tuple(said))

    async def _hand_over(self, epoch: int, utterance: list[Frame], end: Frame) -> None:
        """Send the utterance's end to its owner, or all of it to a new owner; in the background,
        since finding an owner may wait up to stage_wait_ms while the caller goes on speaking."""
        try:
            if await self.svc.ensure_owner(self.ingress, self.session, replay=utterance):
                log.info("stt owner changed: replayed %d frames", len(utterance))
            else:
                # hop: -> voicemesh.pipeline.stt.STTService._on_audio (vm.stt.<sid>)
                await self.svc.bus.publish(self._ingress_subject, end)
        except NoInstance as exc:
            await self._abandon(Stalled(self.ingress, epoch, str(exc)))

    async def text_turn(self, text: str) -> int:
        """A typed user turn (RTVI `send-text`): numbered and announced on `vm.ctl` like a spoken
        one, a barge-in if the bot is busy, and its text sent to the stage after STT in the flow
        exactly as STT sends a final transcript, so the reply takes the same LLM → TTS path and
        is supervised the same way. Returns the turn's epoch."""
        if self._turn_open:  # its audio would go on under the typed turn's epoch
            raise Refused("the caller is speaking: send the text once the turn has ended")
        if self.bot_busy:
            await self._interrupt()
        try:
            self.epoch = await self.svc.store.next_epoch(self.session, at_least=self.epoch + 1)
        except UNREACHABLE as exc:
            self.epoch += 1
            log.warning("Valkey unreachable, typed turn %d numbered here: %s", self.epoch, exc)
        epoch = self.epoch
        self.reorder.reset(epoch)
        self._mark_seq, self._held = None, []  # a typed turn is over as it starts: nothing held
        self.trace, self.seq, self.utterance = TurnTrace(self.session, epoch), 0, []
        self.trace.ended()  # a typed turn has no speech: its latency counts from its arrival
        self.supervisor.begin(epoch)
        self.supervisor.ended([])
        self.replying, self.sentences = epoch, {}
        bind(turn=epoch, trace_id=self.trace.trace_id)
        # hop: -> voicemesh.pipeline.base.StageService._on_ctl (vm.ctl.<sid>)
        await self.svc.bus.publish(
            self.subjects.ctl(self.session), Frame.event(Turn(epoch=epoch), epoch=epoch)
        )
        said = Transcript(role="user", text=text, epoch=epoch, final=True, connector="text")
        self.supervisor.on_event(said, epoch)
        await self.peer.send_event(said)
        config = (await self.svc.router.load(self.session)).config
        target = config.next_hop(Stage.STT, "text") or config.next_hop(Stage.TRANSPORT, "text")
        if target is None:
            raise NoInstance(f"the flow of session {self.session} has no stage that takes text")
        # hop: -> voicemesh.pipeline.llm.LLMService._on_text (vm.llm.<sid>, default flow)
        await self.svc.bus.publish(
            self.subjects.data(target, self.session),
            Frame.text(text, epoch=epoch, flags=Flag.START | Flag.END | Flag.LAST),
        )
        log.info("typed turn %d sent to %s", epoch, target)
        return epoch

    async def append_context(self, messages: list[dict[str, Any]]) -> None:
        """Store messages in the session's conversation context (RTVI `append-to-context`)."""
        await self.svc.store.append_context(self.session, *messages)

    async def _abandon(self, stalled: Stalled) -> None:
        """No instance took the turn's work in time: tell the caller which stage is missing, say
        it once in the log, and close the turn so the next one starts clean (not a barge-in)."""
        if stalled.epoch <= self._abandoned:
            return  # both the hand-over and the supervisor may find it: one error is enough
        self._abandoned = stalled.epoch
        if self.supervisor.turn is not None and self.supervisor.turn.epoch == stalled.epoch:
            self.supervisor.turn.complete = True  # nothing more of it is resent
        log.error("turn %d given up: %s", stalled.epoch, stalled.error)
        await self.peer.send_event(
            ErrorEvent(error=stalled.error, stage=Stage(stalled.stage), epoch=stalled.epoch)
        )
        if self.replying == stalled.epoch:
            # whatever of the reply was queued still plays; the reply ends after it
            self.playout.end_reply(stalled.epoch)
            self._audio_ready.set()

    async def _interrupt(self) -> None:
        """Cut the bot off: nothing more of its reply is played from this instant, the stages drop
        the old turn's work, and the context keeps what the caller heard."""
        old = self.replying if self.replying is not None else self.epoch
        self.reorder.done = True  # late frames of the old reply are not queued any more
        heard = self.playout.clear(old)
        self.resample.reset()
        self.peer.interrupted()
        self.replying = None
        said = truncate(self.sentences, heard)
        log.info("barge-in: turn %d cut off after %r", old, said)
        # hop: -> voicemesh.pipeline.base.StageService._on_ctl (vm.ctl.<sid>)
        await self.svc.bus.publish(
            self.subjects.ctl(self.session),
            Frame.event(Interrupt(epoch=old + 1, interrupted=old), epoch=old),
        )
        await self.peer.send_event(Interrupted(epoch=old, heard=said))
        entry = {"role": "assistant", "content": said, "interrupted": True}
        write = self.svc.store.put_reply(self.session, old, entry, force=True)
        self._spawn(best_effort("storing the cut-off reply", write, False))

    # --- bus → caller ------------------------------------------------------------------------

    async def _egress(self, subject: str, frame: Frame) -> None:
        if frame.kind is Kind.EVENT:
            if frame.epoch >= self.epoch:
                try:
                    event = parse_side_event(frame.payload)
                except EventError as exc:
                    log.warning("dropped an event on %s: %s", subject, exc)
                    return
                if frame.epoch == self.epoch and self._turn_open:
                    match event:
                        case Transcript(role="user", final=False, speculative=True, pause=mark):
                            if mark is not None and mark == self._mark_seq and self.detector:
                                self.detector.heard(event.text)
                            if not event.text:
                                return  # no speculation was made at that mark: nothing to show
                        case Transcript(role="user"):
                            pass
                        case _:  # a speculative reply's: not before the turn ends there
                            self._held.append((subject, frame))
                            return
                if frame.epoch == self.replying:
                    match event:
                        case Transcript(role="user", text="", final=True):
                            self.replying = None  # nothing was heard: no reply is coming
                if frame.epoch == self.trace.epoch:
                    self.trace.on_event(event)
                    self.supervisor.on_event(event, frame.epoch)
                    match event:
                        case Transcript(role="assistant", index=index, text=text) if (
                            frame.epoch == self.replying
                        ):
                            self.sentences[len(self.sentences) if index is None else index] = text
                await self.peer.send_event(event)
                if isinstance(event, HangUp):
                    self._hang_up_when_played(event.epoch)
            return
        if frame.kind is not Kind.AUDIO:
            return
        if frame.epoch == self.epoch and self._turn_open:
            self._held.append((subject, frame))  # a speculative reply's: not before the turn ends
            return
        await self._play(self.reorder.push(frame))

    async def _play(self, frames: list[Frame]) -> None:
        """Queue bot audio now in order for the caller."""
        for f in frames:
            pcm = self.resample(f.payload, f.sample_rate)
            if pcm:
                if f.epoch == self.trace.epoch and self.trace.audio_out():
                    metrics = self.trace.record()
                    await self.peer.send_event(BotStarted(epoch=f.epoch, latency_ms=metrics.v2v_ms))
                    await self.peer.send_event(metrics)
                    log.info(
                        "turn %d: voice-to-voice %s ms",
                        f.epoch,
                        metrics.v2v_ms,
                        extra={"fields": {**metrics.wire(), "session": self.session}},
                    )
                self.playout.push(pcm, epoch=f.epoch, index=f.index)
            if f.has(Flag.END):
                self.playout.end_sentence(epoch=f.epoch, index=f.index)
            if f.has(Flag.LAST):
                if tail := self.resample.flush():
                    self.playout.push(tail, epoch=f.epoch, index=f.index)
                self.supervisor.reply_done(f.epoch)
                self.playout.end_reply(f.epoch)
            self._audio_ready.set()

    async def _pace(self) -> None:
        """Send queued bot audio one frame per 20 ms on an absolute clock (no drift), up to the
        peer's lead ahead of it; announce each reply's end once its last frame is out."""
        silence = bytes(self.playout.frame_bytes)
        lead = self.peer.lead_frames * FRAME_S
        clock = time.monotonic()
        while True:
            played = self.playout.pull()
            idle = played.pcm is None and not self.peer.continuous
            if not idle:
                await self.peer.send_audio(played.pcm if played.pcm is not None else silence)
            for epoch in played.finished:
                await self._reply_played(epoch)
            if idle:
                self._audio_ready.clear()
                if not self.playout.ready:  # checked after clear(): no wake-up is lost
                    await self._audio_ready.wait()
                clock = max(clock, time.monotonic())
                continue
            clock += FRAME_S
            delay = clock - lead - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.2:  # fell behind (a stalled loop): resync rather than burst
                clock = time.monotonic()

    def _pacer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("bot audio stopped: the pacer failed", exc_info=exc)

    async def _reply_played(self, epoch: int) -> None:
        if epoch == self.replying:
            self.replying = None
            self.sentences = {}
        self.playout.forget(epoch)
        await self.peer.send_event(BotDone(epoch=epoch))
        if epoch == self._hang_up_after:
            # after the frames the peer holds ahead of the clock have been heard too
            asyncio.get_running_loop().call_later(
                self.peer.lead_frames * FRAME_S, self.peer.hang_up
            )

    def _hang_up_when_played(self, epoch: int) -> None:
        """end_call (the LLM stage's `hang_up` event): hang up after reply `epoch`, at once if
        it has been played already; a newer turn (the caller spoke over it) keeps the call."""
        if epoch == self.replying:
            self._hang_up_after = epoch
        elif epoch == self.epoch and self.replying is None:
            self.peer.hang_up()

    async def _supervise(self) -> None:
        """Every fifth of a lease TTL, resend the unit the reply waits for if its worker died:
        the gap a dead worker costs is the claim's lapse plus up to one of these periods."""
        while True:
            await asyncio.sleep(self.supervisor.ttl_s / 5)
            # a frame of the reply lost on the way holds up the rest no longer than this
            await self._play(self.reorder.expire())
            try:
                if stalled := await self.supervisor.check(self.reorder.next_index):
                    await self._abandon(stalled)
            except asyncio.CancelledError:
                raise
            except UNREACHABLE:
                self.supervisor.valkey_lost()
            except Exception as exc:  # NATS down for a moment: try again next time
                log.warning("turn supervision skipped: %s", exc)
