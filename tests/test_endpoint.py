"""End of turn from the transcript (issue 13, item 0): the text rules, and how they join
smart-turn's probability."""

from __future__ import annotations

import pytest

from voicemesh.bench.voices import load as load_voices
from voicemesh.config.connectors import TurnOptions
from voicemesh.transport.call.endpoint import (
    EndpointPolicy,
    TextJudgement,
    TextVerdict,
    combine,
    judge_text,
)

#: the shipped set's finished texts (its synthesized voices say the harness's questions and more)
SHIPPED_FINISHED = sorted(
    {i.text for i in load_voices().items if i.label == "finished" and not i.human}
)

FINISHED = [
    *SHIPPED_FINISHED,
    # short answers and closers
    "Yes.",
    "no",
    "Paris.",
    "Thank you very much.",
    "Tell me more.",
    "I think so.",
    "Yes I can.",
    "I think it is.",
    "I want that.",
    "Me too.",
    "Not really.",
    "See you then.",
    "okay",
    # stranded prepositions and verbs of seeming
    "What are you looking for?",
    "Where are you from?",
    "Who are you talking to?",
    "What does it look like?",
    "It sounds like you.",
    "The meeting is at 3.",
    "My number is 555 123 4567.",  # ten digits: a whole phone number
    "Hello, can you hear me?",
    "Front center.",
]

UNFINISHED = [
    # the shipped set's cut texts, as whisper writes them (it often adds a period)
    "I want to book a table for",
    "I want to book a table for.",
    "What is the capital of",
    "So I was thinking that maybe we could",
    "I would like to order a",
    "Can you tell me about the",
    "My phone number is five five five, two one",
    "My phone number is 555-21.",
    "I need a flight to Boston and",
    "Well, um",
    "How far is it from here to",
    "Remind me to call my mother because",
    # trailing conjunctions, prepositions, articles, fillers, leads
    "I was going to say but",
    "Can you help me with",
    "It was very",
    "um",
    "uh, uh",
    "So",
    "and",
    "Okay so",
    "Well",
    "I would like to",
    "I think that",
    "He said that",
    "What is",
    "Where is the",
    "Can I get some of the",
    "and then I",
    "I need a table for two...",
    "Let me think,",
    "The code is 4 7 1",
    "Is it one of those",
]


@pytest.mark.parametrize("text", FINISHED)
def test_finished_utterances_read_as_finished(text: str) -> None:
    judgement = judge_text(text)
    assert judgement.verdict is TextVerdict.FINISHED, judgement


@pytest.mark.parametrize("text", UNFINISHED)
def test_utterances_cut_mid_clause_read_as_unfinished(text: str) -> None:
    judgement = judge_text(text)
    assert judgement.verdict is TextVerdict.UNFINISHED, judgement


@pytest.mark.parametrize("text", ["", "   ", ".", "?!", "…"])
def test_no_words_is_unsure(text: str) -> None:
    assert judge_text(text).verdict is TextVerdict.UNSURE


def test_case_punctuation_and_curly_apostrophes_do_not_matter() -> None:
    assert judge_text("WHAT IS THE CAPITAL OF").verdict is TextVerdict.UNFINISHED
    assert judge_text("I\u2019d like to").verdict is TextVerdict.UNFINISHED
    assert judge_text("  why is the sky blue  ").verdict is TextVerdict.FINISHED


def test_a_reason_is_always_given() -> None:
    for text in [*FINISHED, *UNFINISHED, ""]:
        assert judge_text(text).reason


# --- the combiner ----------------------------------------------------------------------------

DONE = TextJudgement(TextVerdict.FINISHED, "test")
CUT = TextJudgement(TextVerdict.UNFINISHED, "test")
NOTHING = TextJudgement(TextVerdict.UNSURE, "test")


@pytest.mark.parametrize("p", [0.07, 0.2, 0.43])
def test_a_turn_smart_turn_doubts_ends_now_when_the_text_is_finished(p: float) -> None:
    """The issue's case: finished questions in other voices scored 0.07-0.43, so smart-turn
    alone waited the 2 s cap; with the transcript the turn ends at once."""
    alone = combine(p, None, silence_ms=200)
    assert not alone.end_now and alone.end_after_ms == 2000
    decision = combine(p, DONE, silence_ms=200)
    assert decision.end_now and decision.end_after_ms == 0


