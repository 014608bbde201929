"""The caller's side of a call, whatever carries it: the turns it speaks, paced as a microphone
would; what it heard; and each turn's latency timed where a user would time it. Both callers
(websocket.py, webrtc.py) drive the same Script, so their results compare turn for turn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from voicemesh.bus.events import (
    BotDone,
    BotStarted,
    CallerEvent,
    ErrorEvent,
    Event,
    EventError,
    Interrupted,
    Session,
    Transcript,
    TurnMetrics,
    TurnStarted,
    parse_caller_event,
)
from voicemesh.config.connectors import TurnOptions
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS, RATE
from voicemesh.transport.call.turns import TurnDetector

log = logging.getLogger(__name__)


@dataclass
class TurnResult:
    epoch: int = 0
    user_text: str = ""
    bot_text: str = ""
    connectors: set[str] = field(default_factory=set)
    #: from the caller's last voiced frame (the end of speech, as a person hears it) to the
    #: first audible bot audio (or `bot_started` where the carrier sends no silence)
    latency_ms: float | None = None
    #: the same, from the end of the WAV (later than the end of speech by its trailing silence)
    latency_from_file_end_ms: float | None = None
    server_latency_ms: float | None = None
    bot_audio: bytearray = field(default_factory=bytearray)
    indexes: list[int] = field(default_factory=list)
    #: the transport's per-phase figures for the turn (eou, stt, llm_ttft, tts_ttfb, v2v, ...)
    phases: dict[str, float | None] = field(default_factory=dict)
    #: the turn's transcript was a speculative one, and how many were thrown away before it
    stt_speculative: bool = False
    stt_discarded: int = 0
    #: the transport gave the turn up (e.g. "no llm instance is running"), this long after the
    #: end of the caller's speech
    error: str | None = None
    error_ms: float | None = None


@dataclass
class CallResult:
    session_id: str
    turns: list[TurnResult]
    bot_audio: bytes
    #: the transport's `interrupted` events (barge-ins), with `at`: perf_counter on arrival
    interrupts: list[dict[str, object]] = field(default_factory=list)

    @property
    def bot_seconds(self) -> float:
        return len(self.bot_audio) / 2 / RATE


@functools.lru_cache(maxsize=128)
def last_voiced_frame(pcm: bytes) -> int | None:
    """Index of the last 20 ms frame of `pcm` (16 kHz mono PCM16) that is speech, by the VAD
    the default agent's transport uses (Silero with its default thresholds), or by the energy
    gate where Silero hears no speech at all (test tones); None for silence.

    Why: a latency counted from the end of a WAV is too small by the WAV's trailing silence
    (most recordings have some), and was once smaller than the transport's own figure.

    Cached: a load generator says the same few WAVs in every call, and running Silero over each
    utterance again was a fifth of its callers' CPU."""
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
    for vad in ("silero", "energy"):
        detector = TurnDetector(TurnOptions(vad=vad, turn="silence"))
        last = None
        for i, frame in enumerate(frames):
            if detector.voiced(frame):
                last = i
        if last is not None:
            return last
    return None


