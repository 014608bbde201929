"""Pure units: sentence splitting, turn detection, rechunking, reordering, resampling."""

from __future__ import annotations

import time

import numpy as np
import pytest

from voicemesh.bus import Flag, Frame
from voicemesh.config.connectors import WebSocketTransportOptions
from voicemesh.pipeline.text import SentenceSplitter
from voicemesh.transport.call.audio import FRAME_BYTES, RATE, Rechunker
from voicemesh.transport.call.egress import HOLD_S, MAX_HELD, Reorderer, Resampler
from voicemesh.transport.call.turns import TurnDetector, TurnEvent, dbfs

# --- SentenceSplitter ------------------------------------------------------------------------


def test_sentence_comes_out_as_soon_as_complete() -> None:
    s = SentenceSplitter()
    assert s.push("Hello") == []
    assert s.push(" there") == []
    assert s.push(".") == []  # the end mark needs the next whitespace to be sure
    assert s.push(" How") == ["Hello there."]
    assert s.push(" are you?") == []
    assert s.push(" I am") == ["How are you?"]
    assert s.push(" fine! Great") == ["I am fine!"]
    assert s.flush() == ["Great"]
    assert s.flush() == []


def test_several_sentences_in_one_piece() -> None:
    s = SentenceSplitter()
    assert s.push("One. Two! Three? Four") == ["One.", "Two!", "Three?"]
    assert s.flush() == ["Four"]


def test_token_by_token_stream() -> None:
    s = SentenceSplitter()
    text = "It is sunny today. Take a hat, and some water! Bye."
    out: list[str] = []
    for token in text.replace(" ", " \0").split("\0"):
        out += s.push(token)
    out += s.flush()
    assert out == ["It is sunny today.", "Take a hat, and some water!", "Bye."]


def test_decimal_point_and_closing_quote() -> None:
    s = SentenceSplitter()
    assert s.push("It costs 3.50 dollars. ") == ["It costs 3.50 dollars."]
    assert s.push('He said "stop." Then') == ['He said "stop."']


def test_first_clause_cut_at_comma_after_six_words() -> None:
    s = SentenceSplitter()
    # First comma after 1 word: too short to cut.
    assert s.push("Well, I think that this is") == []
    # Second comma after 8 words: the first clause goes out at once.
    assert s.push(" a good idea, but") == ["Well, I think that this is a good idea,"]
    # Later commas never cut.
    assert s.push(" only if, as you say, it rains") == []
    assert s.push(". Ok") == ["but only if, as you say, it rains."]


def test_first_clause_threshold_is_exactly_six_words() -> None:
    s = SentenceSplitter()
    assert s.push("one two three four five, six") == []
    s = SentenceSplitter()
    assert s.push("one two three four five six, seven") == ["one two three four five six,"]
    s = SentenceSplitter(first_clause_words=2)
    assert s.push("Yes indeed, and") == ["Yes indeed,"]


def test_comma_without_following_space_does_not_cut() -> None:
    s = SentenceSplitter()
    assert s.push("one two three four five six,seven") == []
    assert s.push(" eight") == []


def test_clause_cut_only_before_first_sentence() -> None:
    s = SentenceSplitter()
    assert s.push("Hi. ") == ["Hi."]
    assert s.push("one two three four five six seven, eight") == []


def test_punctuation_only_pieces_are_not_sentences() -> None:
    s = SentenceSplitter()
    assert s.push("... ") == []
    assert s.push("Okay. ") == ["Okay."]
    assert s.push("!? ") == []
    assert s.flush() == []
    assert s.emitted == 1


def test_flush_emits_rest_and_resets() -> None:
    s = SentenceSplitter()
    assert s.push("no end mark") == []
    assert s.flush() == ["no end mark"]
    assert s.buf == ""
    assert s.push("Next. ") == ["Next."]


# --- TurnDetector ----------------------------------------------------------------------------

SILENCE = b"\x00" * FRAME_BYTES


