"""End-of-turn detection on inbound 16 kHz PCM16, one 20 ms frame at a time.

A VAD (webrtcvad, pipecat's bundled Silero model, or an energy gate) labels each frame; a run of
voiced frames opens a turn and brings its pre-roll, so the first syllable reaches STT; silence
closes it, either after a fixed pause or, with smart_turn, as soon as pipecat's smart-turn v3
model hears a finished sentence. Both ONNX models are loaded once per process and shared by every
call: onnxruntime's InferenceSession.run is thread-safe, and Silero's recurrent state lives in
each detector, never in the session.

Turns are decided in the call, before the bus: only speech (with its pre-roll) is published to
STT, and a barge-in is noticed without a network hop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import webrtcvad

from voicemesh.config.connectors import TurnOptions
from voicemesh.transport.call.audio import FRAME_MS, RATE
from voicemesh.transport.call.endpoint import EndpointPolicy, TextJudgement, combine, judge_text

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

# Silero v5 scores 512-sample windows at 16 kHz and wants the previous window's last 64 samples
# prepended, so its state and context stay in step across windows.
SILERO_WINDOW = 512
SILERO_CONTEXT = 64
# Long silence or noise drifts Silero's recurrent state so it under-reports the speech that
# follows; pipecat clears it every ~2 s, only in clear non-speech (5 windows under 0.1), and so
# do we.
_SILERO_RESET_WINDOWS = 2 * RATE // SILERO_WINDOW
_SILERO_QUIET_PROB = 0.1
_SILERO_QUIET_WINDOWS = 5

# smart-turn v3 was trained on the last 8 s of a turn, left-padded with zeros when shorter.
SMART_TURN_SECONDS = 8
_SMART_TURN_SAMPLES = SMART_TURN_SECONDS * RATE


#: how long after a pause mark the detector waits for the speculative transcript before smart-turn
#: decides alone: whisper tiny.en takes ~350-550 ms on 2 cores; a flow whose STT sends none (a
#: pass-through, a streaming provider) loses at most this much
TEXT_WAIT_MS = 1000


@dataclass(frozen=True, slots=True)
class TurnEvent:
    #: "start" (frames = pre-roll and the voiced run), "audio", "pause" (a mark where STT may
    #: transcribe the turn so far), "resume" (the caller went on after a mark: before this
    #: frame's audio), "end"
    kind: Literal["start", "audio", "pause", "resume", "end"]
    frames: tuple[bytes, ...] = ()
    #: an "end" forced by the utterance limit while the caller was still speaking
    cut: bool = False
    #: an "end" inside the pause last marked by a "pause" event: nothing voiced came after it
    paused: bool = False


def dbfs(frame: bytes) -> float:
    samples = np.frombuffer(frame, dtype=np.int16).astype(np.float32)
    rms = math.sqrt(float(np.mean(samples * samples))) if samples.size else 0.0
    return 20 * math.log10(max(rms, 1e-9) / 32768.0)


# --- shared models ---------------------------------------------------------------------------

_models: dict[str, Any] = {}
_models_lock = threading.Lock()


def _pipecat_file(*parts: str) -> str:
    """Locates a model inside the installed pipecat without importing pipecat, whose import
    costs ~80 ms and logs a banner; the weights ship in the wheel, nothing is ever fetched."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pipecat-ai, which carries the Silero and smart-turn models, is missing")
    path = os.path.join(next(iter(spec.submodule_search_locations)), *parts)
    if not os.path.exists(path):
        raise RuntimeError(f"model file missing from the pipecat-ai install: {path}")
    return path


def _shared(name: str, load: Callable[[], Any]) -> Any:
    """Loads once per process even when two calls start at the same moment on two threads."""
    model = _models.get(name)
    if model is None:
        with _models_lock:
            model = _models.get(name)
            if model is None:
                model = _models[name] = load()
    return model


