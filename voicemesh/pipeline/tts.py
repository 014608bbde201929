"""TTS stage: stateless. Any instance takes a sentence from the `tts` queue group and streams its
audio, at the connector's native rate, to the next hop; sentence index and chunk sequence let the
transport play sentences synthesized in parallel in order."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from voicemesh.bus import Flag, Frame
from voicemesh.bus.events import ErrorEvent, Hop
from voicemesh.config.stages import Stage
from voicemesh.connectors.audio import quiet_lead
from voicemesh.connectors.base import Connector, TTSConnector
from voicemesh.connectors.fallback import caller_error
from voicemesh.pipeline.base import QueuedStage
from voicemesh.state.claims import DONE

log = logging.getLogger(__name__)

MARKER_RATE = 16000  # rate named in the header of empty marker frames
#: the most of a reply's opening near-silence the stage drops (a voice that starts softly is
#: never cut into past this)
LEAD_TRIM_MAX_S = 0.3


async def resume_sentence(
    conn: Connector, text: str, delivered: list[tuple[bytes, int]]
) -> AsyncIterator[tuple[bytes, int]]:
    """A sentence's audio from `conn`, as (pcm, rate); after a fallback mid-sentence, starting
    where the audio already sent stopped (by duration: voices differ in pace, so the cut is
    approximate, never a repeat of whole words already heard)."""
    assert isinstance(conn, TTSConnector)
    rate = conn.sample_rate
    skip = int(sum(len(pcm) / 2 / r for pcm, r in delivered) * rate) * 2  # bytes at this rate
    async for pcm in conn.synthesize(text):
        if skip >= len(pcm):
            skip -= len(pcm)
            continue
        pcm, skip = pcm[skip:], 0
        yield pcm, rate


class TTSService(QueuedStage):
    role = Stage.TTS

    async def work(self, session: str, frame: Frame) -> str:
        await self._synthesize(session, frame)
        return DONE

    async def _synthesize(self, session: str, frame: Frame) -> None:
        cached = await self.router.load(session)
        # hop: -> voicemesh.transport.call.call.Call._egress (vm.transport.<sid>, default flow)
        out = self.router.next_subject_of(cached.config, session)
        common = {"epoch": frame.epoch, "index": frame.index, "origin_ns": frame.origin_ns}
        if not frame.payload:  # the end-of-reply marker: pass it on
            await self.bus.publish(
                out, Frame.audio(b"", sample_rate=MARKER_RATE, flags=frame.flags, **common)
            )
            return
        chain = self.chain(cached.config, session=session, epoch=frame.epoch)
        seq, rate = 0, MARKER_RATE
        t0 = time.perf_counter()
        # The reply's first unit starts at its first sound: the caller waits for nothing else.
        # Later units keep their onsets, which are the pauses between phrases.
        trimming, trimmed = frame.index == 0, 0
        try:
            async for conn, (pcm, rate) in chain.stream(
                lambda c, done: resume_sentence(c, frame.as_text, done)
            ):
                if trimming:
                    budget = max(0, int(LEAD_TRIM_MAX_S * rate) * 2 - trimmed)
                    cut = min(quiet_lead(pcm, rate), budget)
                    trimmed += cut
                    pcm = pcm[cut:]
                    if not pcm:
                        continue
                    trimming = False
                if seq == 0 and frame.index == 0:
                    # the turn's first audio: report this hop ahead of it (same subject, same
                    # connection: the transport has the figure before it sends the audio on)
                    ttfb = round((time.perf_counter() - t0) * 1000, 1)
                    hop = Hop(stage=Stage.TTS, epoch=frame.epoch, ttfb_ms=ttfb, connector=conn.name)
                    await self.notify(session, hop, epoch=frame.epoch)
                flags = Flag.START if seq == 0 else Flag.NONE
                await self.bus.publish(
                    out, Frame.audio(pcm, sample_rate=rate, seq=seq, flags=flags, **common)
                )
                seq += 1
        except Exception as exc:  # not CancelledError: a newer turn needs no end for this one
            log.error("sentence %d of turn %d failed: %s", frame.index, frame.epoch, exc)
            text, code = caller_error(Stage.TTS, exc)  # the provider's words stay in the log
            failed = ErrorEvent(error=text, code=code, stage=Stage.TTS, epoch=frame.epoch)
            await self.notify(session, failed, epoch=frame.epoch)
        # Always close the sentence, or the transport would hold every later one back. LAST is
        # carried over for flows whose text comes straight from STT (one sentence per turn).
        end = Flag.END | (frame.flags & Flag.LAST)
        await self.bus.publish(
            out, Frame.audio(b"", sample_rate=rate, seq=seq, flags=end, **common)
        )
