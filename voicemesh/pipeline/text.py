"""Cutting an LLM's token stream into the units TTS speaks, so TTS can start on the first soon."""

from __future__ import annotations

import re

# What the splitter looks for (the scan in SentenceSplitter follows it one character at a time, so
# that text arriving in small pieces is read once, not once per piece):
#   a sentence ends after [.!?;:]+["')\]]* followed by whitespace, unless the word before the
#   end mark is a known abbreviation ("Dr.") or an initial ("J.");
_MARKS = frozenset(".!?;:")
_CLOSERS = frozenset("\"')]")
#   a first unit also ends after ",(?=\s)", after a dash standing alone (" - ", " -- ") or ending
#   a word ("so—" or "so— "), or after its first `first_words` words;
_DASHES = frozenset("\u2014\u2013")  # em and en dash: always a clause break
_HYPHEN_DASHES = frozenset(("-", "--"))  # a hyphen only when it stands alone as a word
_WORD = re.compile(r"[A-Za-z0-9]")
#: words that lean on the next one: a first unit cut after N words does not end on them
_LEANING = frozenset(
    "a an the to of in on at by for from with into about as and or but nor so than that "
    "my your his her its our their this these those is are was were be am will would can could "
    "should may might must do does did has have had not very".split()
)
_LEANING_GRACE = 2  # more words a first unit may take to end on a word that does not lean
#: words whose final "." is not a sentence's end (compared lower-case, without that ".")
ABBREVIATIONS = frozenset(
    "dr mr mrs ms prof st jr sr mt vs etc e.g i.e approx dept fig inc ltd ave rd "
    "a.m p.m u.s".split()
)

#: a sentence with no end in sight is cut at a word boundary once it holds this many characters
MAX_SENTENCE_CHARS = 1000
#: the first unit of a reply holds at most this many words (benchmarks/bench_tts_first_audio.py:
#: Piper's first audio grows 10-30 ms a word, idle to busy, over ~20 ms a call; with 3-8 words
#: no typical reply had a gap after its first unit; fewer words cut more replies mid-clause)
FIRST_WORDS = 5
# how far past that the scan reads before cutting, so that an end mark at the limit is seen
# whether the text came in one piece or in many
_LOOKAHEAD = 16


class SentenceSplitter:
    """Yields the units of a reply for TTS: whole sentences, except the first unit, which ends at
    the first clause boundary (a comma, semicolon, colon or dash) or after `first_words` words,
    whichever comes first. Time to first audio matters more there than prosody: a TTS engine such
    as Piper synthesizes a whole unit before its first sample, at 10-30 ms a word on 2 cores.
    `first_words=0` (or `early_first=False`, for a reply resumed after units already sent) keeps
    the first unit a sentence too.

    No unit grows past `max_chars` (+ a few characters of look-ahead): a run of text with no end
    mark is cut at its last word boundary within `max_chars`, so a runaway reply reaches TTS in
    bounded pieces. Each character is scanned once (a few again after such a cut), however small
    the pieces: `scanned` counts them."""

    def __init__(
        self,
        *,
        first_words: int = FIRST_WORDS,
        early_first: bool = True,
        max_chars: int = MAX_SENTENCE_CHARS,
    ):
        self.buf = ""
        self.emitted = 0
        self.first_words = first_words
        self.early_first = early_first and first_words > 0
        self.max_chars = max_chars
        #: characters read by the scan so far (a measure of the work done)
        self.scanned = 0
        self._reset(0)

    def _reset(self, pos: int) -> None:
        """Scan state for a unit starting at `pos` of buf."""
        self._pos = pos  # next character to read
        self._armed = False  # the text read ends in an end mark (then maybe closers)
        self._words = 0  # words begun since the unit's start
        self._word_start: int | None = None  # where the word being read began
        self._last_ws: int | None = None  # the last word boundary within max_chars
        self._spoken = False  # a letter or digit was read: a dash now ends a clause

    def push(self, piece: str) -> list[str]:
        self.buf += piece
        out: list[str] = []
        start = 0
        while (cut := self._cut(start)) is not None:
            sentence = self.buf[start:cut].strip()
            if _WORD.search(sentence):
                out.append(sentence)
                self.emitted += 1
            start = cut
            self._reset(cut)
        if start:
            self.buf = self.buf[start:]
            self._pos -= start
            if self._word_start is not None:
                self._word_start -= start
            if self._last_ws is not None:
                self._last_ws -= start
        return out

    def _ends_sentence(self, word: str) -> bool:
        """`word` ends in an end mark (and maybe closers) before whitespace: is it a sentence's
        end? Not after an abbreviation ("Dr.") or an initial ("J."), where "." is no end."""
        core = word.rstrip("\"')]")
        if not core.endswith(".") or core.endswith(".."):
            return True
        stem = core[:-1]
        if len(stem) == 1 and stem.isalpha() and stem.isupper():
            return False
        return stem.lower() not in ABBREVIATIONS

    def _may_end(self, word: str) -> bool:
        """A first unit cut after `first_words` words does not end on a word that leans on the
        next ("to", "the", "of"...): it would be spoken with a falling end, as a sentence is. It
        takes up to two more words to reach one that can end it."""
        return self._words >= self.first_words + _LEANING_GRACE or word.lower() not in _LEANING

    def _cut(self, start: int) -> int | None:
        """Where the unit starting at `start` ends, if that is known yet: at the first sentence
        end; for a reply's first unit, also at the first clause boundary or after `first_words`
        words; failing that, when the text has grown past max_chars, at its last word boundary
        within max_chars (or at max_chars itself)."""
        buf = self.buf
        limit = start + self.max_chars + _LOOKAHEAD
        end = min(len(buf), limit)
        first = self.early_first and self.emitted == 0
        i = self._pos
        while i < end:
            c = buf[i]
            if c.isspace():
                ws = self._word_start
                if self._armed and ws is not None and self._ends_sentence(buf[ws:i]):
                    return self._stop(i)
                self._armed = False
                if ws is not None:  # a word ended here
                    if first and (
                        buf[i - 1] == ","
                        or buf[ws:i] in _HYPHEN_DASHES
                        or (self._words >= self.first_words and self._may_end(buf[ws:i]))
                    ):
                        return self._stop(i)
                    self._word_start = None
                if self._words and i <= start + self.max_chars:
                    self._last_ws = i
            else:
                if self._word_start is None:
                    self._word_start = i
                    self._words += 1
                if c in _MARKS:
                    self._armed = True
                elif c not in _CLOSERS:
                    self._armed = False
                if c.isalnum():
                    self._spoken = True
                elif first and c in _DASHES and self._spoken:
                    return self._stop(i + 1)
            i += 1
        self.scanned += i - self._pos
        self._pos = i
        if i >= limit:
            return self._last_ws if self._last_ws is not None else start + self.max_chars
        return None

    def _stop(self, i: int) -> int:
        self.scanned += i - self._pos
        self._pos = i
        return i

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        self._reset(0)
        out: list[str] = []
        # the scan reads up to _LOOKAHEAD past max_chars before it cuts: the rest may hold that
        while len(rest) > self.max_chars:
            cut = max(
                rest.rfind(" ", 0, self.max_chars + 1), rest.rfind("\n", 0, self.max_chars + 1)
            )
            cut = cut if cut > 0 else self.max_chars
            out.append(rest[:cut].strip())
            rest = rest[cut:].strip()
        out.append(rest)
        out = [unit for unit in out if _WORD.search(unit)]
        self.emitted += len(out)
        return out