def _session(path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One thread per run: calls run side by side on the few cores, and a second intra-op thread
    # per run would only make them fight.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def silero_session() -> Any:
    return _shared(
        "silero", lambda: _session(_pipecat_file("audio", "vad", "data", "silero_vad.onnx"))
    )


def smart_turn_model() -> tuple[Any, Callable[..., np.ndarray]]:
    """The smart-turn session and the Whisper log-mel front end it was trained with (pipecat's
    numpy copy of transformers' WhisperFeatureExtractor, so torch is never needed)."""

    def load() -> tuple[Any, Callable[..., np.ndarray]]:
        from pipecat.audio.turn.smart_turn._whisper_features import (
            compute_whisper_log_mel_features,
        )

        path = _pipecat_file("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")
        return _session(path), compute_whisper_log_mel_features

    return _shared("smart_turn", load)


def preload(options: TurnOptions) -> None:
    """Loads the models these options need, so that the first call does not wait ~0.3 s for
    onnxruntime and the weights. Blocking: run it in a thread at service start."""
    if options.vad == "silero":
        silero_session()
    if options.turn == "smart_turn":
        smart_turn_model()


def turn_complete_probability(pcm: bytes) -> float:
    """smart-turn v3's probability that the speaker has finished, from a turn's 16 kHz PCM16
    (the last 8 s count). ~45 ms of CPU on one core: never call it on the event loop."""
    session, features = smart_turn_model()
    audio = np.frombuffer(pcm, dtype=np.int16)[-_SMART_TURN_SAMPLES:].astype(np.float32) / 32768
    if audio.size < _SMART_TURN_SAMPLES:
        audio = np.pad(audio, (_SMART_TURN_SAMPLES - audio.size, 0))
    mel = features(audio, do_normalize=True)
    out = session.run(None, {"input_features": mel[np.newaxis]})
    return float(np.asarray(out[0]).reshape(-1)[0])


class SileroVAD:
    """Per-call Silero state over the shared session. Our 320-sample frames do not divide into
    its 512-sample windows, so samples queue up and a frame carries the probability of the last
    window that completed (0, 1 or 2 windows end inside a frame; 5 frames make 3 windows)."""

    def __init__(self) -> None:
        self._session = silero_session()
        self._sr = np.array(RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, SILERO_CONTEXT), dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._since_reset = 0
        self._quiet = 0
        self.probability = 0.0

    def push(self, frame: bytes, *, voiced: bool) -> float:
        """Returns the newest speech probability; voiced (the caller's hysteresis state) keeps
        the state reset from landing inside speech, where it would dent the confidence."""
        samples = np.frombuffer(frame, dtype=np.int16).astype(np.float32) / 32768
        self._pending = np.concatenate((self._pending, samples))
        while self._pending.size >= SILERO_WINDOW:
            window, self._pending = self._pending[:SILERO_WINDOW], self._pending[SILERO_WINDOW:]
            x = np.concatenate((self._context, window[np.newaxis]), axis=1)
            prob, self._state = self._session.run(
                None, {"input": x, "state": self._state, "sr": self._sr}
            )
            self._context = x[:, -SILERO_CONTEXT:]
            self.probability = float(prob[0][0])
            self._since_reset += 1
            self._quiet = self._quiet + 1 if self.probability < _SILERO_QUIET_PROB else 0
            if (
                self._since_reset >= _SILERO_RESET_WINDOWS
                and not voiced
                and self._quiet >= _SILERO_QUIET_WINDOWS
            ):
                self._state = np.zeros_like(self._state)
                self._context = np.zeros_like(self._context)
                self._since_reset = 0
        return self.probability


# --- turn detection --------------------------------------------------------------------------


def _frames(ms: int) -> int:
    return max(1, ms // FRAME_MS)


class TurnDetector:
    """One per call. Not thread-safe: push from the call's task only.

    `max_utterance_s` bounds a turn, pre-roll included: a caller who never pauses (or noise the
    VAD calls speech) would otherwise grow one utterance without end, and STT would buffer all of
    it and then hold its engine for as long. At the limit the turn ends as any other ("end", with
    `cut`), so what was said is transcribed and answered. Speech that goes on without a pause is
    dropped until the caller pauses (end_of_turn_silence_ms), and only then may a turn start:
    a turn opened at once would be a newer turn, and every stage cancels an older turn's work
    when a newer one starts, so the cut turn would never be transcribed.

    With `speculative_stt`, each pause inside a turn is marked once ("pause") where STT may
    transcribe the turn so far, and an "end" in the pause last marked says so (`paused`): the
    VAD is the one that knows nothing voiced came since, which STT could only guess at."""

    def __init__(self, options: TurnOptions, *, max_utterance_s: float | None = None) -> None:
        self.options = options
        self._max_turn_frames = (
            max(1, int(max_utterance_s * 1000) // FRAME_MS) if max_utterance_s else None
        )
        self._turn_frames = 0
        self._cut = False  # a turn was cut: drop speech until the caller pauses
        self._vad = webrtcvad.Vad(options.vad_aggressiveness) if options.vad == "webrtc" else None
        self._silero = SileroVAD() if options.vad == "silero" else None
        # A stop threshold above the start one would make hysteresis flap; clamp rather than
        # fail a live call over a config slip.
        self._on = options.vad_confidence
        self._off = min(options.vad_stop_confidence, options.vad_confidence)
        self._smart = options.turn == "smart_turn"
        if self._smart:
            smart_turn_model()
        self._start_frames = _frames(options.start_speech_ms)
        self._barge_frames = max(self._start_frames, _frames(options.barge_in_speech_ms))
        self._preroll_frames = options.preroll_ms // FRAME_MS
        # Pre-roll is what came before the voiced run that opened the turn, so hold both.
        self._recent: deque[bytes] = deque(maxlen=self._preroll_frames + self._barge_frames)
        self._end_frames = _frames(options.end_of_turn_silence_ms)
        # With smart_turn the model is asked after end_of_turn_silence_ms; the hard stop can
        # never come before that question.
        self._max_frames = (
            max(self._end_frames, _frames(options.smart_turn_max_silence_ms))
            if self._smart
            else self._end_frames
        )
        # Speculative STT: a pause is marked where STT may transcribe the turn so far. With
        # smart_turn, when the model is asked, so whisper runs beside it; with silence alone,
        # halfway to the end, so whisper has the other half to run before the turn ends.
        self._speculate = options.speculative_stt
        self._mark_frames = self._end_frames if self._smart else max(1, self._end_frames // 2)
        if options.pause_mark_ms is not None:  # never later than the turn can end
            self._mark_frames = max(1, min(_frames(options.pause_mark_ms), self._max_frames - 1))
        self._marked = False  # this pause is marked, and nothing voiced came since
        # The words of the speculative transcript join smart-turn's probability (endpoint.py).
        self._use_text = self._smart and self._speculate and options.text_end_of_turn
        self._policy = EndpointPolicy.from_options(options)
        self._text_wait_frames = self._mark_frames + _frames(TEXT_WAIT_MS)
        self._text: TextJudgement | None = None  # of this pause's transcript, once it came
        self._p: float | None = None  # smart-turn's probability for this pause, once it came
        # the silence (ms) after which the words and the probability end this pause: worked out
        # when one of them changes, not on every silent frame
        self._end_after_ms: int | None = None
        self._turn_audio: deque[bytes] = deque(maxlen=SMART_TURN_SECONDS * 1000 // FRAME_MS)
        self._decision: asyncio.Future[float] | None = None
        self._asked = False
        self.last_decision: float | None = None  # the last smart-turn probability acted on
        self.speaking = False
        self.last_voiced = False  # whether the last frame pushed was speech
        self._voiced = False  # Silero hysteresis state
        self._run = 0
        self._silence = 0

    def voiced(self, frame: bytes) -> bool:
        """Labels one frame. Stateful for Silero (its model state and the hysteresis advance),
        so call it once per frame, in order."""
        if self._silero is not None:
            p = self._silero.push(frame, voiced=self._voiced)
            self._voiced = p >= self._off if self._voiced else p >= self._on
            return self._voiced
        if self._vad is not None:
            return self._vad.is_speech(frame, RATE)
        return dbfs(frame) > self.options.energy_threshold_db

    @property
    def probability(self) -> float:
        """Silero's latest speech probability (0 with other VADs)."""
        return self._silero.probability if self._silero is not None else 0.0

    @property
    def deciding(self) -> bool:
        """A smart-turn decision is running and has not been acted on."""
        return self._decision is not None

    async def settle(self) -> None:
        """Waits for a running smart-turn decision, so the next push acts on it. A live call
        never needs this; replaying recorded audio faster than real time does, to get the
        same result on every run."""
        if self._decision is not None:
            await asyncio.wait([self._decision])

    async def push(self, frame: bytes, *, bot_speaking: bool = False) -> list[TurnEvent]:
        """Feeds one 20 ms frame; returns what it changed. Never blocks on smart-turn: the model
        runs in a worker thread and its answer is acted on by the first frame after it lands."""
        voiced = self.last_voiced = self.voiced(frame)
        if self._cut:
            self._silence = 0 if voiced else self._silence + 1
            if self._silence < self._end_frames:
                return []
            self._cut, self._silence = False, 0
        if not self.speaking:
            self._recent.append(frame)
            self._run = self._run + 1 if voiced else 0
            # Over the bot, a cough or a "hm" must not cut it off: more voice is needed.
            if self._run < (self._barge_frames if bot_speaking else self._start_frames):
                return []
            keep = min(len(self._recent), self._preroll_frames + self._run)
            frames = tuple(self._recent)[-keep:]
            self._recent.clear()
            self.speaking, self._silence, self._run, self._asked = True, 0, 0, False
            self._marked = False
            self._turn_audio.clear()
            self._turn_audio.extend(frames)
            self._turn_frames = len(frames)
            return [TurnEvent("start", frames)]

        self._turn_audio.append(frame)
        self._turn_frames += 1
        events = [TurnEvent("audio", (frame,))]
        if self._max_turn_frames is not None and self._turn_frames >= self._max_turn_frames:
            paused = self._marked and not voiced
            if self._marked and voiced:
                events.insert(0, TurnEvent("resume"))
            self._close()
            self._cut = True
            events.append(TurnEvent("end", cut=True, paused=paused))
            return events
        if voiced:
            if self._marked:  # before this frame's audio: it belongs after the resumption
                events.insert(0, TurnEvent("resume"))
            self._silence, self._asked, self._marked = 0, False, False
            self._text = self._p = self._end_after_ms = None
            self._drop_decision()  # the speaker went on: whatever the model says is moot
            return events
        self._silence += 1
        if self._silence >= self._max_frames or (self._smart and self._complete()):
            paused = self._marked
            self._close()
            events.append(TurnEvent("end", paused=paused))
            return events
        if self._smart and self._silence >= self._end_frames and not self._asked:
            self._asked = True
            pcm = b"".join(self._turn_audio)
            self._decision = asyncio.ensure_future(
                asyncio.to_thread(turn_complete_probability, pcm)
            )
        if self._speculate and not self._marked and self._silence >= self._mark_frames:
            self._marked = True
            events.append(TurnEvent("pause"))
        return events

    def heard(self, text: str) -> None:
        """The speculative transcript of the pause now marked (the caller matched the mark): its
        words join smart-turn's probability from the next frame on."""
        if self._marked:
            self._text = judge_text(text)
            self._reconsider()

    def _complete(self) -> bool:
        decision = self._decision
        if decision is not None and decision.done():
            self._decision = None
            try:
                self._p = self.last_decision = decision.result()
            except Exception:  # a broken model must not end a turn early; the timer still will
                log.exception("smart-turn decision failed")
            if self._use_text:
                self._reconsider()
        if not self._use_text:
            return self._p is not None and self._p > 0.5
        if self._silence == self._text_wait_frames:  # the words are late: the audio alone
            self._reconsider()
        return self._end_after_ms is not None and self._silence * FRAME_MS >= self._end_after_ms

    def _reconsider(self) -> None:
        """The words, the probability or the wait for the words changed: when this pause ends."""
        awaiting = self._marked and self._text is None and self._silence < self._text_wait_frames
        self._end_after_ms = combine(
            self._p, self._text, self._policy, awaiting_text=awaiting
        ).end_after_ms

    def _drop_decision(self) -> None:
        if self._decision is not None:
            self._decision.cancel()  # the thread finishes on its own; its answer is ignored
            self._decision = None

    def _close(self) -> None:
        self._drop_decision()
        self.speaking, self._silence, self._run, self._asked = False, 0, 0, False
        self._marked = False
        self._text = self._p = self._end_after_ms = None
        self._turn_audio.clear()

    def reset(self) -> None:
        """Forgets a half-open turn and the VAD's memory, as if the call had just begun."""
        self._close()
        self._cut = False
        self._recent.clear()
        self.last_voiced = self._voiced = False
        if self._silero is not None:
            self._silero.reset()
        if self._vad is not None:
            self._vad = webrtcvad.Vad(self.options.vad_aggressiveness)
