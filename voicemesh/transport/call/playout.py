"""Bot audio waiting to be played to the caller, cut into 20 ms frames at the peer's rate and paced
out in real time by the call.

The queue lives here, on the transport, rather than in the peer's own buffers: a barge-in can then
drop everything not yet played at once, and the call knows how much of each sentence the caller
actually heard, which is what goes into the conversation context.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: default bound on the bot audio waiting to be played (VOICEMESH_PLAYOUT_MAX_S)
MAX_QUEUED_S = 120.0


@dataclass(slots=True)
class Chunk:
    epoch: int
    index: int
    pcm: bytes = b""
    #: the marker after the reply's last audio: the bot has finished speaking when it is played
    last: bool = False


@dataclass
class Heard:
    """What the caller heard of one reply when it was cut off: per sentence index, the seconds
    played and the seconds synthesized (so far)."""

    epoch: int
    played_s: dict[int, float] = field(default_factory=dict)
    total_s: dict[int, float] = field(default_factory=dict)

    def fraction(self, index: int) -> float:
        total = self.total_s.get(index, 0.0)
        return min(1.0, self.played_s.get(index, 0.0) / total) if total > 0 else 0.0


@dataclass
class Played:
    """One frame out of the playout: audio (None when the queue is empty) and the replies whose
    last audio it finished."""

    pcm: bytes | None
    epoch: int = 0
    finished: tuple[int, ...] = ()


class Playout:
    """`max_s`: once this much audio waits unplayed, the rest of the reply being pushed is dropped
    (one warning per reply), so a runaway reply cannot grow the transport's memory unbounded."""

    def __init__(self, rate: int, frame_ms: int = 20, *, max_s: float = MAX_QUEUED_S):
        self.rate = rate
        self.frame_bytes = rate * frame_ms // 1000 * 2
        self.max_bytes = max(self.frame_bytes, int(max_s * rate) * 2)
        #: queued_bytes at or past this takes push() to _over(): max_bytes, or -1 while dropping
        self._limit = self.max_bytes
        self._dropping: int | None = None  # the reply whose further audio is dropped
        #: bytes of bot audio dropped so far, over all replies
        self.dropped_bytes = 0
        self._queue: deque[Chunk] = deque()
        self._partial = bytearray()  # less than a frame, waiting for the rest of its sentence
        self._partial_tag: tuple[int, int] | None = None
        self._played: dict[tuple[int, int], float] = {}
        self._total: dict[tuple[int, int], float] = {}
        self.queued_bytes = 0

    def __len__(self) -> int:
        """Whole frames waiting."""
        return self.queued_bytes // self.frame_bytes

    @property
    def ready(self) -> bool:
        """A frame (or the end-of-reply marker) can be pulled now. Less than a frame of a
        sentence still arriving is not ready: it waits for the rest, or its sentence's end."""
        return bool(self._queue)

    def push(self, pcm: bytes, *, epoch: int, index: int) -> None:
        tag = (epoch, index)
        self._total[tag] = self._total.get(tag, 0.0) + len(pcm) / 2 / self.rate
        if self.queued_bytes >= self._limit and self._over(epoch):
            self.dropped_bytes += len(pcm)
            return
        if self._partial_tag not in (None, tag):
            self._flush_partial()
        self._partial_tag = tag
        self._partial += pcm
        n = len(self._partial) // self.frame_bytes * self.frame_bytes
        for i in range(0, n, self.frame_bytes):
            self._queue.append(Chunk(epoch, index, bytes(self._partial[i : i + self.frame_bytes])))
        self.queued_bytes += n
        del self._partial[:n]

    def _over(self, epoch: int) -> bool:
        """The queue is full, or a reply's audio is being dropped: is `epoch`'s to be dropped?"""
        if self._dropping == epoch:
            return True
        self._dropping, self._limit = None, self.max_bytes  # a new reply: it gets a chance
        if self.queued_bytes < self.max_bytes:
            return False
        self._dropping, self._limit = epoch, -1
        log.warning(
            "reply %d: over %.0f s of its audio waiting to be played; the rest of it is dropped "
            "(VOICEMESH_PLAYOUT_MAX_S)",
            epoch,
            self.max_bytes / 2 / self.rate,
        )
        return True

    def end_sentence(self, *, epoch: int, index: int) -> None:
        """The sentence is complete: its last part frame goes out padded, not held back."""
        if self._partial_tag == (epoch, index):
            self._flush_partial()

    def end_reply(self, epoch: int) -> None:
        self._flush_partial()
        self._queue.append(Chunk(epoch, -1, last=True))

    def _flush_partial(self) -> None:
        if self._partial and self._partial_tag is not None:
            pcm = bytes(self._partial) + bytes(self.frame_bytes - len(self._partial))
            self._queue.append(Chunk(*self._partial_tag, pcm))
            self.queued_bytes += len(pcm)
        self._partial.clear()
        self._partial_tag = None

    def pull(self) -> Played:
        """The next frame to play (pcm None: nothing to play now)."""
        finished: list[int] = []
        while self._queue and self._queue[0].last:
            finished.append(self._queue.popleft().epoch)
        if not self._queue:
            return Played(None, finished=tuple(finished))
        chunk = self._queue.popleft()
        self.queued_bytes -= len(chunk.pcm)
        tag = (chunk.epoch, chunk.index)
        self._played[tag] = self._played.get(tag, 0.0) + len(chunk.pcm) / 2 / self.rate
        while self._queue and self._queue[0].last:  # the reply ends with this frame
            finished.append(self._queue.popleft().epoch)
        return Played(chunk.pcm, chunk.epoch, tuple(finished))

    def clear(self, epoch: int) -> Heard:
        """Drop everything not yet played (a barge-in) and say what was heard of `epoch`'s reply."""
        heard = Heard(epoch)
        for (e, index), seconds in self._total.items():
            if e == epoch:
                heard.total_s[index] = seconds
                heard.played_s[index] = self._played.get((e, index), 0.0)
        self._queue.clear()
        self._partial.clear()
        self._partial_tag = None
        self.queued_bytes = 0
        self._dropping, self._limit = None, self.max_bytes
        self.forget(epoch)
        return heard

    def forget(self, epoch: int) -> None:
        """Drop the accounting of replies up to `epoch` (they are over)."""
        for tag in [t for t in self._total if t[0] <= epoch]:
            self._total.pop(tag, None)
            self._played.pop(tag, None)


def truncate(sentences: dict[int, str], heard: Heard) -> str:
    """The reply as far as the caller heard it: whole sentences played, then the words of the one
    cut off in proportion to its audio played (rounded up: a word begun counts as said)."""
    said: list[str] = []
    for index in sorted(sentences):
        fraction = heard.fraction(index)
        if fraction <= 0:
            break
        words = sentences[index].split()
        if fraction >= 0.999:
            said.append(sentences[index].strip())
            continue
        keep = -(-len(words) * fraction // 1)  # ceil
        said.append(" ".join(words[: int(keep)]))
        break
    return " ".join(s for s in said if s)
