"""aiortc media plumbing that both ends of a WebRTC call need: the WebRTC carrier (webrtc.py) and
the headless WebRTC caller (voicemesh.callers.webrtc). Kept apart from the carrier so the caller,
which can call any SmallWebRTC server, does not import a server's routes and service to get at it,
and so both ends convert audio and tune aiortc the same way.

Everything here is media, not signalling: PCM16 to and from aiortc's AudioFrame, the receiver's
jitter buffer (aiortc has no option for it), and the loopback host candidate aioice leaves out.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import threading
from typing import Any

import aioice.ice
import av
import numpy as np
import soxr
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterBuffer
from av import AudioFrame, CodecContext, Packet

log = logging.getLogger(__name__)

#: Opus runs at 48 kHz whatever the audio; one 20 ms frame is this many samples
OPUS_RATE = 48000
OPUS_FRAME_SAMPLES = OPUS_RATE // 50
#: aiortc's own encoder's bit rate, kept so the caller hears the same quality
OPUS_BIT_RATE = 96000


def jitter_buffer(ms: int, capacity: int = 16) -> JitterBuffer:
    """An audio jitter buffer that starts playing after `ms` of packets (20 ms each), holding up
    to `capacity` packets (a power of 2; aiortc drops what a burst brings beyond it)."""
    prefetch = round(ms / 20)
    while capacity < 2 * prefetch:
        capacity *= 2
    return JitterBuffer(capacity=capacity, prefetch=prefetch)


def set_jitter_buffer(receiver: Any, ms: int, capacity: int = 16) -> None:
    """Replace aiortc's audio jitter buffer (it has no option for it) before packets arrive."""
    receiver._RTCRtpReceiver__jitter_buffer = jitter_buffer(ms, capacity)


#: a call's undecodable packets are logged the first time and then once in this many
LOG_EVERY = 500


class MonoOpusDecoder:
    """aiortc's OpusDecoder, but mono (InlineDecoding says why)."""

    def __init__(self) -> None:
        self.codec = CodecContext.create("libopus", "r")
        self.codec.format = "s16"
        self.codec.layout = "mono"
        self.codec.sample_rate = OPUS_RATE
        self._time_base = fractions.Fraction(1, OPUS_RATE)

    def decode(self, encoded: Any) -> list[AudioFrame]:
        packet = Packet(encoded.data)
        packet.pts, packet.time_base = encoded.timestamp, self._time_base
        return self.codec.decode(packet)


class InlineDecoding:
    """Stands in for an RTCRtpReceiver's decoder queue so that each packet is decoded where it
    arrives, on the event loop, rather than handed to the receiver's decoder thread and its
    frames handed back (a Queue.put that wakes the thread, run_coroutine_threadsafe with its
    future and callback for every frame). An Opus frame decodes in tens of microseconds; the
    two hops cost more than that, and on one core a thread per call only adds GIL switches.

    Opus is decoded to mono (aiortc's decoder makes stereo, which to_16k_mono then averaged in
    float): a mono stream, what browsers and our callers send, comes out as the same samples
    within 2 LSB (libopus renders mono and stereo output apart), and libopus downmixes a stereo
    one itself; either way for about half the work.

    aiortc still starts its decoder thread, with this object as its queue: the thread waits in
    get() until the receiver stops (put(None)), then ends the track as it always did."""

    def __init__(self, output: asyncio.Queue[Any], error: threading.Event) -> None:
        self._output, self._error = output, error
        self._idle: queue.Queue[Any] = queue.Queue()
        self._decoder: Any = None
        self._codec_name: str | None = None
        self.failed = 0  # packets that did not decode

    def get(self) -> Any:
        return self._idle.get()

    def put(self, task: Any) -> None:
        if task is None:  # the receiver stops: the thread ends the track
            self._idle.put(None)
            return
        codec, encoded = task
        if codec.name != self._codec_name:
            self._codec_name = codec.name
            self._decoder = MonoOpusDecoder() if codec.name == "opus" else get_decoder(codec)
        try:
            frames = self._decoder.decode(encoded)
        except av.FFmpegError as exc:  # as aiortc's thread: keep the decoder state, go on
            # the caller is untrusted: a stream of bad packets must not flood the log at 50 a
            # second, as aiortc's thread would (the first, then one in LOG_EVERY)
            if self.failed % LOG_EVERY == 0:
                log.warning(
                    "failed to decode %s frame (%d so far): %s", codec.name, self.failed + 1, exc
                )
            self.failed += 1
            self._error.set()
            return
        for frame in frames:
            self._output.put_nowait(frame)