def load_pcm16(path: Path) -> bytes:
    """Any WAV/FLAC that soundfile reads, as 16 kHz mono PCM16."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != RATE:
        mono = soxr.resample(mono, rate, RATE)
    return (np.clip(mono, -1, 1) * 32767).astype(np.int16).tobytes()


class Script:
    """A caller's side of the call, whatever carries it: the turns, what was heard, when."""

    def __init__(self, *, latency_on_sound: bool = False) -> None:
        #: time latency to the first audible bot audio (a transport that sends silence between
        #: replies: WebRTC) rather than to the transport's `bot_started` event
        self.latency_on_sound = latency_on_sound
        self.turns: list[TurnResult] = []
        self.audio = bytearray()
        self.done = asyncio.Event()
        self.turn: TurnResult | None = None
        self.speech_end: float | None = None  # when the utterance's last voiced frame was sent
        self.file_end: float | None = None  # when its last frame was sent
        self._reply_at = 0.0
        self.interrupts: list[dict[str, object]] = []
        self.session_id: str | None = None

    def on_audio(self, pcm: bytes, *, audible: bool = True) -> None:
        """Bot audio at 16 kHz; `audible`: it is sound, not the silence between replies."""
        self.audio.extend(pcm)
        turn = self.turn
        if turn is None:
            return
        turn.bot_audio.extend(pcm)
        if self.latency_on_sound and audible and turn.latency_ms is None and self.speech_end:
            self._replied(turn)

    def on_event(self, ev: CallerEvent | bytes | str | Mapping[str, Any]) -> CallerEvent | None:
        """Take one event from the transport, as its JSON or typed; returns it typed, or None
        for a message that is not a caller event (logged and ignored, as a client should)."""
        if not isinstance(ev, Event):
            try:
                ev = parse_caller_event(ev)
            except EventError as exc:
                log.warning("ignored a message from the transport: %s", exc)
                return None
        turn = self.turn
        match ev:
            case Session(session_id=session_id):
                self.session_id = session_id
            case Interrupted():
                self.interrupts.append({**ev.wire(), "at": time.perf_counter()})
            case TurnStarted(epoch=epoch, continues=continues):
                if turn is not None and continues is not None and continues == turn.epoch:
                    turn.epoch = epoch  # the same utterance, moved to a new epoch
                else:
                    self.turn = TurnResult(epoch=epoch)
                    self.turns.append(self.turn)
            case _ if turn is not None and getattr(ev, "epoch", None) in (None, turn.epoch):
                self._on_turn_event(turn, ev)
        return ev

    def _on_turn_event(self, turn: TurnResult, ev: CallerEvent) -> None:
        """An event of the turn being spoken."""
        match ev:
            case Transcript(role="user", text=text):
                turn.user_text = text
                if not text:
                    self.done.set()
            case Transcript(role="assistant", text=text, connector=connector, index=index):
                turn.bot_text = (turn.bot_text + " " + text).strip()
                turn.connectors.add(connector or "")
                turn.indexes.append(-1 if index is None else index)
            case BotStarted(latency_ms=latency_ms):
                if self.speech_end is not None and not self.latency_on_sound:
                    self._replied(turn)
                turn.server_latency_ms = latency_ms
            case TurnMetrics(stt_speculative=speculative, stt_discarded=discarded):
                turn.phases = {k: v for k, v in ev.wire().items() if k.endswith("_ms")}
                turn.stt_speculative, turn.stt_discarded = bool(speculative), discarded or 0
            case BotDone():
                self.done.set()
            case ErrorEvent(error=error):
                turn.error = error
                if self.speech_end is not None:
                    turn.error_ms = (time.perf_counter() - self.speech_end) * 1000
                self.done.set()  # the turn is over: no reply is coming

    def _replied(self, turn: TurnResult) -> None:
        """The first bot audio of the turn is here: time it from the end of speech and, for
        comparison, from the end of the file (negative if it came during trailing silence)."""
        now = time.perf_counter()
        assert self.speech_end is not None
        turn.latency_ms = (now - self.speech_end) * 1000
        end = (
            self.file_end
            if self.file_end is not None and self.file_end >= self.speech_end
            else None
        )
        turn.latency_from_file_end_ms = (now - end) * 1000 if end is not None else None
        self._reply_at = now

    async def speak(
        self,
        utterances: list[bytes],
        send: Callable[[bytes], Awaitable[None]],
        *,
        pause_s: float,
        turn_timeout: float,
        after_turn: Callable[[int, TurnResult], Awaitable[None]] | None,
        alive: Callable[[], bool],
        barge_in_after_s: float | None = None,
    ) -> None:
        """Say each utterance as a microphone would (20 ms frames in real time, silence between
        turns) and wait for the whole reply, played to its end, before the next; or, with
        `barge_in_after_s`, speak the next one that long after the reply started (a barge-in)."""
        silence = bytes(FRAME_BYTES)
        frame_s = FRAME_MS / 1000
        clock = time.perf_counter()

        async def paced(frame: bytes) -> None:
            nonlocal clock
            await send(frame)
            clock += frame_s
            delay = clock - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.2:
                # fell behind (a slow `after_turn`, a stalled loop): resync rather than catch up
                # in a burst, which a microphone never sends and the transport refuses past
                # VOICEMESH_CALLER_AUDIO_BURST_S
                clock = time.perf_counter()

        for n, pcm in enumerate(utterances):
            if n and after_turn is not None and self.turn is not None:
                await after_turn(n - 1, self.turn)
            self.done.clear()
            for _ in range(int(pause_s / frame_s)):
                await paced(silence)
            pcm += bytes(-len(pcm) % FRAME_BYTES)
            last = last_voiced_frame(pcm)
            end_of_speech = (last + 1) * FRAME_BYTES if last is not None else len(pcm)
            self.speech_end = self.file_end = None
            for i in range(0, len(pcm), FRAME_BYTES):
                await paced(pcm[i : i + FRAME_BYTES])
                if i + FRAME_BYTES == end_of_speech:
                    self.speech_end = time.perf_counter()  # the last voiced frame is out
            self.file_end = time.perf_counter()
            if self.turn is not None and self.turn.latency_ms is not None:
                # the reply began during the trailing silence: before the file ended
                self.turn.latency_from_file_end_ms = (self._reply_at - self.file_end) * 1000
            deadline = time.perf_counter() + turn_timeout
            cut_in = barge_in_after_s is not None and n + 1 < len(utterances)
            while not self.done.is_set():
                turn, speech_end = self.turn, self.speech_end
                if (
                    barge_in_after_s is not None  # implied by cut_in; said again for the checker
                    and cut_in
                    and turn is not None
                    and turn.latency_ms is not None
                    and speech_end is not None  # None only for an empty utterance
                ):
                    started = speech_end + turn.latency_ms / 1000
                    if time.perf_counter() - started >= barge_in_after_s:
                        break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"no complete reply within {turn_timeout:.0f} s")
                if not alive():
                    raise RuntimeError("the transport closed the call")
                await paced(silence)

    def result(self, out: Path | None) -> CallResult:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            pcm = np.frombuffer(bytes(self.audio), dtype=np.int16)
            sf.write(str(out), pcm, RATE, subtype="PCM_16")
        return CallResult(self.session_id or "", self.turns, bytes(self.audio), self.interrupts)
