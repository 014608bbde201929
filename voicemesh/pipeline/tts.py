"""TTS stage: stateless. Any instance takes a sentence from the `tts` queue group and streams its
audio, at the connector's native rate, to the next hop; sentence index and chunk sequence let the
transport play sentences synthesized in parallel in order."""

from __future__ import annotations

from voicemesh.connectors.base import TTSConnector
from voicemesh.connectors.fallback import chain_of, stream_first
from voicemesh.pipeline.base import StageService
from voicemesh.router import Flag, Frame, Kind, Subjects

MARKER_RATE = 16000  # rate named in the header of empty marker frames


class TTSService(StageService):
    role = "tts"

    async def setup(self) -> None:
        await self.bus.subscribe(self.subjects.data_all("tts"), self._on_text, queue="tts")

    async def _on_text(self, subject: str, frame: Frame) -> None:
        session = Subjects.session_of(subject)
        if frame.kind is not Kind.TEXT or not self.current(session, frame.epoch):
            return
        self.track(session, frame.epoch, self._speak(session, frame))

    async def _speak(self, session: str, frame: Frame) -> None:
        cached = await self.router.load(session)
        out = self.router.next_subject(session)
        common = {"epoch": frame.epoch, "index": frame.index, "origin_ns": frame.origin_ns}
        if not frame.payload:  # the end-of-reply marker: pass it on
            await self.bus.publish(
                out, Frame.audio(b"", sample_rate=MARKER_RATE, flags=frame.flags, **common)
            )
            return
        chain = await chain_of(self.pool, cached.config, "tts")
        seq, rate = 0, MARKER_RATE
        async for conn, pcm in stream_first(chain, lambda c: c.synthesize(frame.as_text)):  # type: ignore[attr-defined]
            assert isinstance(conn, TTSConnector)
            rate = conn.sample_rate
            flags = Flag.START if seq == 0 else Flag.NONE
            await self.bus.publish(
                out, Frame.audio(pcm, sample_rate=rate, seq=seq, flags=flags, **common)
            )
            seq += 1
        await self.bus.publish(
            out, Frame.audio(b"", sample_rate=rate, seq=seq, flags=Flag.END, **common)
        )
