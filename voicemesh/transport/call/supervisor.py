"""The transport supervises each call's turn so that a stage instance dying mid-work costs a
short gap, not the turn, and a stage with no instance at all costs a clear error, not silence.

Every unit of work is claimed in Valkey by the instance doing it (voicemesh.state.claims). For
the turn in progress, the supervisor looks every fifth of a lease TTL (Call._supervise) at the
unit the reply is waiting for: the utterance (STT lease), the LLM turn, or the next sentence (TTS
claim). A unit with no claim a lease TTL after it was sent has lost its worker, so it is sent
again: the utterance is replayed to a new STT owner, the LLM turn resumes after the sentences
already sent, a sentence is synthesized again (the reorderer skips what was already heard).

A unit that no instance has taken for `stage_wait_ms` (resends included) is given up: `check`
returns a Stalled naming the stage, and the call tells the caller and closes the turn. A role that
`voicemesh up` restarts within that time picks the resent unit up, so the turn goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.errors import NoRespondersError

from voicemesh.bus import Flag, Frame
from voicemesh.bus.events import Event, SideEvent, Transcript, parse_side_event
from voicemesh.config.stages import Stage
from voicemesh.state.claims import DONE
from voicemesh.transport.call.host import CallHost, NoInstance

log = logging.getLogger(__name__)


@dataclass
class TurnWork:
    epoch: int
    utterance: list[Frame] = field(default_factory=list)
    ended_at: float | None = None
    user_text: str | None = None
    sent_at: dict[str, float] = field(default_factory=dict)  # unit -> when (re)sent or seen
    claimed: set[str] = field(default_factory=set)  # units seen claimed since last (re)sent
    #: unit -> since when it has waited for a taker (no claim or lease seen); cleared by one
    unclaimed: dict[str, float] = field(default_factory=dict)
    taken_once: set[str] = field(default_factory=set)  # units seen taken at least once
    resent: set[str] = field(default_factory=set)  # units resent (and logged) this turn
    complete: bool = False
    #: Valkey was unreachable during the turn, so its units may have been taken without a claim:
    #: a missing claim proves nothing, and resending could say the reply twice
    unsupervised: bool = False
    #: the transport's bus reconnects seen so far (Bus.reconnects) and, after a newer one, when
    #: its lost frames were last resent (see TurnSupervisor._recover)
    reconnects: int = 0
    lossy_since: float | None = None


@dataclass(frozen=True)
class Stalled:
    """No instance of `stage` took the turn's work in time: the turn is over, with `error`."""

    stage: str
    epoch: int
    error: str


