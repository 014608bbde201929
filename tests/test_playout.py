"""The bot-audio queue on the transport: frames out in order, what was heard when cut off, and the
text of a reply as far as the caller heard it."""

from __future__ import annotations

import logging

import pytest

from voicemesh.config.settings import Settings
from voicemesh.transport.call.playout import Heard, Playout, truncate

RATE = 16000
FRAME = 640  # 20 ms


def pcm(ms: int, value: int = 1) -> bytes:
    return value.to_bytes(2, "little", signed=True) * (RATE * ms // 1000)


def drain(p: Playout) -> list[bytes]:
    out = []
    while (played := p.pull()).pcm is not None:
        out.append(played.pcm)
    return out


def test_frames_come_out_whole_and_in_order() -> None:
    p = Playout(RATE)
    p.push(pcm(50, 1), epoch=1, index=0)  # 2.5 frames: the half frame waits for more
    assert len(p) == 2 and p.ready
    p.push(pcm(10, 2), epoch=1, index=0)
    frames = drain(p)
    assert [len(f) for f in frames] == [FRAME] * 3
    assert frames[2][:2] == pcm(1, 1)[:2] and frames[2][-2:] == pcm(1, 2)[-2:]


def test_a_part_frame_is_not_ready_until_its_sentence_ends() -> None:
    """Less than a frame is not playable: the pacer must wait (not spin) until the sentence's end
    pads it out (a pacer that took 'something queued' for 'something to play' hung the loop)."""
    p = Playout(RATE)
    p.push(pcm(10), epoch=1, index=0)
    assert not p.ready and p.pull().pcm is None
    p.end_sentence(epoch=1, index=0)
    assert p.ready
    (frame,) = drain(p)
    assert frame == pcm(10) + bytes(FRAME // 2)


def test_a_new_sentence_flushes_the_part_frame_of_the_last() -> None:
    p = Playout(RATE)
    p.push(pcm(10, 1), epoch=1, index=0)
    p.push(pcm(20, 2), epoch=1, index=1)
    frames = drain(p)
    assert frames == [pcm(10, 1) + bytes(FRAME // 2), pcm(20, 2)]


def test_the_end_of_a_reply_is_announced_with_its_last_frame() -> None:
    p = Playout(RATE)
    p.push(pcm(40), epoch=3, index=0)
    p.end_reply(3)
    first, second = p.pull(), p.pull()
    assert first.finished == () and second.finished == (3,)
    after = p.pull()
    assert after.pcm is None and after.finished == ()
    # a reply with no audio at all (an LLM that failed) still ends
    p.end_reply(4)
    assert p.ready and p.pull().finished == (4,)


def test_clear_drops_everything_and_reports_what_was_heard() -> None:
    p = Playout(RATE)
    p.push(pcm(100), epoch=2, index=0)
    p.push(pcm(200), epoch=2, index=1)
    p.end_reply(2)
    for _ in range(5 + 4):  # sentence 0 whole, 80 ms of sentence 1
        assert p.pull().pcm is not None
    heard = p.clear(2)
    assert not p.ready and p.pull().pcm is None and len(p) == 0
    assert heard.fraction(0) == 1.0
    assert abs(heard.fraction(1) - 0.4) < 1e-9
    assert heard.fraction(2) == 0.0


def test_truncate_keeps_whole_sentences_then_the_words_begun() -> None:
    sentences = {0: "The fox ran.", 1: "It met an old wise owl there.", 2: "The end."}
    heard = Heard(1, played_s={0: 1.0, 1: 0.5}, total_s={0: 1.0, 1: 1.4, 2: 0.5})
    # 0.5 / 1.4 of seven words: 2.5 words begun, so three said
    assert truncate(sentences, heard) == "The fox ran. It met an"
    assert truncate(sentences, Heard(1)) == ""
    everything = Heard(1, played_s={0: 1, 1: 1.4, 2: 0.5}, total_s={0: 1, 1: 1.4, 2: 0.5})
    assert truncate(sentences, everything) == " ".join(sentences.values())


def test_a_runaway_reply_is_cut_at_max_s_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    p = Playout(RATE, max_s=1.0)  # 50 frames
    with caplog.at_level(logging.WARNING, logger="voicemesh.transport.call.playout"):
        for index in range(10):  # 10 s of one reply, nothing played meanwhile
            p.push(pcm(1000, index + 1), epoch=1, index=index)
            p.end_sentence(epoch=1, index=index)
        p.end_reply(1)
    assert len(p) == RATE * 2 // FRAME  # 1 s kept: the first sentence; the rest dropped
    assert p.queued_bytes == p.max_bytes
    assert p.dropped_bytes == 9 * RATE * 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reply 1" in warnings[0].getMessage()
    played = [p.pull() for _ in range(50)]
    assert [f.pcm for f in played] == [pcm(20, 1)] * 50  # what was kept plays as before
    assert played[-1].finished == (1,)  # ... and the reply still ends, with its last frame
    assert p.pull().pcm is None


def test_the_next_reply_plays_again_after_a_cut_one(caplog: pytest.LogCaptureFixture) -> None:
    p = Playout(RATE, max_s=1.0)
    with caplog.at_level(logging.WARNING, logger="voicemesh.transport.call.playout"):
        p.push(pcm(1000), epoch=1, index=0)
        p.push(pcm(500), epoch=1, index=1)  # dropped
        p.end_reply(1)
        drain(p)
        p.push(pcm(500), epoch=1, index=2)  # still reply 1 (late audio): still dropped
        assert len(p) == 0
        p.push(pcm(1000), epoch=2, index=0)  # a new reply, the queue has room: it plays
        assert len(p) == 50
        p.push(pcm(500), epoch=2, index=1)  # and is cut in turn, with its own warning
    assert len(p) == 50
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["reply 1", "reply 2"]


def test_a_barge_in_lifts_the_cut() -> None:
    p = Playout(RATE, max_s=1.0)
    p.push(pcm(1000), epoch=1, index=0)
    p.push(pcm(500), epoch=1, index=1)
    heard = p.clear(1)
    assert heard.total_s == {0: 1.0, 1: 0.5}  # dropped audio counts as synthesized, not heard
    p.push(pcm(100), epoch=1, index=2)
    assert len(p) == 5


def test_playout_bound_defaults_to_the_setting() -> None:
    assert Settings().playout_max_s == 120.0
    assert Playout(RATE).max_bytes == 120 * RATE * 2


def test_barge_in_after_a_short_first_unit_keeps_it_whole_and_the_next_in_proportion() -> None:
    """The LLM stage's first unit is now a few words, not a sentence: the context still keeps
    what was heard, unit by unit (whole units played, then the cut one in proportion)."""
    from voicemesh.pipeline.text import SentenceSplitter

    reply = "The quick brown fox jumps over the lazy dog near the river. It naps."
    splitter = SentenceSplitter()
    units = splitter.push(reply) + splitter.flush()
    assert units == ["The quick brown fox jumps", "over the lazy dog near the river.", "It naps."]
    p = Playout(RATE)
    for index, unit in enumerate(units):  # 100 ms of audio a word
        p.push(pcm(100 * len(unit.split())), epoch=1, index=index)
        p.end_sentence(epoch=1, index=index)
    p.end_reply(1)
    for _ in range(25 + 18):  # all of the first unit (500 ms), half of the second (of 700 ms)
        assert p.pull().pcm is not None
    heard = p.clear(1)
    said = truncate(dict(enumerate(units)), heard)
    assert said == "The quick brown fox jumps over the lazy dog"  # 3.6 of 7 words begun: 4
    assert reply.startswith(said)
