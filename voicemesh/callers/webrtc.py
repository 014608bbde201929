"""A headless caller for the WebRTC carrier (aiortc), to measure what a browser user would hear:
the microphone is a track that plays WAV files in real time, the bot's audio is recorded, events
come on the data channel. Signalling is pipecat's SmallWebRTC shape, so this client can call any
server that speaks it.

Latency here is the caller's own: from the end of its speech to the first audible bot audio out of
its jitter buffer, so it includes both directions of the media path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soxr
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, Packet

from voicemesh.bus.events import End
from voicemesh.callers.script import CallResult, Script, TurnResult, load_pcm16
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS, RATE
from voicemesh.transport.carriers.rtc import (
    OpusPackets,
    audio_frame,
    decode_inline,
    offer_loopback_candidates,
    set_jitter_buffer,
    to_16k_mono,
)

log = logging.getLogger(__name__)

#: a bot frame louder than this (dBFS) counts as sound: the transport sends silence between replies
AUDIBLE_DBFS = -50.0


class Microphone(MediaStreamTrack):
    """16 kHz PCM16 frames queued by the caller, sent one per 20 ms; silence when none is queued."""

    kind = "audio"

    def __init__(self, *, inline_codec: bool = False) -> None:
        super().__init__()
        self._frames: asyncio.Queue[bytes] = asyncio.Queue()
        self._taken = asyncio.Event()
        self._start: float | None = None
        self._pts = 0
        #: encode here, mono at 16 kHz, rather than in aiortc's thread pool (rtc.OpusPackets)
        self._opus = OpusPackets(RATE) if inline_codec else None

    async def say(self, frame: bytes) -> None:
        """Queue one frame and return when it is due, so the caller keeps real time."""
        self._frames.put_nowait(frame)
        while self._frames.qsize() > 1:  # the track's clock, not ours, sets the pace
            self._taken.clear()
            await self._taken.wait()

    async def recv(self) -> AudioFrame | Packet:  # aiortc takes a Frame or an encoded Packet
        if self.readyState != "live":
            raise MediaStreamError
        samples = RATE * FRAME_MS // 1000
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._pts / RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.2:  # fell behind (a stalled loop): resync rather than send a burst
            self._start = time.monotonic() - self._pts / RATE
        pcm = self._frames.get_nowait() if not self._frames.empty() else bytes(FRAME_BYTES)
        self._taken.set()
        pts = self._pts
        self._pts += samples
        if self._opus is not None and (packet := self._opus.encode(pcm, pts)) is not None:
            return packet
        return audio_frame(pcm, RATE, pts)


def _dbfs(samples: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0
    return 20 * np.log10(max(rms, 1e-9) / 32768.0)


async def call_over_webrtc(
    url: str,
    wavs: list[Path],
    out: Path | None,
    *,
    agent: str | None = None,
    session_id: str | None = None,
    turn_timeout: float = 60.0,
    pause_s: float = 0.3,
    after_turn: Callable[[int, TurnResult], Awaitable[None]] | None = None,
    api_key: str | None = None,
    jitter_buffer_ms: int = 20,
    loopback: bool = True,
    on_audio: Callable[[float, bytes], None] | None = None,
    barge_in_after_s: float | None = None,
    on_stats: Callable[[Any], None] | None = None,
    inline_codec: bool = False,
) -> CallResult:
    """Say each WAV as one turn over WebRTC, wait for the reply to be played, record the bot.
    `loopback` also offers 127.0.0.1 as a candidate (aioice skips it), for a server on this host.
    `on_audio(t, pcm16k)` sees every received frame as it arrives (tests time barge-ins with it).
    `on_stats(report)` gets aiortc's RTCStatsReport as the call ends (RTCP's packets lost, both
    ways: the load generator counts drops with it). `inline_codec`: Opus encoded and decoded on
    the loop as the transport does (rtc.OpusPackets, rtc.decode_inline), with room in the jitter
    buffer for a burst after a stall of this process, so that a load generator's many callers
    cost less and its own stalls are not counted as drops; the microphone is then mono, 3 dB
    louder at the transport than through aiortc's mono-to-stereo resampler."""
    if loopback:
        offer_loopback_candidates()
    utterances = [load_pcm16(w) for w in wavs]
    script = Script(latency_on_sound=True)
    mic = Microphone(inline_codec=inline_codec)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver(mic, direction="sendrecv")
    set_jitter_buffer(transceiver.receiver, jitter_buffer_ms, 256 if inline_codec else 16)
    events = pc.createDataChannel("events")
    opened = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    @events.on("open")
    def _open() -> None:
        opened.set()

    @events.on("message")
    def _message(message: Any) -> None:
        # pings and SmallWebRTC's own signalling messages (renegotiation) are the connection's,
        # not the call's events
        if isinstance(message, str) and not message.startswith("ping"):
            if '"type":"signalling"' not in message.replace(" ", ""):
                script.on_event(message)

    async def record(track: MediaStreamTrack) -> None:
        resampler: soxr.ResampleStream | None = None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, AudioFrame)  # only audio tracks are recorded (see _track)
            if resampler is None:
                resampler = soxr.ResampleStream(frame.sample_rate, RATE, 1, dtype="int16")
            pcm = to_16k_mono(frame, resampler)
            audible = _dbfs(np.frombuffer(pcm, dtype=np.int16)) > AUDIBLE_DBFS
            script.on_audio(pcm, audible=audible)
            if on_audio is not None:
                on_audio(time.perf_counter(), pcm)

    @pc.on("track")
    def _track(track: MediaStreamTrack) -> None:
        if inline_codec:  # its receiver has its remote track now, and no decoder thread yet
            for t in pc.getTransceivers():
                if t.receiver.track is track:
                    decode_inline(t.receiver)
        if track.kind == "audio":
            tasks.append(asyncio.create_task(record(track)))

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        await pc.setLocalDescription(await pc.createOffer())
        body = {
            "sdp": pc.localDescription.sdp,
            "type": pc.localDescription.type,
            "request_data": {"agent": agent, "session_id": session_id},
        }
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(f"{url.rstrip('/')}/api/offer", json=body, headers=headers)
        if reply.status_code != 200:
            detail = reply.json().get("detail") if reply.content else reply.reason_phrase
            raise RuntimeError(f"the transport refused the call ({reply.status_code}): {detail}")
        answer = reply.json()
        script.session_id = answer.get("session_id")
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await asyncio.wait_for(opened.wait(), 15)

        await script.speak(
            utterances,
            mic.say,
            pause_s=pause_s,
            turn_timeout=turn_timeout,
            after_turn=after_turn,
            alive=lambda: pc.connectionState not in ("failed", "closed"),
            barge_in_after_s=barge_in_after_s,
        )
        if on_stats is not None:
            on_stats(await pc.getStats())
        events.send(End().wire_json().decode())
        closed = asyncio.Event()

        def on_state_change() -> None:
            if pc.connectionState == "closed":
                closed.set()

        pc.on("connectionstatechange", on_state_change)
        with contextlib.suppress(TimeoutError):  # the transport hangs up on "end"
            await asyncio.wait_for(closed.wait(), 2)
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return script.result(out)