class TurnSupervisor:
    def __init__(self, service: CallHost, session: str):
        self.svc, self.session = service, session
        self.ttl_s = service.settings.lease_ttl_ms / 1000
        self.wait_s = service.settings.stage_wait_ms / 1000
        self.claims = service.store.claims(
            owner=Stage.TRANSPORT, ttl_ms=service.settings.lease_ttl_ms
        )
        self.turn: TurnWork | None = None
        self.redeliveries = 0

    def begin(self, epoch: int) -> None:
        self.turn = TurnWork(epoch, reconnects=self.svc.bus.reconnects)

    def ended(self, utterance: list[Frame]) -> None:
        if self.turn is not None:
            self.turn.utterance, self.turn.ended_at = list(utterance), time.monotonic()

    def on_event(self, event: SideEvent | Mapping[str, Any], epoch: int) -> None:
        """A stage's event of turn `epoch` (a mapping is parsed first: EventError if bad)."""
        t = self.turn
        if t is None or epoch != t.epoch:
            return
        match event if isinstance(event, Event) else parse_side_event(event):
            case Transcript(role="user", final=final, text=text) if final is not False:
                t.user_text = text
                t.sent_at[Stage.LLM] = time.monotonic()
                if not t.user_text:
                    t.complete = True  # nothing understood: no reply to wait for

    def valkey_lost(self) -> None:
        """Valkey could not be reached: stop resending this turn's units (see TurnWork)."""
        if self.turn is not None and not self.turn.unsupervised:
            self.turn.unsupervised = True
            log.warning("turn %d: Valkey unreachable, its work is not redelivered", self.turn.epoch)

    def reply_done(self, epoch: int) -> None:
        if self.turn is not None and self.turn.epoch == epoch:
            self.turn.complete = True

    def _taken(self, unit: str) -> None:
        assert self.turn is not None
        self.turn.unclaimed.pop(unit, None)
        self.turn.taken_once.add(unit)

    def _untaken(self, unit: str, now: float, since: float | None = None) -> bool:
        """Note that `unit` has no taker; True once it has waited longer than the bound. It
        waits from `since` (when it was sent) or, if a worker had taken it, from now (the
        worker's claim has just lapsed)."""
        t = self.turn
        assert t is not None
        start = now if since is None or unit in t.taken_once else since
        first = t.unclaimed.setdefault(unit, start)
        return now - first > self.wait_s

    def _resending(self, unit: str, what: str) -> None:
        """Say a unit is sent again once per turn: resending every lease TTL while no instance
        runs filled the log with one line every 2 s, and the first line says all of it."""
        t = self.turn
        assert t is not None
        first = unit not in t.resent
        t.resent.add(unit)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "turn %d: %s (for up to %g s)",
            t.epoch,
            what,
            self.wait_s,
        )

    async def stalled(self, stage: str, reason: str | None = None) -> Stalled:
        """Give the turn up (nothing of it is resent again) and say why, in the caller's words:
        whether any instance of the stage is running at all is one health ping away."""
        t = self.turn
        assert t is not None
        t.complete = True
        if reason is None:
            try:
                await self.svc.bus.nc.request(
                    self.svc.subjects.health(stage), b"{}", timeout=min(1.0, self.wait_s)
                )
                reason = f"no {stage} instance took turn {t.epoch} within {self.wait_s:g} s"
            except NoRespondersError:
                reason = f"no {stage} instance is running"
            except Exception:  # timed out: instances may exist but none answers
                reason = f"no {stage} instance answered within {self.wait_s:g} s"
        return Stalled(stage, t.epoch, reason)

    def _stale(self, unit: str, now: float, since: float | None = None) -> bool:
        t = self.turn
        assert t is not None
        first = t.sent_at.setdefault(unit, since if since is not None else now)
        return now - first > self.ttl_s

    async def check(self, next_index: int) -> Stalled | None:
        """Resend the unit the reply is waiting for if its worker is gone; give the turn up
        (a Stalled) if no instance has taken it for `stage_wait_ms`."""
        t = self.turn
        if t is None or t.complete or t.unsupervised or t.ended_at is None:
            return None
        config = await self.svc.router.load_config(self.session)
        if (
            config.next_hop(Stage.STT, "text") != Stage.LLM
            or config.next_hop(Stage.LLM, "text") != Stage.TTS
        ):
            return None  # supervision knows the standard flow only
        now = time.monotonic()
        if await self._recover(t, now, next_index):
            return None
        if t.user_text is None:  # waiting for STT: its lease tells whether its owner lives
            holder = await self.svc.store.lease_holder(Stage.STT, self.session)
            if holder is not None:
                self._taken(Stage.STT)
                return None
            if self._untaken(Stage.STT, now, t.ended_at):
                return await self.stalled(Stage.STT)
            if self._stale(Stage.STT, now, t.ended_at):
                self._resending(Stage.STT, "the STT owner is gone; replaying the utterance")
                try:
                    await self.svc.ensure_owner(Stage.STT, self.session, replay=t.utterance)
                except NoInstance as exc:  # it waited the bound already
                    return await self.stalled(Stage.STT, str(exc))
                t.sent_at[Stage.STT] = now
                self.redeliveries += 1
            return None
        llm = await self.claims.state(self.claims.key(Stage.LLM, self.session, t.epoch))
        if llm is None:
            if self._untaken(Stage.LLM, now, t.sent_at.get(Stage.LLM)):
                return await self.stalled(Stage.LLM)
            if self._stale(Stage.LLM, now):
                self._resending(Stage.LLM, "no LLM instance holds the turn; sending it again")
                await self._send(
                    Stage.LLM,
                    Frame.text(t.user_text, epoch=t.epoch, flags=Flag.START | Flag.END | Flag.LAST),
                )
                t.sent_at[Stage.LLM] = now
            return None
        self._taken(Stage.LLM)
        if not llm.startswith(f"{DONE}:"):
            return None  # a live instance is generating
        sentences = int(llm.split(":", 1)[1])
        if next_index > sentences:
            return None
        key = self.claims.key(Stage.TTS, self.session, t.epoch, next_index)
        unit = f"tts{next_index}"
        if await self.claims.state(key) is not None:
            t.claimed.add(unit)
            self._taken(unit)
            return None
        if self._untaken(unit, now):
            return await self.stalled(Stage.TTS)
        # a claim seen alive and now gone lapsed a full TTL after its worker's last renewal: the
        # worker is dead, no need to wait another TTL; a unit never seen claimed gets one TTL
        if unit not in t.claimed and not self._stale(unit, now):
            return None
        t.claimed.discard(unit)
        progress = await self.claims.progress(self.session, t.epoch)
        if next_index < sentences:
            if next_index >= len(progress):
                return None
            frame = Frame.text(
                progress[next_index], epoch=t.epoch, index=next_index, flags=Flag.START | Flag.END
            )
        else:
            frame = Frame.text("", epoch=t.epoch, index=next_index, flags=Flag.END | Flag.LAST)
        self._resending(unit, f"sentence {next_index} has no TTS worker; sending it again")
        await self._send(Stage.TTS, frame)
        t.sent_at[f"tts{next_index}"] = now
        return None

    async def _recover(self, t: TurnWork, now: float, next_index: int) -> bool:
        """The transport's NATS connection dropped and came back during the turn (its cluster
        node died): what the stages sent it meanwhile is gone, though their claims say done, so
        claims prove nothing. Half a lease TTL after the reconnect (or after the last resend)
        with the reply still waiting, resend what it waits for: the utterance to the STT owner
        (it starts the stream over), or each sentence from the next one on whose TTS claim says
        done (reopened first, so a TTS instance takes it again; the reorderer drops what was
        heard already). True if something was resent."""
        bus = self.svc.bus
        if bus.reconnects != t.reconnects:
            t.reconnects, t.lossy_since = bus.reconnects, bus.reconnected_at
        if t.lossy_since is None or now - t.lossy_since < self.ttl_s / 2:
            return False
        t.lossy_since = now
        if t.user_text is None:
            if not t.utterance:
                return False
            self._resending(Stage.STT, "NATS reconnected: replaying the utterance to STT")
            subject = self.svc.subjects.data(Stage.STT, self.session)
            for frame in t.utterance:
                # hop: -> voicemesh.pipeline.stt.STTService._on_audio (vm.stt.<sid>, the replay)
                await bus.publish(subject, frame)
            self.redeliveries += 1
            return True
        llm = await self.claims.state(self.claims.key(Stage.LLM, self.session, t.epoch))
        if llm is None:
            return False  # no claim: the LLM turn is resent by the usual rule
        sentences = int(llm.split(":", 1)[1]) if llm.startswith(f"{DONE}:") else None
        progress = await self.claims.progress(self.session, t.epoch)
        last = sentences if sentences is not None else len(progress) - 1
        resent = False
        for index in range(next_index, last + 1):
            key = self.claims.key(Stage.TTS, self.session, t.epoch, index)
            if not await self.claims.reopen(key):
                continue  # not finished: a live worker holds it, or nobody took it yet
            if index < len(progress):
                frame = Frame.text(
                    progress[index], epoch=t.epoch, index=index, flags=Flag.START | Flag.END
                )
            else:
                frame = Frame.text("", epoch=t.epoch, index=index, flags=Flag.END | Flag.LAST)
            self._resending(f"tts{index}", "NATS reconnected: sending finished sentences again")
            await self._send(Stage.TTS, frame)
            t.sent_at[f"tts{index}"] = now
            resent = True
        return resent

    async def _send(self, stage: str, frame: Frame) -> None:
        self.redeliveries += 1
        # hop: -> voicemesh.pipeline.{llm,tts} LLMService/TTSService._on_text (vm.<stage>.<sid>)
        await self.svc.bus.publish(self.svc.subjects.data(stage, self.session), frame)
