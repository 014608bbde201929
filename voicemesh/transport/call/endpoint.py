"""End of turn from what was said, and how it joins smart-turn's probability.

smart-turn v3 hears prosody, and on voices it was not trained on it doubts finished questions
(0.07-0.43 on espeak-ng and flite voices, under its 0.5 threshold), so those turns wait the
whole silence cap. The words settle most of those cases: "What is the capital of France?" is
finished whatever the voice; "What is the capital of" is not. The speculative transcript (the
STT stage transcribes the audio so far as soon as the detector pauses) is judged here by rules,
because no small text model ships offline and rules on the last few words are what carries the
signal: an utterance cut mid-clause almost always ends on a word that needs a continuation (a
conjunction, a preposition, an article, a filler, a modal with nothing after it) or inside a
run of digits being dictated.

Both functions are pure and cheap (microseconds): the transport may call them on its event loop.

    judgement = judge_text(transcript)
    decision = combine(probability, judgement, policy, silence_ms=silence)
    if decision.end_now: ...                     # end the turn
    else: wait until decision.end_after_ms of silence, unless speech resumes
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from voicemesh.config.connectors import TurnOptions


class TextVerdict(StrEnum):
    FINISHED = "finished"
    UNFINISHED = "unfinished"
    #: nothing to judge (no words, or only noise): the audio model decides alone
    UNSURE = "unsure"


@dataclass(frozen=True, slots=True)
class TextJudgement:
    verdict: TextVerdict
    #: why, for logs and the benchmark's table
    reason: str


# Words after which an utterance cannot stop: the clause they open needs what comes next.
_CONJUNCTIONS = frozenset(
    "and but or nor because if when while although though unless since until whether than "
    "whereas or cause cuz plus then".split()
)
_PREPOSITIONS = frozenset(
    "for to of in on at from with about into onto by between through over under after before "
    "without within near towards toward via per around across against along among behind "
    "beside besides beyond during except inside outside past since upon including".split()
)
_DETERMINERS = frozenset(
    "a an the my your his her our their its this these those some any each every another "
    "several many much more most few no".split()
)
_FILLERS = frozenset("um umm uh uhh er erm ah ehm hmm mm mhm".split())
# Words that lead into something and are filler-like at the end of a turn.
_LEADS = frozenset("very really quite rather just also even like so well okay ok".split())
_MODALS = frozenset("can could would should will shall may might must".split())
_AUXILIARIES = frozenset(
    "is are was were am be been being do does did have has had 's 're 've 'd 'll".split()
)
_SUBJECT_PRONOUNS = frozenset("i we he she they you it there".split())
_OBJECT_OR_SUBJECT_FINAL = frozenset("me us him them it you".split())
_STRANDABLE = frozenset("for from to about with at of in".split())
_WH = frozenset("what where when who whom whose which why how".split())
# "I think so", "I hope so", "and so on": "so" that closes a clause.
_SO_CLOSERS = frozenset("think hope guess believe suppose said say do did not".split())
# "what does it look like": "like" after a verb of seeming closes the clause.
_LIKE_CLOSERS = frozenset("look looks looked sound sounds feel feels seem seems".split())
# "I think that", "he said that": "that" after these opens a clause; "I want that" does not.
_THAT_OPENERS = frozenset(
    "think thought say said know knew believe hope mean sure so such guess realize is was "
    "means".split()
)
_ANSWERS = frozenset(
    "yes yeah yep no nope sure okay ok thanks thank hello hi hey bye goodbye right correct "
    "exactly great fine perfect please stop wait".split()
)
_NUMBER_WORDS = frozenset(
    "zero oh one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
    "ninety hundred thousand double triple".split()
)
# What makes a run of digits a dictation (a phone number said in groups, with pauses).
_DICTATION_CUES = frozenset(
    "number phone code zip postcode pin card account digits extension reference order "
    "confirmation id".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_DIGITS = re.compile(r"^[0-9]+$")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _is_number(word: str) -> bool:
    return bool(_DIGITS.match(word)) or word in _NUMBER_WORDS


def _trails_off(text: str) -> bool:
    """Whisper writes a trailing ellipsis, comma or dash for speech that stops mid-flow."""
    tail = text.rstrip()
    return tail.endswith(("...", "\u2026", ",", "-", "\u2014", "\u2013", ";", ":"))


def judge_text(transcript: str) -> TextJudgement:
    """Whether a (speculative) transcript reads as a finished utterance.

    Only the last words count: the rules look at what the utterance ends on, so a long turn
    costs the same as a short one. Final punctuation is weak evidence (Whisper closes most
    segments with a period, cut or not) and is used only for trailing-off marks."""
    words = _words(transcript)
    if not words:
        return TextJudgement(TextVerdict.UNSURE, "no words")
    last = words[-1]
    before = words[-2] if len(words) > 1 else ""

    if all(w in _FILLERS for w in words):
        return TextJudgement(TextVerdict.UNFINISHED, f"only fillers: {last!r}")
    if last in _FILLERS:
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on a filler: {last!r}")

    # Digits being dictated: people pause between groups ("five five five, two one...").
    run = 0
    for w in reversed(words):
        if not _is_number(w):
            break
        run += 1
    if run and (run >= 3 or any(w in _DICTATION_CUES for w in words[:-run])):
        digits = sum(len(w) if _DIGITS.match(w) else 1 for w in words[-run:])
        # A full phone number (10+ digits) or a 5-digit code after its cue may well be done,
        # but a pause inside a dictation costs more to misjudge than to wait out.
        if digits < 10:
            return TextJudgement(TextVerdict.UNFINISHED, f"digits being dictated ({digits})")

    if len(words) == 1:
        if last in _ANSWERS:
            return TextJudgement(TextVerdict.FINISHED, f"a one-word answer: {last!r}")
        if last in _CONJUNCTIONS or last in _LEADS or last in _PREPOSITIONS:
            return TextJudgement(TextVerdict.UNFINISHED, f"a lone lead-in: {last!r}")
        if last in _DETERMINERS or last in _MODALS or last in _WH - {"why", "what", "how"}:
            return TextJudgement(TextVerdict.UNFINISHED, f"a lone {last!r}")
        return TextJudgement(TextVerdict.FINISHED, "a one-word answer")

    if last in _CONJUNCTIONS:
        if last == "then" and before not in _CONJUNCTIONS:  # "see you then", "okay then"
            return TextJudgement(TextVerdict.FINISHED, "a clause closed by 'then'")
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on a conjunction: {last!r}")
    if last == "so":
        if before in _SO_CLOSERS or (len(words) >= 3 and words[-3:-1] == ["and", "so"]):
            return TextJudgement(TextVerdict.FINISHED, "'so' closes the clause")
        return TextJudgement(TextVerdict.UNFINISHED, "ends on 'so'")
    if last == "like":
        if before in _LIKE_CLOSERS or before in _OBJECT_OR_SUBJECT_FINAL - {"it"}:
            return TextJudgement(TextVerdict.FINISHED, "'like' closes the clause")
        return TextJudgement(TextVerdict.UNFINISHED, "ends on 'like'")
    if last == "that":
        if before in _THAT_OPENERS:
            return TextJudgement(TextVerdict.UNFINISHED, f"'{before} that' opens a clause")
        return TextJudgement(TextVerdict.FINISHED, "'that' as an object")
    if last in _PREPOSITIONS:
        # "what are you looking for", "where are you from": a wh-question that strands its
        # preposition is finished.
        stranded = (
            words[0] in _WH
            and last in _STRANDABLE
            and not any(w in _DETERMINERS for w in words[-3:-1])
            and (before in _SUBJECT_PRONOUNS | _OBJECT_OR_SUBJECT_FINAL or before.endswith("ing"))
        )
        if stranded:
            return TextJudgement(TextVerdict.FINISHED, "a wh-question strands its preposition")
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on a preposition: {last!r}")
    if last in _DETERMINERS:
        if last in {"more", "much", "many", "few", "no", "any", "some", "most", "this", "those"}:
            # "thank you very much", "not any", "I want this": these also stand as pronouns.
            if before not in _PREPOSITIONS and before not in _LEADS - {"very"}:
                return TextJudgement(TextVerdict.FINISHED, f"{last!r} stands alone")
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on a determiner: {last!r}")
    if last in _LEADS:
        if last in {"well", "okay", "ok", "too", "really", "just", "quite", "also", "even"} and (
            before not in _CONJUNCTIONS
        ):
            if last in {"well", "okay", "ok"} and len(words) <= 2:
                return TextJudgement(TextVerdict.UNFINISHED, f"a lead-in: {' '.join(words)!r}")
            return TextJudgement(TextVerdict.FINISHED, f"{last!r} closes the clause")
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on a lead-in: {last!r}")
    if last in _MODALS or last in _AUXILIARIES:
        # "yes I can", "I think it is": a short answer ends on its auxiliary; "maybe we could"
        # in a longer turn is a verb phrase still to come.
        if before in _SUBJECT_PRONOUNS and (
            len(words) <= 3 or words[0] in _ANSWERS or last in _AUXILIARIES
        ):
            return TextJudgement(TextVerdict.FINISHED, f"a short answer: {before} {last}")
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on {last!r} with nothing after it")
    if last in _SUBJECT_PRONOUNS - _OBJECT_OR_SUBJECT_FINAL:
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on a subject: {last!r}")
    if last in _WH and before not in _SO_CLOSERS and last not in {"why", "how", "what"}:
        return TextJudgement(TextVerdict.UNFINISHED, f"ends on {last!r}")
    if _trails_off(transcript):
        return TextJudgement(TextVerdict.UNFINISHED, "the transcript trails off")
    if words[0] in _WH or transcript.rstrip().endswith("?"):
        return TextJudgement(TextVerdict.FINISHED, "a complete question")
    return TextJudgement(TextVerdict.FINISHED, "a complete clause")


# --- combining with smart-turn ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """How the text verdict moves smart-turn's threshold. The defaults come from the shipped
    other-voice set (benchmarks/bench_eou_voices.py): smart-turn scored its finished utterances
    down to ~0.05, and cut ones as high as 0.9."""

    #: smart-turn alone: the probability over which a turn is finished (pipecat's 0.5)
    threshold: float = 0.5
    #: with a finished transcript, smart-turn need only be over this to end the turn now
    finished_threshold: float = 0.02
    #: a finished transcript that smart-turn still doubts (under finished_threshold) ends after
    #: this much silence instead of the cap
    finished_hold_ms: int = 600
    #: silence that ends any turn (smart_turn_max_silence_ms)
    max_silence_ms: int = 2000

    @classmethod
    def from_options(cls, options: TurnOptions) -> EndpointPolicy:
        return cls(max_silence_ms=max(options.smart_turn_max_silence_ms, 1))


@dataclass(frozen=True, slots=True)
class EndpointDecision:
    #: silence (ms since the last voiced frame) after which the turn ends, unless speech
    #: resumes; at or under the silence so far means now
    end_after_ms: int
    end_now: bool
    reason: str


def combine(
    probability: float | None,
    text: TextJudgement | None,
    policy: EndpointPolicy | None = None,
    *,
    silence_ms: int = 0,
    awaiting_text: bool = False,
) -> EndpointDecision:
    """End of turn now, after a short hold, or at the silence cap, from smart-turn's probability
    (None while it runs) and the transcript's judgement (None until the speculative transcript
    lands).

    - unfinished text: wait for the cap whatever the audio says. smart-turn hears a falling
      contour on many cut sentences read by an unfamiliar voice; the words do not lie that way.
    - finished text: end as soon as smart-turn is at least mildly on board; if it is sure the
      speaker goes on, give them finished_hold_ms rather than the full cap.
    - no text or no words: smart-turn alone, as before.
    awaiting_text: a speculative transcript is on its way, so a confident smart-turn waits for
    it rather than ending on the audio alone. That costs no voice-to-voice time (the reply cannot
    start before the transcript exists) and keeps a cut sentence that smart-turn hears as
    finished from ending the turn."""
    policy = policy or EndpointPolicy()
    cap = policy.max_silence_ms

    def at(ms: int, reason: str) -> EndpointDecision:
        return EndpointDecision(ms, silence_ms >= ms, reason)

    if text is not None and text.verdict is TextVerdict.UNFINISHED:
        return at(cap, f"text unfinished ({text.reason})")
    if probability is None:
        return EndpointDecision(cap, False, "waiting for smart-turn")
    if text is not None and text.verdict is TextVerdict.FINISHED:
        if probability >= policy.finished_threshold:
            return at(0, f"text finished ({text.reason}), smart-turn {probability:.2f}")
        hold = min(policy.finished_hold_ms, cap)
        return at(hold, f"text finished but smart-turn sure it is not ({probability:.2f})")
    if text is None and awaiting_text:
        return EndpointDecision(cap, False, "waiting for the transcript")
    if probability > policy.threshold:
        return at(0, f"smart-turn {probability:.2f}")
    return at(cap, f"smart-turn doubts ({probability:.2f}), no text to judge")
