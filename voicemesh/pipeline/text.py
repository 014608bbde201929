"""Cutting an LLM's token stream into sentences so TTS can start on the first one at once."""

from __future__ import annotations

import re

_END = re.compile(r"[.!?;:]+[\"')\]]*(?=\s)")
_CLAUSE = re.compile(r",(?=\s)")
# Words that open a new clause: a long first sentence may be cut before one of them.
_JOIN = re.compile(r"\s(?=(?:and|but|because|which|that|so|while|when|where|who|with)\s)", re.I)
_WORD = re.compile(r"[A-Za-z0-9]")


class SentenceSplitter:
    """Yields whole sentences. The very first may be cut early, since time to first audio
    matters more there than prosody (TTS engines synthesize a whole chunk before its first
    sample): at a comma once it holds `first_clause_words` words, or, past `first_join_words`
    words with no punctuation yet, before a word that opens a new clause ("that", "and", ...)."""

    def __init__(self, *, first_clause_words: int = 6, first_join_words: int = 6):
        self.buf = ""
        self.emitted = 0
        self.first_clause_words = first_clause_words
        self.first_join_words = first_join_words

    def push(self, piece: str) -> list[str]:
        self.buf += piece
        out: list[str] = []
        while True:
            cut = self._cut()
            if cut is None:
                return out
            sentence, self.buf = self.buf[:cut].strip(), self.buf[cut:]
            if _WORD.search(sentence):
                out.append(sentence)
                self.emitted += 1

    def _cut(self) -> int | None:
        m = _END.search(self.buf)
        if m:
            return m.end()
        if self.emitted == 0:
            for c in _CLAUSE.finditer(self.buf):
                if len(self.buf[: c.start()].split()) >= self.first_clause_words:
                    return c.end()
            for j in _JOIN.finditer(self.buf):
                # the joining word must be complete (followed by more text) to be sure of it
                if len(self.buf[: j.start()].split()) >= self.first_join_words:
                    return j.start()
        return None

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        if _WORD.search(rest):
            self.emitted += 1
            return [rest]
        return []
