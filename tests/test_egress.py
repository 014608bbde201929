"""The call's egress (voicemesh/transport/call/egress.py): putting TTS frames back in order
(Reorderer) and resampling a reply to the peer's rate (Resampler)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.support import tone_frames
from voicemesh.bus import Flag, Frame
from voicemesh.transport.call.egress import HOLD_S, MAX_HELD, Reorderer, Resampler

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


def test_a_reply_s_tail_comes_out_with_it_not_at_the_head_of_the_next() -> None:
    """The filter holds ~26 ms of every reply; flushed at the reply's end, the reply comes out
    whole (its length exactly at the new rate) and the next reply starts with its own audio,
    not the last one's tail (which is what delayed its first sound before)."""
    rs = Resampler(48000)
    loud = (np.ones(22050 // 10) * 8000).astype(np.int16).tobytes()  # 100 ms at 22 050 Hz
    first = rs(loud, 22050)
    tail = rs.flush()
    assert len(first) < 9600 and len(first) + len(tail) == 9600  # 100 ms at 48 kHz, in all
    assert np.abs(np.frombuffer(tail, np.int16)).max() > 4000  # the reply's own end
    quiet = rs(bytes(len(loud)), 22050)
    assert np.abs(np.frombuffer(quiet, np.int16)).max() <= 2  # nothing of the last reply
    assert rs.flush() and Resampler(48000).flush() == b""


def test_a_barge_in_drops_what_the_filter_holds() -> None:
    rs = Resampler(48000)
    rs((np.ones(2205) * 8000).astype(np.int16).tobytes(), 22050)
    rs.reset()
    after = rs(bytes(4410), 22050)
    assert np.abs(np.frombuffer(after, np.int16)).max() <= 2
