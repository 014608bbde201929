"""STT stage: session-affine. One instance owns a session's audio stream through a Valkey lease,
buffers each utterance (whisper has no streaming) and sends its transcript to the next hop.

The transport asks `vm.assign.stt` (a queue group) for an owner; the instance that answers takes the
lease, subscribes to `vm.stt.<session>` before replying (same connection, so the subscription is in
place before the transport sends), and renews the lease while it holds the stream.

Speculative STT: the transport marks the caller's pauses on the stream (an empty frame flagged
PAUSE) and flags the END of an utterance that ended in the pause last marked. At a mark, the audio
so far is transcribed at once, while the transport still decides whether the turn is over; if the
END says it ended in that pause, that transcript is final and goes out without waiting for the
engine. A speculation starts only when this process's engine is idle: whisper's lock is
process-wide, and a final transcription (which someone is waiting for) must never queue behind
more than one speculation, the one already running when its END came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from voicemesh.bus import Flag, Frame, Kind, Subjects
from voicemesh.bus.events import ErrorEvent, Transcript
from voicemesh.config.stages import Stage
from voicemesh.connectors import metrics
from voicemesh.connectors.base import Connector, STTConnector, STTStream
from voicemesh.connectors.fallback import AllConnectorsFailed, Chain, caller_error
from voicemesh.pipeline.base import StageService
from voicemesh.state.store import check_session_id

log = logging.getLogger(__name__)

IDLE_RELEASE_S = 600.0
#: what STT buffers of one turn beyond VOICEMESH_MAX_UTTERANCE_S: the transport cuts a turn at
#: that length, pre-roll included, so only a sender that skipped its turn detection gets here
UTTERANCE_MARGIN_S = 2.0


@dataclass
class Utterance:
    """One utterance as its END cut it from the stream: what transcribing it needs, fixed while
    the stream goes on to the next one."""

    epoch: int
    pcm: bytes
    rate: int
    origin_ns: int
    chain: Chain | None
    live: STTStream | None
    live_name: str
    live_conn: Connector | None
    #: the transcript of the audio up to the pause the utterance ended in, if one was started
    speculation: Speculation | None = None
    #: speculations of this utterance thrown away because the caller went on
    discarded: int = 0


@dataclass
class Speculation:
    """A transcription of an utterance's audio up to a pause mark, started before the turn's end
    is known. The task yields (connector name, text), or None if every connector failed."""

    covers: int  # bytes of the utterance's audio it transcribes
    mark: int  # the seq of the pause mark, which the transport matches its transcript by
    #: the mark asked for a speculative reply: the transcript goes on to the next stage at once
    reply: bool = False
    #: it went on (flagged SPECULATE): the END sends only the final transcript event
    forwarded: bool = False
    task: asyncio.Task[tuple[str, str] | None] | None = None


def _speculations(outcome: str) -> None:
    metrics.SPECULATIONS.labels(Stage.STT, outcome).inc()


@dataclass
class Stream:
    """A session's audio stream, held by this instance while it holds the session's lease."""

    session: str
    sub: Subscription
    epoch: int = -1
    rate: int = 16000
    origin_ns: int = 0
    audio: bytearray = field(default_factory=bytearray)
    last_frame: float = field(default_factory=time.monotonic)
    # The utterance streamed live to a streaming provider (Deepgram), if the chain's first
    # connector is one; the buffered `audio` is the replay if it fails.
    chain: Chain | None = None
    live: STTStream | None = None
    live_name: str = ""
    live_conn: Connector | None = None
    #: the utterance reached the length limit and was cut: the rest of its turn is dropped
    capped: bool = False
    #: the transcription of the audio up to the latest pause mark, while the turn may end there
    speculation: Speculation | None = None
    discarded: int = 0  # speculations of this utterance thrown away so far

    def begin(self, frame: Frame) -> None:
        """Start a new utterance at `frame` (its live stream, if any, closed already)."""
        self.discard()  # an utterance that never got its END (a newer turn started)
        self.audio.clear()
        self.epoch, self.rate, self.origin_ns = frame.epoch, frame.sample_rate, frame.origin_ns
        self.capped = False
        self.discarded = 0

    def discard(self) -> None:
        """The latest speculation is moot: the caller went on, or the utterance is gone. It is
        not cancelled: a whisper thread runs to its end anyway, and the engine is counted busy
        until it has, so its result is simply never used."""
        if self.speculation is not None:
            self.speculation = None
            self.discarded += 1
            _speculations("discarded")

    def cut(self, *, paused: bool = False) -> Utterance:
        """Hand the utterance over to its transcription; the stream keeps nothing of it, so the
        next utterance can start while this one is transcribed. `paused`: it ended in the pause
        last marked, so the speculation of that pause (if any) is its transcript."""
        speculation = self.speculation if paused else None
        if speculation is None:
            self.discard()
        self.speculation = None
        utterance = Utterance(
            self.epoch,
            bytes(self.audio),
            self.rate,
            self.origin_ns,
            self.chain,
            self.live,
            self.live_name,
            self.live_conn,
            speculation,
            self.discarded,
        )
        self.audio.clear()
        self.live = None
        return utterance


async def transcribe_utterance(conn: Connector, utterance: Utterance) -> str:
    """The whole utterance's text from `conn` (the replay path, and the path with no live
    stream)."""
    return await transcribe_pcm(conn, utterance.pcm, utterance.rate)


async def transcribe_pcm(conn: Connector, pcm: bytes, rate: int) -> str:
    assert isinstance(conn, STTConnector)  # an STT chain holds STT connectors
    return await conn.transcribe(pcm, rate)


class STTService(StageService):
    role = Stage.STT

    async def setup(self) -> None:
        self.leases = self.store.leases(owner=self.instance, ttl_ms=self.settings.lease_ttl_ms)
        self.streams: dict[str, Stream] = {}
        self._lock = asyncio.Lock()
        #: transcriptions of this process running or waiting for the engine (whisper's lock is
        #: process-wide): a speculation starts only when there are none
        self.engine_busy = 0
        # hop: <- voicemesh.transport.api.service.TransportService._assign (vm.assign.stt)
        self._intake.append(
            await self.bus.nc.subscribe(
                self.subjects.assign(Stage.STT), queue=Stage.STT, cb=self._on_assign
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
        if await self.store.get_version(session) is None:  # no lease for a session that is not
            if msg.reply:
                error = f"session {session} not found or expired"
                await self.bus.nc.publish(msg.reply, orjson.dumps({"error": error}))
            return
        async with self._lock:
            holder = await self.leases.acquire(self.subjects_lease(session))
            if holder == self.instance and session not in self.streams:
                # hop: <- voicemesh.transport.call.call.Call._turn_event, _end_turn (vm.stt.<sid>)
                sub = await self.bus.subscribe(
                    self.subjects.data(Stage.STT, session), self._on_audio, hop=Stage.STT
                )
                self.streams[session] = Stream(session, sub)
                log.info("took the audio stream of session %s", session)
        if msg.reply:
            await self.bus.nc.publish(msg.reply, orjson.dumps({"owner": holder}))

    def subjects_lease(self, session: str) -> str:
        return self.store.keys.lease(Stage.STT, session)

    async def _on_audio(self, subject: str, frame: Frame) -> None:
        session = Subjects.session_of(subject)
        stream = self.streams.get(session)
        if stream is None or await self.relay(session, frame):
            return
        if frame.kind is not Kind.AUDIO or not self.current(session, frame.epoch):
            return
        stream.last_frame = time.monotonic()
        if frame.has(Flag.START) or frame.epoch != stream.epoch:
            await self._close_live(stream)
            stream.begin(frame)
            config = (await self.router.load(session)).config
            stream.chain = self.chain(config, session=session, epoch=frame.epoch)
            await self._open_live(stream)
        if stream.capped:
            return  # the turn's first max_utterance_s are being transcribed: the rest is dropped
        if len(stream.audio) + len(frame.payload) > self._max_bytes(stream.rate):
            await self._cap(stream)
            return
        stream.audio += frame.payload
        if stream.live is not None and frame.payload:
            assert stream.chain is not None  # a live stream is opened only with its chain set
            try:
                async with asyncio.timeout(stream.chain.timeout_s):
                    await stream.live.send(frame.payload)
            except Exception as exc:
                await self._live_failed(stream, exc)
        if frame.has(Flag.END):
            utterance = stream.cut(paused=frame.has(Flag.PAUSE))
            self.track(session, frame.epoch, self._transcribe(stream, utterance))
        elif frame.has(Flag.PAUSE):
            await self._speculate(stream, frame)

    async def _speculate(self, stream: Stream, mark: Frame) -> None:
        """The caller paused: transcribe the utterance so far, while the transport decides
        whether the turn is over. A newer pause supersedes an older one's speculation."""
        stream.discard()
        if not self.settings.speculative_stt or stream.live is not None or stream.chain is None:
            # off here, or a streaming provider, which transcribes as the caller speaks: the
            # transport hears at once that no transcript of this pause is coming
            await self._offer(stream, mark.seq, "")
            return
        if self.engine_busy:
            # A final transcription may be waiting for the engine: never make it wait longer.
            _speculations("skipped")
            await self._offer(stream, mark.seq, "")
            return
        pcm, rate, chain = bytes(stream.audio), stream.rate, stream.chain
        spec = Speculation(len(pcm), mark.seq, reply=mark.has(Flag.SPECULATE))
        spec.task = self.bus.spawn(
            self._speculation(stream, spec, chain, pcm, rate), what="speculative transcription"
        )
        stream.speculation = spec
        _speculations("started")

    async def _speculation(
        self, stream: Stream, spec: Speculation, chain: Chain, pcm: bytes, rate: int
    ) -> tuple[str, str] | None:
        self.engine_busy += 1
        result: tuple[str, str] | None = None
        try:
            conn, text = await chain.call_first(lambda c: transcribe_pcm(c, pcm, rate))
            result = conn.name, text
        except AllConnectorsFailed as exc:  # the END transcribes again, and reports it
            log.info("speculative transcription failed: %s", exc)
        finally:
            self.engine_busy -= 1
        if stream.speculation is spec:  # the turn may still end in this pause
            await self._offer(stream, spec.mark, result[1] if result else "", spec)
        return result

    async def _offer(
        self, stream: Stream, mark: int, text: str, spec: Speculation | None = None
    ) -> None:
        """The transcript of the pause `mark` to the transport, whose end of turn weighs its
        words; with a speculative reply asked for, on to the next stage too."""
        session, epoch = stream.session, stream.epoch
        heard = Transcript(
            role="user", text=text, epoch=epoch, final=False, speculative=True, pause=mark
        )
        await self.notify(session, heard, epoch=epoch)
        # checked again after the await: an END (or a newer turn) may have come meanwhile, and
        # then the END's own path sends the transcript on, as the turn's
        if spec is None or not spec.reply or not text or stream.speculation is not spec:
            return
        spec.forwarded = True
        out = Frame.text(
            text,
            epoch=epoch,
            flags=Flag.START | Flag.END | Flag.LAST | Flag.SPECULATE,
            origin_ns=stream.origin_ns,
        )
        # hop: -> voicemesh.pipeline.llm.LLMService._on_text (vm.llm.<sid>, default flow)
        await self.router.route_to_next(out, session)

    def _max_bytes(self, rate: int) -> int:
        """The most PCM16 mono of one turn this stage buffers at `rate`. The rate is what the
        sender declares (the codec allows up to 192 kHz): counted at no more than 48 kHz, a
        sender that declares more buys no more memory."""
        return int((self.settings.max_utterance_s + UTTERANCE_MARGIN_S) * min(rate, 48_000)) * 2

    async def _cap(self, stream: Stream) -> None:
        """The turn outgrew the limit without ending (a sender that skips the transport's turn
        detection): transcribe what is held, as if the turn had ended there, and drop the rest.
        Unbounded, it would grow this process's memory and then hold the engine (whisper's lock
        is process-wide) for as long as the audio is."""
        session, epoch = stream.session, stream.epoch
        limit = self.settings.max_utterance_s + UTTERANCE_MARGIN_S
        error = (
            f"utterance over {limit:g} s without an end: transcribed its first {limit:g} s, "
            "dropped the rest (VOICEMESH_MAX_UTTERANCE_S)"
        )
        log.warning("turn %d: %s", epoch, error)
        stream.capped = True
        self.track(session, epoch, self._transcribe(stream, stream.cut()))
        await self.notify(
            session, ErrorEvent(error=error, stage=Stage.STT, epoch=epoch), epoch=epoch
        )

    async def _open_live(self, stream: Stream) -> None:
        """Start streaming the utterance if the first connector in the chain can."""
        session, chain = stream.session, stream.chain
        assert chain is not None
        name = chain.order()[0]
        try:
            conn = await chain.get(name)
        except Exception:
            return  # the replay path will report it
        if not isinstance(conn, STTConnector) or not conn.streaming:
            return
        epoch = stream.epoch

        async def interim(text: str) -> None:
            if text and self.current(session, epoch):
                heard = Transcript(role="user", text=text, epoch=epoch, final=False, connector=name)
                await self.notify(session, heard, epoch=epoch)

        stream.live_name, stream.live_conn = name, conn
        try:
            async with asyncio.timeout(chain.timeout_s):
                stream.live = await conn.open_stream(stream.rate, interim)
        except Exception as exc:
            await self._live_failed(stream, exc)

    async def _live_failed(self, stream: Stream, exc: BaseException) -> None:
        if stream.chain is not None:
            await stream.chain.failed(stream.live_name, stream.live_conn, exc, started=False)
        await self._close_live(stream)

    @staticmethod
    async def _close_live(stream: Stream) -> None:
        live, stream.live = stream.live, None
        if live is not None:
            await live.aclose()

    async def _transcribe(self, stream: Stream, utterance: Utterance) -> None:
        t0 = time.perf_counter()
        used = False
        spec = utterance.speculation
        try:
            if spec is not None:
                assert spec.task is not None  # set as soon as the speculation is made
                # shielded: a newer turn cancels this task, and the engine's thread runs on
                # anyway; the speculation is then counted discarded
                result = await asyncio.shield(spec.task)
                if result is not None:
                    used = await self._transcribed(
                        stream,
                        utterance,
                        t0,
                        *result,
                        speculative=True,
                        send=not spec.forwarded,  # the next stage has it already
                    )
                    return
            await self._transcribe_now(stream, utterance, t0)
        finally:
            if spec is not None:
                _speculations("used" if used else "discarded")

    async def _transcribe_now(self, stream: Stream, utterance: Utterance, t0: float) -> None:
        session, epoch, live = stream.session, utterance.epoch, utterance.live
        chain = utterance.chain or self.chain(
            (await self.router.load(session)).config, session=session, epoch=epoch
        )
        text: str | None = None
        name = utterance.live_name
        if live is not None:
            try:
                async with asyncio.timeout(chain.timeout_s):
                    text = await live.finish()
                metrics.REQUESTS.labels(Stage.STT, name).inc()
            except asyncio.CancelledError:
                await live.aclose()
                raise
            except Exception as exc:
                await chain.failed(name, utterance.live_conn, exc, started=False)
                await live.aclose()
        if text is None:  # no live stream, or it failed: replay the utterance from its start
            self.engine_busy += 1
            try:
                conn, text = await chain.call_first(
                    lambda c: transcribe_utterance(c, utterance),
                )
                name = conn.name
            except AllConnectorsFailed as exc:
                log.error("turn %d: %s", epoch, exc)
                text, code = caller_error(Stage.STT, exc)
                failed = ErrorEvent(error=text, code=code, stage=Stage.STT, epoch=epoch)
                await self.notify(session, failed, epoch=epoch)
                text, name = "", ""  # an empty final transcript: the caller's turn is over
            finally:
                self.engine_busy -= 1
        await self._transcribed(stream, utterance, t0, name, text or "")

    async def _transcribed(
        self,
        stream: Stream,
        utterance: Utterance,
        t0: float,
        name: str,
        text: str,
        *,
        speculative: bool = False,
        send: bool = True,
    ) -> bool:
        """Send the utterance's final transcript on (False: a newer turn made it moot).
        `stt_ms` counts from its END, so with a speculation it is what the END still waited."""
        session, epoch = stream.session, utterance.epoch
        took_ms = (time.perf_counter() - t0) * 1000
        if not self.current(session, epoch):
            return False
        final = Transcript(
            role="user",
            text=text,
            epoch=epoch,
            final=True,
            connector=name,
            stt_ms=round(took_ms, 1),
            speculative=speculative or None,
            discarded=utterance.discarded or None,
        )
        await self.notify(session, final, epoch=epoch)
        if text and send:
            out = Frame.text(
                text,
                epoch=epoch,
                flags=Flag.START | Flag.END | Flag.LAST,
                origin_ns=utterance.origin_ns,
            )
            # hop: -> voicemesh.pipeline.llm.LLMService._on_text (vm.llm.<sid>, default flow)
            await self.router.route_to_next(out, session)
        return True

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
            await self._close_live(stream)  # an utterance cut off mid-way (hang-up, lost lease)
            stream.discard()
        if release:
            await self.leases.release(self.subjects_lease(session))

    async def session_ended(self, session: str) -> None:
        await super().session_ended(session)
        await self._drop(session, release=True)
