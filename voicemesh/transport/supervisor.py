"""The transport supervises each call's turn so that a stage instance dying mid-work costs a
short gap, not the turn.

Every unit of work is claimed in Valkey by the instance doing it (voicemesh.state.claims). For
the turn in progress, the supervisor looks every third of a lease TTL at the unit the reply is
waiting for: the utterance (STT lease), the LLM turn, or the next sentence (TTS claim). A unit
with no claim a lease TTL after it was sent has lost its worker, so it is sent again: the
utterance is replayed to a new STT owner, the LLM turn resumes after the sentences already sent,
a sentence is synthesized again (the reorderer skips what was already heard).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voicemesh.bus import Flag, Frame
from voicemesh.state.claims import DONE

if TYPE_CHECKING:
    from voicemesh.transport.service import TransportService

log = logging.getLogger(__name__)


@dataclass
class TurnWork:
    epoch: int
    utterance: list[Frame] = field(default_factory=list)
    ended_at: float | None = None
    user_text: str | None = None
    sent_at: dict[str, float] = field(default_factory=dict)  # unit -> when (re)sent or seen
    claimed: set[str] = field(default_factory=set)  # units seen claimed since last (re)sent
    complete: bool = False
    #: Valkey was unreachable during the turn, so its units may have been taken without a claim:
    #: a missing claim proves nothing, and resending could say the reply twice
    unsupervised: bool = False


class TurnSupervisor:
    def __init__(self, service: TransportService, session: str):
        self.svc, self.session = service, session
        self.ttl_s = service.settings.lease_ttl_ms / 1000
        self.claims = service.store.claims(owner="transport", ttl_ms=service.settings.lease_ttl_ms)
        self.turn: TurnWork | None = None
        self.redeliveries = 0

    def begin(self, epoch: int) -> None:
        self.turn = TurnWork(epoch)

    def ended(self, utterance: list[Frame]) -> None:
        if self.turn is not None:
            self.turn.utterance, self.turn.ended_at = list(utterance), time.monotonic()

    def on_event(self, event: dict[str, Any], epoch: int) -> None:
        t = self.turn
        if t is None or epoch != t.epoch:
            return
        if event.get("type") == "transcript" and event.get("role") == "user":
            if event.get("final", True):
                t.user_text = event.get("text") or ""
                t.sent_at["llm"] = time.monotonic()
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

    def _stale(self, unit: str, now: float, since: float | None = None) -> bool:
        t = self.turn
        assert t is not None
        first = t.sent_at.setdefault(unit, since if since is not None else now)
        return now - first > self.ttl_s

    async def check(self, next_index: int) -> None:
        """Resend the unit the reply is waiting for if its worker is gone."""
        t = self.turn
        if t is None or t.complete or t.unsupervised or t.ended_at is None:
            return
        config = await self.svc.router.load_config(self.session)
        if config.next_hop("stt", "text") != "llm" or config.next_hop("llm", "text") != "tts":
            return  # supervision knows the standard flow only
        now = time.monotonic()
        if t.user_text is None:  # waiting for STT: its lease tells whether its owner lives
            holder = await self.svc.store.lease_holder("stt", self.session)
            if holder is None and self._stale("stt", now, t.ended_at):
                log.warning("turn %d: the STT owner is gone; replaying the utterance", t.epoch)
                await self.svc.ensure_owner("stt", self.session, replay=t.utterance)
                t.sent_at["stt"] = now
                self.redeliveries += 1
            return
        llm = await self.claims.state(self.claims.key("llm", self.session, t.epoch))
        if llm is None:
            if self._stale("llm", now):
                log.warning("turn %d: no LLM instance holds the turn; sending it again", t.epoch)
                await self._send(
                    "llm",
                    Frame.text(t.user_text, epoch=t.epoch, flags=Flag.START | Flag.END | Flag.LAST),
                )
                t.sent_at["llm"] = now
            return
        if not llm.startswith(f"{DONE}:"):
            return  # a live instance is generating
        sentences = int(llm.split(":", 1)[1])
        if next_index > sentences:
            return
        key = self.claims.key("tts", self.session, t.epoch, next_index)
        unit = f"tts{next_index}"
        if await self.claims.state(key) is not None:
            t.claimed.add(unit)
            return
        # a claim seen alive and now gone lapsed a full TTL after its worker's last renewal: the
        # worker is dead, no need to wait another TTL; a unit never seen claimed gets one TTL
        if unit not in t.claimed and not self._stale(unit, now):
            return
        t.claimed.discard(unit)
        progress = await self.claims.progress(self.session, t.epoch)
        if next_index < sentences:
            if next_index >= len(progress):
                return
            frame = Frame.text(
                progress[next_index], epoch=t.epoch, index=next_index, flags=Flag.START | Flag.END
            )
        else:
            frame = Frame.text("", epoch=t.epoch, index=next_index, flags=Flag.END | Flag.LAST)
        log.warning("turn %d: sentence %d has no TTS worker; sending it again", t.epoch, next_index)
        await self._send("tts", frame)
        t.sent_at[f"tts{next_index}"] = now

    async def _send(self, stage: str, frame: Frame) -> None:
        self.redeliveries += 1
        # hop: -> voicemesh.pipeline.{llm,tts} LLMService/TTSService._on_text (vm.<stage>.<sid>)
        await self.svc.bus.publish(self.svc.subjects.data(stage, self.session), frame)
