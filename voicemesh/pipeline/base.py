"""The stage roles' bases. StageService adds to Role (voicemesh/role.py) what every stage needs:
turn epochs followed from `vm.ctl.*`, with work a newer turn made stale cancelled; claims on units
of work; the connector pool, with the default agent's engines loaded and proven before the stage
answers health; and an intake that ends first on shutdown, so in-flight work drains and no new
work starts. QueuedStage is the stateless stage (llm, tts): any instance takes a unit of work from
the queue group, and a claim in Valkey makes a redelivered unit run once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Coroutine, Mapping
from types import MappingProxyType
from typing import Any

from voicemesh.bus import Frame, Kind, Subjects, tracing
from voicemesh.bus.events import (
    CallEnd,
    End,
    EventError,
    Interrupt,
    SideEvent,
    Turn,
    TurnEnded,
    WarningEvent,
    parse_ctl_event,
)
from voicemesh.bus.subjects import trace_id
from voicemesh.config.connectors import ConnectorOptions
from voicemesh.config.logging import bind
from voicemesh.config.models import AgentConfig
from voicemesh.config.settings import Settings
from voicemesh.config.stages import Stage
from voicemesh.connectors.errors import ConnectorError
from voicemesh.connectors.fallback import Chain
from voicemesh.connectors.health import HealthBoard, fingerprint
from voicemesh.connectors.proof import prove, prove_isolated
from voicemesh.connectors.registry import RELAYS, ConnectorPool, connector_class
from voicemesh.role import Role
from voicemesh.router import NoRoute
from voicemesh.state.store import best_effort

log = logging.getLogger(__name__)
#: the name of the span of one unit of work, per stage
UNIT_SPANS: dict[str, str] = {
    Stage.STT: "stt.transcribe",
    Stage.LLM: "llm.reply",
    Stage.TTS: "tts.sentence",
}
#: sessions whose relay answer a stage keeps (StageService.relay)
RELAY_MEMORY = 10_000
#: the attributes of the span of the unit the current task works on (None: no span)
_SPAN: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "span", default=MappingProxyType({})
)


class StageService(Role):
    """A stage role: besides what every role has, it follows turn epochs from `vm.ctl.*` and
    cancels work a newer turn made stale, claims units of work, and loads and proves its engines
    before it reports ready."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.pool = ConnectorPool(settings.connector_pool_size, on_evict=self._evicted)
        self.health: HealthBoard | None = None
        self.epochs: dict[str, int] = {}
        #: the latest turn per session that the transport confirmed ended (`turn_ended`), and
        #: an event set (and replaced) at each confirmation, for speculative work that waits
        self.ended_turns: dict[str, int] = {}
        self._turn_end = asyncio.Event()
        self._work: dict[str, set[tuple[int, asyncio.Task[Any]]]] = {}
        #: per session: the config last seen, and where `relay` sends its frames under it
        self._relay_to: dict[str, tuple[AgentConfig, str | None]] = {}
        self._intake: list[Any] = []
        self.closers.append(self._end_intake)

    @property
    def title(self) -> str:
        return f"{self.role} stage"

    async def prepare(self) -> None:
        self.health = HealthBoard(
            store=self.store,
            nc=self.bus.nc,
            key_prefix=self.settings.key_prefix,
            subject=self.subjects.connector_health(self.role),
            stage=self.role,
            instance=self.instance,
        )
        await self.health.start()
        self.claims = self.store.claims(owner=self.instance, ttl_ms=self.settings.lease_ttl_ms)
        # claim -> the task doing its unit, cancelled if the claim is lost
        self._holders: dict[str, asyncio.Task[Any]] = {}
        # not bus.spawn: drain waits for spawned work, and this runs until the drain is over
        self._renewer = asyncio.ensure_future(self._renew_claims())
        # hop: <- voicemesh.transport.call.call.Call._start_turn and _interrupt (vm.ctl.<sid>)
        await self.bus.subscribe(self.subjects.ctl_all, self._on_ctl)
        if self.settings.preload:
            await self.preload()

    async def preload(self) -> None:
        """Load the default agent's engines for this stage now, not on the first call, and prove
        each local engine on real input (EngineError if one cannot run here: the role exits)."""
        agent = await self.store.get_default_agent()
        if agent is None or self.role not in agent.config.connectors:
            return
        t0 = time.perf_counter()
        chain = self.chain(agent.config)
        engines = [(n, connector_class(self.role, n)) for n in chain.names]
        for name, cls in engines:
            if cls.engine is not None:
                options = agent.config.options(self.role, name)
                log.info(
                    "proved in a child process: %s",
                    await prove_isolated(self.role, name, options, cls.engine),
                )
        for error in await chain.preload():
            log.warning("preloading failed (will retry on use): %s", error)
        for name, cls in engines:
            if cls.engine is not None:
                log.info("proved: %s", await prove(await chain.get(name)))
        log.info("loaded %s engines in %.1f s", self.role, time.perf_counter() - t0)

    def _evicted(self, stage: str, name: str, options: ConnectorOptions) -> None:
        """The pool closed a connector: its probe (which holds it) stops with it."""
        if self.health is not None:
            self.health.stop_probe((stage, name, fingerprint(options)))

    def chain(self, config: AgentConfig, *, session: str = "", epoch: int = 0) -> Chain:
        """The session's connectors for this stage; with `session`, each failover is told to its
        caller as it happens (a `warning` with code `fallback`, once per failover)."""

        def told(failed: str, to: str, err: ConnectorError) -> None:
            # the failure's code, never the provider's words (they stay in the logs)
            why = f"{failed} failed ({err.code}); {to} took over"
            event = WarningEvent(code="fallback", message=why, stage=Stage(self.role), epoch=epoch)
            self.bus.spawn(self.notify(session, event, epoch=epoch), what="a fallback warning")

        return Chain(
            self.pool, config, self.role, health=self.health, on_fallback=told if session else None
        )

    async def intake(self, subject: str, handler: Any, *, queue: str = "") -> None:
        """Subscribe to work; these subscriptions end first on shutdown, so nothing new starts
        while in-flight work drains."""
        self._intake.append(await self.bus.subscribe(subject, handler, queue=queue, hop=self.role))

    async def _end_intake(self) -> None:
        for sub in self._intake:
            await sub.unsubscribe()

    async def release(self) -> None:
        # after the drain: in-flight units renewed their claims until they finished
        self._renewer.cancel()
        if self.health is not None:
            await self.health.stop()
        await self.pool.aclose()

    async def _renew_claims(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_ttl_ms / 3000)
            try:
                lost = await self.claims.renew_all()
            except Exception as exc:  # Valkey away: the claims are not known to be lost
                log.warning("claim renewal failed: %s", exc)
                continue
            for key in lost:
                if (holder := self._holders.get(key)) is not None:
                    log.warning("claim %s lapsed before it was renewed; its work stops", key)
                    holder.cancel()

    async def claimed(self, stage: str, session: str, frame: Frame) -> str | None:
        """Claim a unit of work taken from the queue group; None if it is someone else's (a
        live instance holds it) or already done: a duplicate delivery to drop."""
        key = self.claims.key(stage, session, frame.epoch, frame.index)
        # with Valkey unreachable the unit is done unclaimed (no redelivery for it if we die)
        if await best_effort(f"claiming {key}", self.claims.take(key), True):
            return key
        log.info("unit %s is held or done elsewhere; dropped", key)
        return None

    # --- relaying ----------------------------------------------------------------------------

    async def relay(self, session: str, frame: Frame) -> bool:
        """With a `passthrough` primary, forward the frame unchanged to the next hop; True if it
        was relayed (or dropped as stale), False if the stage should do its own work."""
        config = self.router.peek(session) or await self.router.load_config(session)
        # Every frame of every session asks this: the answer is kept per session until its
        # config changes (a new version is a new object), not worked out 50 times a second.
        known = self._relay_to.get(session)
        if known is None or known[0] is not config:
            if known is None and len(self._relay_to) >= RELAY_MEMORY:
                # a session whose end we never heard of: forget the oldest, as the router does
                del self._relay_to[next(iter(self._relay_to))]
            known = self._relay_to[session] = (config, self._relay_subject(config, session))
        subject = known[1]
        if subject is None:
            return False
        if subject and self.current(session, frame.epoch):
            # hop: -> next stage's _on_text, or transport.call.call.Call._egress (vm.<next>.<sid>)
            await self.bus.publish(subject, frame)
        return True

    def _relay_subject(self, config: AgentConfig, session: str) -> str | None:
        """Where this stage relays the session's frames: None if it does its own work, "" if
        the flow leaves this stage out (frames in flight while it changed are dropped)."""
        if config.stage(self.role).primary not in RELAYS:
            return None
        try:
            return self.router.next_subject_of(config, session)
        except NoRoute:
            return ""

    # --- turns -------------------------------------------------------------------------------

    def current(self, session: str, epoch: int) -> bool:
        """Note a frame's epoch; False when a newer turn of the session has started (drop it)."""
        latest = self.epochs.get(session, 0)
        if epoch < latest:
            return False
        if epoch > latest:
            self.epochs[session] = epoch
            self._cancel_older(session, epoch)
        return True

    def track(self, session: str, epoch: int, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        async def in_context() -> Any:
            # the task's own copy of the log context
            bind(session=session, turn=epoch, trace_id=trace_id(session, epoch))
            if not tracing.enabled():
                return await coro
            # one span per unit of work, under the turn's root (ids derived: nothing on the wire)
            start, error = time.time_ns(), None
            try:
                return await coro
            except asyncio.CancelledError:
                error = "cancelled"
                raise
            except Exception as exc:
                error = type(exc).__name__
                raise
            finally:
                attrs = _SPAN.get()
                if attrs is not None:  # None: a duplicate whose claim another instance holds
                    tracing.span(
                        UNIT_SPANS.get(self.role, str(self.role)),
                        session,
                        epoch,
                        start,
                        time.time_ns(),
                        attrs={
                            "voicemesh.role": str(self.role),
                            "voicemesh.instance": self.instance,
                            **attrs,
                        },
                        error=error,
                    )

        task = self.bus.spawn(in_context(), what=f"{self.role} work of turn {epoch}")
        entry = (epoch, task)
        work = self._work.setdefault(session, set())
        work.add(entry)

        def done(_: asyncio.Task[Any]) -> None:
            work.discard(entry)
            if not work:
                self._work.pop(session, None)

        task.add_done_callback(done)
        return task

    def _cancel_older(self, session: str, epoch: int) -> None:
        for e, task in list(self._work.get(session, ())):
            if e < epoch:
                task.cancel()

    async def _on_ctl(self, subject: str, frame: Frame) -> None:
        if frame.kind is not Kind.EVENT:
            return
        session = Subjects.session_of(subject)
        try:
            event = parse_ctl_event(frame.payload)
        except EventError as exc:
            log.warning("dropped an event on %s: %s", subject, exc)
            return
        match event:
            case Turn(epoch=epoch) | Interrupt(epoch=epoch):
                self.current(session, frame.epoch if epoch is None else epoch)
            case TurnEnded(epoch=epoch):
                if epoch > self.ended_turns.get(session, 0):
                    self.ended_turns[session] = epoch
                woken, self._turn_end = self._turn_end, asyncio.Event()
                woken.set()
            case End() | CallEnd():
                await self.session_ended(session)

    async def session_ended(self, session: str) -> None:
        """The session was deleted or its call hung up: drop its work, epoch and cached config."""
        self._cancel_older(session, 1 << 32)
        self.epochs.pop(session, None)
        self.ended_turns.pop(session, None)
        self._relay_to.pop(session, None)
        self.router.forget(session)

    async def turn_ends(self, session: str, epoch: int) -> None:
        """Returns once the transport confirms turn `epoch` ended (speculative work made before
        it did may then be kept); a newer turn cancels the waiting task instead."""
        while self.ended_turns.get(session, 0) < epoch:
            await self._turn_end.wait()

    def health_body(self) -> dict[str, Any]:
        return {**super().health_body(), "sessions": len(self.epochs)}

    # --- side channel to the session's transport ---------------------------------------------

    async def notify(self, session: str, event: SideEvent, *, epoch: int = 0) -> None:
        """Events for the caller (transcripts, hop timings, errors); they travel beside the flow,
        to the transport, which forwards them."""
        # hop: -> voicemesh.transport.call.call.Call._egress (vm.transport.<sid>)
        await self.bus.publish(
            self.subjects.data(Stage.TRANSPORT, session), Frame.event(event, epoch=epoch)
        )


class QueuedStage(StageService):
    """A stateless stage: any instance takes a unit (an LLM turn, a TTS sentence) from the queue
    group on `vm.<role>.<session>`, claims it, and does `work`; a unit cancelled by a newer turn
    gives its claim up, so only finished units are skipped on redelivery."""

    async def setup(self) -> None:
        # hop: <- the previous stage of the flow: STTService._transcribe (vm.llm.<sid>),
        # LLMService._reply (vm.tts.<sid>), or a supervisor's resend (transport/call/supervisor.py)
        await self.intake(self.subjects.data_all(self.role), self._on_text, queue=self.role)

    async def _on_text(self, subject: str, frame: Frame) -> None:
        session = Subjects.session_of(subject)
        if await self.relay(session, frame):
            return
        if frame.kind is not Kind.TEXT or not self.current(session, frame.epoch):
            return
        self.track(session, frame.epoch, self._take(session, frame))

    async def _take(self, session: str, frame: Frame) -> None:
        claim = await self.claimed(self.role, session, frame)
        if claim is None:
            _SPAN.set(None)  # nothing done here: no span
            return
        _SPAN.set({"voicemesh.index": frame.index})
        if (task := asyncio.current_task()) is not None:
            self._holders[claim] = task
        try:
            note = await self.work(session, frame)
        except asyncio.CancelledError:
            await best_effort("releasing the claim", self.claims.release(claim), None)
            raise
        finally:
            self._holders.pop(claim, None)
        await best_effort("finishing the claim", self.claims.finish(claim, note), None)

    async def work(self, session: str, frame: Frame) -> str:
        """Do one claimed unit; returns the note its claim is finished with (DONE, or DONE with
        what a redelivery needs to know)."""
        raise NotImplementedError