@pytest.mark.parametrize("p", [0.0, 0.3, 0.6, 0.97])
def test_a_turn_cut_mid_clause_waits_for_the_cap_even_when_smart_turn_is_sure(p: float) -> None:
    decision = combine(p, CUT, silence_ms=400)
    assert not decision.end_now
    assert decision.end_after_ms == 2000
    assert combine(p, CUT, silence_ms=2000).end_now  # the cap still ends it


def test_the_same_audio_ends_or_waits_on_what_was_said() -> None:
    p = 0.3
    assert combine(p, judge_text("What is the capital of France?"), silence_ms=200).end_now
    assert not combine(p, judge_text("What is the capital of"), silence_ms=200).end_now


def test_a_finished_text_smart_turn_is_sure_about_holds_briefly_not_to_the_cap() -> None:
    policy = EndpointPolicy(finished_threshold=0.1, finished_hold_ms=600)
    decision = combine(0.01, DONE, policy, silence_ms=200)
    assert not decision.end_now and decision.end_after_ms == 600
    assert combine(0.01, DONE, policy, silence_ms=600).end_now


def test_no_words_leaves_smart_turn_alone() -> None:
    assert combine(0.6, NOTHING, silence_ms=200).end_now
    assert not combine(0.4, NOTHING, silence_ms=200).end_now
    assert combine(0.4, NOTHING, silence_ms=200).end_after_ms == 2000


def test_without_smart_turn_nothing_ends_before_the_cap() -> None:
    assert not combine(None, DONE, silence_ms=200).end_now
    assert combine(None, CUT).end_after_ms == 2000


def test_a_confident_smart_turn_waits_for_a_transcript_on_its_way() -> None:
    assert combine(0.9, None, silence_ms=200).end_now
    waiting = combine(0.9, None, silence_ms=200, awaiting_text=True)
    assert not waiting.end_now and waiting.end_after_ms == 2000


def test_policy_takes_the_agent_cap() -> None:
    options = TurnOptions(turn="smart_turn", smart_turn_max_silence_ms=1500)
    policy = EndpointPolicy.from_options(options)
    assert policy.max_silence_ms == 1500
    assert combine(0.9, CUT, policy).end_after_ms == 1500
    # a hold longer than the cap is cut to the cap
    long_hold = EndpointPolicy(finished_hold_ms=5000, max_silence_ms=1500)
    assert combine(0.0, DONE, long_hold).end_after_ms == 1500


# --- on the shipped voices, with the real smart-turn model -----------------------------------


def _smart_turn_at_pause(file: str) -> tuple[float, str]:
    """smart-turn's probability on a shipped WAV as the detector would ask it (the speech and
    a 200 ms pause), and the utterance's text."""
    import numpy as np
    import soundfile as sf

    from voicemesh.bench import voices
    from voicemesh.transport.call.turns import turn_complete_probability

    item = next(i for i in voices.load().items if i.file == file)
    audio, _ = sf.read(str(item.path), dtype="int16")
    pcm = np.concatenate((audio, np.zeros(3200, np.int16))).tobytes()
    return turn_complete_probability(pcm), item.text


@pytest.mark.parametrize("file", ["espeak-en-029-f4-f0.wav", "festival-slt-hts-f0.wav"])
def test_finished_questions_smart_turn_doubts_in_other_voices_end_early(file: str) -> None:
    p, text = _smart_turn_at_pause(file)
    assert p < 0.5  # alone, this turn waits the whole 2 s cap
    assert not combine(p, None, silence_ms=200).end_now
    decision = combine(p, judge_text(text), silence_ms=200)
    assert decision.end_after_ms <= 600, decision


@pytest.mark.parametrize("file", ["flite-awb-u0.wav", "espeak-rp-m3-fast-u1.wav"])
def test_cut_sentences_smart_turn_hears_as_finished_still_wait(file: str) -> None:
    p, text = _smart_turn_at_pause(file)
    assert p > 0.5  # alone, this turn ends mid-clause
    decision = combine(p, judge_text(text), silence_ms=200)
    assert not decision.end_now and decision.end_after_ms == 2000, decision
