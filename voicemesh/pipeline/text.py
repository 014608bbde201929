"""Cutting an LLM's token stream into sentences so TTS can start on the first one at once."""

from __future__ import annotations

import re

_END = re.compile(r"[.!?;:]+[\"')\]]*(?=\s)")
_CLAUSE = re.compile(r",(?=\s)")
_WORD = re.compile(r"[A-Za-z0-9]")


class SentenceSplitter:
    """Yields whole sentences; the very first may be cut at a comma once it holds
    `first_clause_words` words, since time to first audio matters more there than prosody."""

    def __init__(self, *, first_clause_words: int = 6):
        self.buf = ""
        self.emitted = 0
        self.first_clause_words = first_clause_words

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
        return None

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        if _WORD.search(rest):
            self.emitted += 1
            return [rest]
        return []
