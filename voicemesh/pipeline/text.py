"""Cutting an LLM's token stream into sentences so TTS can start on the first one at once."""

from __future__ import annotations

import re

# What the splitter looks for, as patterns (the scan in SentenceSplitter follows them one
# character at a time, so that text arriving in small pieces is read once, not once per piece):
#   a sentence ends after [.!?;:]+["')\]]* followed by whitespace;
_MARKS = frozenset(".!?;:")
_CLOSERS = frozenset("\"')]")
#   a first clause may end after ",(?=\s)";
# and a word that opens a new clause: a long first sentence may be cut before one of them.
_JOIN = re.compile(r"\s(?=(?:and|but|because|which|that|so|while|when|where|who|with)\s)", re.I)
_JOIN_LENGTHS = frozenset(
    len(w) for w in "and but because which that so while when where who with".split()
)
_WORD = re.compile(r"[A-Za-z0-9]")

#: a sentence with no end in sight is cut at a word boundary once it holds this many characters
MAX_SENTENCE_CHARS = 1000
# how far past that the scan reads before cutting, so that an end mark, a comma or a clause word
# at the limit is seen whether the text came in one piece or in many
_LOOKAHEAD = 16


class SentenceSplitter:
    """Yields whole sentences. The very first may be cut early, since time to first audio
    matters more there than prosody (TTS engines synthesize a whole chunk before its first
    sample): at a comma once it holds `first_clause_words` words, or, past `first_join_words`
    words with no punctuation yet, before a word that opens a new clause ("that", "and", ...).

    No sentence grows past `max_chars` (+ a few characters of look-ahead): a run of text with no
    end mark is cut at its last word boundary within `max_chars`, so a runaway reply reaches TTS
    in bounded pieces. Each character is scanned once (a few again after such a cut), however
    small the pieces: `scanned` counts them."""

    def __init__(
        self,
        *,
        first_clause_words: int = 6,
        first_join_words: int = 6,
        max_chars: int = MAX_SENTENCE_CHARS,
    ):
        self.buf = ""
        self.emitted = 0
        self.first_clause_words = first_clause_words
        self.first_join_words = first_join_words
        self.max_chars = max_chars
        #: characters read by the scan so far (a measure of the work done)
        self.scanned = 0
        self._reset(0)

    def _reset(self, pos: int) -> None:
        """Scan state for a sentence starting at `pos` of buf."""
        self._pos = pos  # next character to read
        self._armed = False  # the text read ends in an end mark (then maybe closers)
        self._words = 0  # words begun since the sentence's start
        self._word_start: int | None = None  # where the word being read began
        self._last_ws: int | None = None  # the last word boundary within max_chars

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

    def _cut(self, start: int) -> int | None:
        """Where the sentence starting at `start` ends, if that is known yet: at the first end
        mark; failing that (the first sentence only) at the first comma past enough words, else
        before the first clause word past enough words; failing that, when the text has grown
        past max_chars, at its last word boundary within max_chars (or at max_chars itself)."""
        buf = self.buf
        limit = start + self.max_chars + _LOOKAHEAD
        end = min(len(buf), limit)
        first = self.emitted == 0
        clause: int | None = None
        join: int | None = None
        i = self._pos
        while i < end:
            c = buf[i]
            if c.isspace():
                if self._armed:
                    self.scanned += i - self._pos
                    self._pos = i
                    return i
                ws = self._word_start
                if ws is not None:  # a word ended here
                    if first and clause is None and buf[i - 1] == ",":
                        before = self._words - (ws == i - 1)  # words before the comma
                        if before >= self.first_clause_words:
                            clause = i
                    if (
                        first
                        and join is None
                        and i - ws in _JOIN_LENGTHS
                        and ws - 1 >= start
                        and self._words - 1 >= self.first_join_words
                        and _JOIN.match(buf, ws - 1)
                    ):
                        join = ws - 1
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
            i += 1
        self.scanned += i - self._pos
        self._pos = i
        if clause is not None:
            return clause
        if join is not None:
            return join
        if i >= limit:
            return self._last_ws if self._last_ws is not None else start + self.max_chars
        return None

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        self._reset(0)
        if _WORD.search(rest):
            self.emitted += 1
            return [rest]
        return []