def tone_frames(n: int, *, freq: float = 220.0, amp: float = 8000.0) -> list[bytes]:
    t = np.arange(n * FRAME_BYTES // 2) / RATE
    pcm = (amp * np.sin(2 * np.pi * freq * t)).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def voice_frames(n: int) -> list[bytes]:
    """A harmonic-rich 150 Hz signal that webrtcvad takes for voice (a pure sine is not enough
    at aggressiveness 2)."""
    t = np.arange(n * FRAME_BYTES // 2) / RATE
    x = sum(3000 / k * np.sin(2 * np.pi * 150 * k * t) for k in range(1, 20))
    pcm = np.clip(x, -32767, 32767).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


async def run(det: TurnDetector, frames: list[bytes]) -> list[tuple[int, TurnEvent]]:
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
    events = await run(det, frames)
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
    kinds = [ev.kind for _, ev in await run(det, frames)]
    assert kinds.count("start") == 1
    assert kinds.count("end") == 1
    assert kinds[-1] == "end"


async def test_energy_vad_blip_does_not_start_turn() -> None:
    opts = WebSocketTransportOptions(vad="energy", start_speech_ms=100)
    det = TurnDetector(opts)
    # Four loud frames (80 ms) separated by silence: never 100 ms in a row.
    frames = ([SILENCE] * 3 + tone_frames(4)) * 5 + [SILENCE] * 40
    assert await run(det, frames) == []
    assert det.speaking is False


async def test_energy_threshold_is_respected() -> None:
    opts = WebSocketTransportOptions(vad="energy", energy_threshold_db=-20, start_speech_ms=40)
    det = TurnDetector(opts)
    quiet = tone_frames(20, amp=1000)  # about -33 dBFS: below the threshold
    assert await run(det, quiet) == []
    loud = tone_frames(2, amp=20000)
    assert [ev.kind for _, ev in await run(det, loud)] == ["start"]


async def test_two_turns() -> None:
    opts = WebSocketTransportOptions(
        vad="energy", start_speech_ms=40, end_of_turn_silence_ms=100, preroll_ms=100
    )
    det = TurnDetector(opts)
    turn = [SILENCE] * 10 + tone_frames(10) + [SILENCE] * 10
    kinds = [ev.kind for _, ev in await run(det, turn + turn)]
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
    start = next(ev for _, ev in await run(det, frames) if ev.kind == "start")
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
    events = await run(det, frames)
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
    assert await run(det, [SILENCE] * 50) == []
    assert not det.voiced(SILENCE)
    assert all(det.voiced(f) for f in voice_frames(10)[2:])


# --- Rechunker -------------------------------------------------------------------------------


def test_rechunker_exact_frames() -> None:
    r = Rechunker()
    data = bytes(range(256)) * 20  # 5120 bytes = 8 frames of 640
    chunks = [data[:1000], data[1000:1001], data[1001:3000], data[3000:]]
    out: list[bytes] = []
    sizes = []
    for c in chunks:
        got = r.push(c)
        sizes.append(len(got))
        out += got
    assert sizes == [1, 0, 3, 4]
    assert all(len(f) == FRAME_BYTES for f in out)
    assert b"".join(out) == data


def test_rechunker_keeps_remainder() -> None:
    r = Rechunker(frame_bytes=4)
    assert r.push(b"abc") == []
    assert r.push(b"d") == [b"abcd"]
    assert r.push(b"efghij") == [b"efgh"]
    assert r.push(b"kl") == [b"ijkl"]
    assert r.push(b"") == []


# --- Reorderer -------------------------------------------------------------------------------


def tts_frame(epoch: int, index: int, seq: int, flags: Flag = Flag.NONE) -> Frame:
    return Frame.audio(
        bytes([index, seq]) * 2, sample_rate=22050, epoch=epoch, index=index, seq=seq, flags=flags
    )


def test_reorderer_puts_sentences_in_order() -> None:
    ro = Reorderer()
    ro.reset(1)
    s0a = tts_frame(1, 0, 0, Flag.START)
    s0b = tts_frame(1, 0, 1, Flag.END)
    s1 = tts_frame(1, 1, 0, Flag.START | Flag.END)
    s2a = tts_frame(1, 2, 0, Flag.START)
    s2b = tts_frame(1, 2, 1, Flag.END | Flag.LAST)
    # Sentences 2 and 1 were synthesized first.
    assert ro.push(s2a) == []
    assert ro.push(s1) == []
    assert ro.push(s2b) == []
    assert ro.push(s0a) == [s0a]
    assert ro.done is False
    assert ro.push(s0b) == [s0b, s1, s2a, s2b]
    assert ro.done is True
    assert ro.next_index == 2
    # After LAST nothing of this turn plays.
    assert ro.push(tts_frame(1, 3, 0, Flag.END)) == []


def test_reorderer_partial_sentence_then_rest() -> None:
    ro = Reorderer(epoch=2)
    s1a = tts_frame(2, 1, 0, Flag.START)
    s0 = tts_frame(2, 0, 0, Flag.START | Flag.END)
    s1b = tts_frame(2, 1, 1, Flag.END)
    s2 = tts_frame(2, 2, 0, Flag.START | Flag.END | Flag.LAST)
    assert ro.push(s1a) == []
    assert ro.push(s0) == [s0, s1a]
    assert ro.push(s1b) == [s1b]
    assert ro.push(s2) == [s2]
    assert ro.done


def test_reorderer_drops_older_epoch_and_follows_newer() -> None:
    ro = Reorderer()
    first = tts_frame(3, 0, 0, Flag.START)
    assert ro.push(first) == [first]
    assert ro.epoch == 3
    assert ro.push(tts_frame(3, 2, 0, Flag.END)) == []  # pending for epoch 3
    # A newer turn (barge-in) replaces everything of the old one.
    new0 = tts_frame(4, 0, 0, Flag.START | Flag.END)
    assert ro.push(new0) == [new0]
    assert ro.epoch == 4
    # Old-epoch frames are dropped wherever they arrive, including the pending one's neighbours.
    assert ro.push(tts_frame(3, 0, 1, Flag.END)) == []
    assert ro.push(tts_frame(3, 1, 0, Flag.START | Flag.END)) == []
    new1 = tts_frame(4, 1, 0, Flag.START | Flag.END | Flag.LAST)
    assert ro.push(new1) == [new1]
    assert ro.done
    # The transport resets on each new user turn; the next reply plays from index 0.
    ro.reset(5)
    assert ro.done is False
    nxt = tts_frame(5, 0, 0, Flag.START)
    assert ro.push(nxt) == [nxt]
    assert ro.push(tts_frame(4, 2, 0, Flag.END)) == []


def test_reorderer_ignores_duplicate_of_played_sentence() -> None:
    ro = Reorderer(epoch=1)
    s0 = tts_frame(1, 0, 0, Flag.START | Flag.END)
    assert ro.push(s0) == [s0]
    assert ro.push(s0) == []  # index 0 already played
    s1 = tts_frame(1, 1, 0, Flag.START | Flag.END | Flag.LAST)
    assert ro.push(s1) == [s1]


def test_reorderer_puts_frames_of_a_sentence_in_order_by_seq() -> None:
    """A pass-through stage with two instances relays one utterance's frames through both: they
    arrive shuffled, and play in order all the same."""
    ro = Reorderer(epoch=1)
    frames = [tts_frame(1, 0, 0, Flag.START)] + [tts_frame(1, 0, n) for n in range(1, 6)]
    frames.append(tts_frame(1, 0, 6, Flag.END | Flag.LAST))
    played: list[Frame] = []
    for i in (1, 2, 4, 5, 0, 3, 6):
        played += ro.push(frames[i])
    assert [f.seq for f in played] == list(range(7))
    assert ro.done
    # an END that overtakes the sentence's last frames waits for them
    ro = Reorderer(epoch=2)
    a, b = tts_frame(2, 0, 0, Flag.START), tts_frame(2, 0, 1)
    end = tts_frame(2, 0, 2, Flag.END | Flag.LAST)
    assert ro.push(a) == [a] and ro.push(end) == [] and not ro.done
    assert ro.push(b) == [b, end] and ro.done


def test_reorderer_drops_a_duplicate_frame_of_the_sentence_playing() -> None:
    ro = Reorderer(epoch=1)
    a, b = tts_frame(1, 0, 0, Flag.START), tts_frame(1, 0, 1)
    assert ro.push(a) == [a] and ro.push(b) == [b]
    assert ro.push(b) == []  # delivered twice: played once


def test_reorderer_gives_up_on_a_lost_frame() -> None:
    """A frame that never comes does not hold the reply forever: after HOLD_S (checked by
    `expire`), or once MAX_HELD frames wait behind it, play goes on without it."""
    ro = Reorderer(epoch=1)
    start = tts_frame(1, 0, 0, Flag.START)
    end = tts_frame(1, 0, 3, Flag.END | Flag.LAST)
    assert ro.push(start) == [start]
    assert ro.push(tts_frame(1, 0, 2)) == []  # 1 is lost
    assert ro.push(end) == []
    assert ro.expire() == []  # not yet
    later = time.monotonic() + HOLD_S + 0.01
    assert [f.seq for f in ro.expire(later)] == [2, 3]
    assert ro.done
    ro = Reorderer(epoch=2)
    assert ro.push(tts_frame(2, 0, 0, Flag.START))
    got = [f for n in range(2, MAX_HELD + 3) for f in ro.push(tts_frame(2, 0, n))]
    assert [f.seq for f in got] == list(range(2, MAX_HELD + 3))


# --- Resampler -------------------------------------------------------------------------------


def test_resampler_rates() -> None:
    rs = Resampler(16000)
    pcm = tone_frames(1)[0]
    assert rs(pcm, 16000) == pcm  # same rate: untouched
    assert rs(b"", 22050) == b""
    # One second of a 440 Hz tone at Piper's 22 050 Hz, fed in 20 ms chunks.
    t = np.arange(22050) / 22050
    src = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()
    out = b"".join(rs(src[i : i + 882], 22050) for i in range(0, len(src), 882))
    samples = np.frombuffer(out, dtype=np.int16)
    # About 16 000 samples (less the filter's delay), and still a 440 Hz tone.
    assert 15000 <= samples.size <= 16000
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    peak_hz = np.argmax(spectrum) * 16000 / samples.size
    assert peak_hz == pytest.approx(440, abs=3)


def test_a_long_first_sentence_is_cut_before_a_clause_word() -> None:
    """No punctuation yet: the first chunk goes to TTS before "that"/"and"/... once it holds six
    words, so the first audio does not wait for a long sentence; later sentences stay whole."""
    s = SentenceSplitter()
    out: list[str] = []
    text = "The fun fact about cats is that they nap and they purr a lot and then sleep. Cats nap."
    for word in text.split(" "):
        out += s.push(word + " ")
    out += s.flush()
    assert out == [
        "The fun fact about cats is",
        "that they nap and they purr a lot and then sleep.",
        "Cats nap.",
    ]
    assert " ".join(out) == text


def test_a_clause_word_too_early_does_not_cut() -> None:
    s = SentenceSplitter()
    out = s.push("It is that we know the answer well enough ")
    assert out == []  # "that" comes after two words only; nothing to cut yet
    assert s.flush() == ["It is that we know the answer well enough"]