def decode_inline(receiver: Any) -> None:
    """Decode this receiver's packets on the event loop (InlineDecoding says why). Only before
    its decoder thread starts (receive(), once connected): a thread already waiting on the old
    queue would never see the end."""
    if receiver._RTCRtpReceiver__decoder_thread is not None or receiver._track is None:
        return
    receiver._RTCRtpReceiver__decoder_queue = InlineDecoding(
        receiver._track._queue, receiver._RTCRtpReceiver__decoder_error
    )


_original_host_addresses = aioice.ice.get_host_addresses


def offer_loopback_candidates() -> None:
    """aioice never offers 127.0.0.1; a caller on this host with no other interface needs it."""

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = _original_host_addresses(use_ipv4, use_ipv6)
        return [*found, "127.0.0.1"] if use_ipv4 and "127.0.0.1" not in found else found

    aioice.ice.get_host_addresses = with_loopback


def audio_frame(pcm: bytes, rate: int, pts: int) -> AudioFrame:
    """PCM16 mono as the frame aiortc's encoder takes, stamped at `pts` samples."""
    frame = AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
    frame.planes[0].update(pcm)
    frame.sample_rate, frame.pts = rate, pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


class OpusPackets:
    """Mono 48 kHz PCM16 frames to Opus packets, on the caller's thread. A track that returns
    these from recv() has aiortc send them as they are (RTCRtpSender packs a Packet rather than
    encoding a Frame), which spares per 20 ms frame: aiortc's hop to a thread pool for each
    encode and back, its pure-Python loop over the samples for the RTP audio-level header
    (RFC 6464, optional and unused by our peers), and its resampler that turns mono into
    stereo (which also lowered the level by 3 dB) before a stereo encode. libopus encodes a
    20 ms mono frame in tens of microseconds: less than the thread hop alone cost."""

    def __init__(self, rate: int = OPUS_RATE) -> None:
        self.rate = rate  # libopus takes 8, 12, 16, 24 or 48 kHz as they are
        self.codec = CodecContext.create("libopus", "w")
        self.codec.bit_rate = OPUS_BIT_RATE
        self.codec.format = "s16"
        self.codec.layout = "mono"
        self.codec.sample_rate = rate
        self.codec.time_base = fractions.Fraction(1, rate)
        self.codec.options = {"application": "voip"}
        self._time_base = fractions.Fraction(1, rate)
        self._zeros = b""
        self._silent: bytes | None = None  # the packet the settled encoder makes of silence
        self._last = b""

    def encode(self, pcm: bytes, pts: int) -> Packet | None:
        """One 20 ms frame stamped `pts` (in samples at `rate`) as its packet; None while the
        encoder holds it back (never, for whole frames).

        Digital silence (what the call sends between replies, half of a call or more) is not
        encoded again once the encoder has settled on it: after a frame or two of zeros libopus
        makes the same 3-byte packet for each, so that packet is sent as it is until sound comes
        back, and the encoder takes up from where the silence settled. What the caller then
        hears differs from encoding every zero frame by about -65 dB for the first ~20 frames
        (at most 29 LSB on a 10 000 LSB tone): libopus keeps some history across frames."""
        if len(pcm) != len(self._zeros):
            self._zeros = bytes(len(pcm))
        if self._silent is not None and pcm == self._zeros:
            packet = Packet(self._silent)
        else:
            packets = self.codec.encode(audio_frame(pcm, self.rate, pts))
            if not packets:
                return None
            packet = packets[0]
            data = bytes(packet)
            if pcm != self._zeros:
                self._last = b""
            elif data == self._last:  # two alike in a row: settled
                self._silent = data
            else:
                self._last = data
        if pcm != self._zeros:
            self._silent = None
        # libopus stamps its packets early by its look-ahead; RTP wants our clock
        packet.pts, packet.time_base = pts, self._time_base
        return packet


def to_16k_mono(frame: AudioFrame, resampler: soxr.ResampleStream) -> bytes:
    """Decoded Opus (s16, packed, 48 kHz: stereo from aiortc's decoder, mono from
    InlineDecoding) as 16 kHz mono PCM16."""
    data = frame.to_ndarray()  # packed: shape (1, samples * channels)
    channels = len(frame.layout.channels)
    if channels == 1:  # as InlineDecoding decodes: the samples as they are, no float round trip
        return resampler.resample_chunk(data.reshape(-1)).tobytes()
    samples = data.reshape(-1, channels).astype(np.float32).mean(axis=1)
    return resampler.resample_chunk(samples.astype(np.int16)).tobytes()
