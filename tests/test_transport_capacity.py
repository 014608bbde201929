"""Issue 14, transport side: the media plumbing that takes Opus off aiortc's threads (rtc.py), and
the load generator's and profile's arithmetic (voicemesh/callers/load.py, voicemesh/bench/pyspy.py).
The WebRTC calls themselves go through it in tests/test_webrtc.py."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import soxr
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import Packet

from voicemesh.bench.pyspy import IDLE, breakdown
from voicemesh.callers.load import CallStats, heard_in, window
from voicemesh.transport.carriers.rtc import (
    OPUS_FRAME_SAMPLES,
    OPUS_RATE,
    InlineDecoding,
    MonoOpusDecoder,
    OpusPackets,
    to_16k_mono,
)
from voicemesh.transport.carriers.webrtc import BotAudioTrack

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def tone(frames: int, amplitude: int = 10_000) -> list[bytes]:
    t = np.arange(frames * OPUS_FRAME_SAMPLES)
    pcm = (np.sin(t * 2 * np.pi * 440 / OPUS_RATE) * amplitude).astype(np.int16).tobytes()
    n = OPUS_FRAME_SAMPLES * 2
    return [pcm[i : i + n] for i in range(0, len(pcm), n)]


def decode(packets: list[bytes]) -> np.ndarray:
    decoder = OpusDecoder()
    out = [
        f.to_ndarray()[0][::2]  # left of the stereo the decoder makes
        for i, p in enumerate(packets)
        for f in decoder.decode(JitterFrame(p, i * OPUS_FRAME_SAMPLES))
    ]
    return np.concatenate(out).astype(np.float64)


def test_opus_packets_are_stamped_on_our_clock_and_keep_the_level() -> None:
    """aiortc sends a Packet as it is, with its pts as the RTP timestamp: it must be ours (libopus
    stamps its packets early by its look-ahead), and mono must come out at its own level (aiortc's
    mono-to-stereo resampler took 3 dB off)."""
    opus = OpusPackets()
    frames = tone(50)
    packets = [opus.encode(f, i * OPUS_FRAME_SAMPLES) for i, f in enumerate(frames)]
    assert all(isinstance(p, Packet) for p in packets)
    assert [p.pts for p in packets if p is not None] == [i * OPUS_FRAME_SAMPLES for i in range(50)]
    heard = decode([bytes(p) for p in packets if p is not None])
    level = np.abs(heard[OPUS_RATE // 2 :]).max()
    assert 9_000 < level < 11_000


def test_settled_silence_is_sent_without_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    opus = OpusPackets()
    for i, f in enumerate(tone(10)):
        opus.encode(f, i * OPUS_FRAME_SAMPLES)
    silence = bytes(OPUS_FRAME_SAMPLES * 2)
    settled = [bytes(opus.encode(silence, (10 + i) * OPUS_FRAME_SAMPLES) or b"") for i in range(4)]
    calls = 0
    encode = opus.codec.encode

    def counting(frame: object) -> object:
        nonlocal calls
        calls += 1
        return encode(frame)

    monkeypatch.setattr(opus, "codec", type("C", (), {"encode": staticmethod(counting)})())
    later = [opus.encode(silence, (14 + i) * OPUS_FRAME_SAMPLES) for i in range(20)]
    assert calls == 0  # settled: the packet is reused
    assert {bytes(p) for p in later if p is not None} == {settled[-1]}
    assert [p.pts for p in later if p is not None][:2] == [14 * 960, 15 * 960]
    opus.encode(tone(1)[0], 34 * OPUS_FRAME_SAMPLES)
    assert calls == 1  # sound again: encoded


def test_skipping_settled_silence_is_inaudible() -> None:
    """Against encoding every zero frame: the audio after the silence differs by < -55 dB."""
    frames = tone(50) + [bytes(OPUS_FRAME_SAMPLES * 2)] * 30 + tone(50)

    def run(skip: bool) -> list[bytes]:
        opus = OpusPackets()
        out = []
        for i, f in enumerate(frames):
            if not skip:
                opus._silent = None
            out.append(bytes(opus.encode(f, i * OPUS_FRAME_SAMPLES) or b""))
        return out

    a, b = decode(run(True)), decode(run(False))
    rel = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2))
    assert 20 * np.log10(rel + 1e-12) < -55


async def test_bot_track_gives_aiortc_encoded_packets() -> None:
    track = BotAudioTrack()
    for f in tone(3):
        track.put(f)
    got = [await track.recv() for _ in range(3)]
    assert all(isinstance(p, Packet) for p in got)
    assert [p.pts for p in got] == [0, 960, 1920]


async def test_inline_decoding_puts_frames_and_ends_through_the_thread() -> None:
    """Packets decode straight into the track's queue; put(None), what RTCRtpReceiver does on
    stop, reaches the waiting decoder thread (which then ends the track) so its join returns."""
    output: asyncio.Queue[object] = asyncio.Queue()
    inline = InlineDecoding(output, threading.Event())
    opus = OpusPackets()
    for i, f in enumerate(tone(5)):
        packet = opus.encode(f, i * OPUS_FRAME_SAMPLES)
        assert packet is not None
        inline.put((OPUS, JitterFrame(bytes(packet), i * OPUS_FRAME_SAMPLES)))
    assert output.qsize() == 5
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(inline.get()))
    thread.start()
    inline.put(None)
    thread.join(2)
    assert not thread.is_alive() and got == [None]


def test_inline_decoding_survives_bad_packets_without_flooding_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller is untrusted: a stream of undecodable packets is logged once, not 50 times a
    second, and the good packets after it still decode."""
    error = threading.Event()
    output: asyncio.Queue[object] = asyncio.Queue()
    inline = InlineDecoding(output, error)
    for i in range(100):  # code-3 packets with no frame count: 2 s of garbage
        inline.put((OPUS, JitterFrame(b"\xff" * 3, i * OPUS_FRAME_SAMPLES)))
    assert error.is_set() and output.empty() and inline.failed == 100
    assert len([r for r in caplog.records if "failed to decode" in r.message]) == 1
    packet = OpusPackets().encode(tone(1)[0], 0)
    assert packet is not None
    inline.put((OPUS, JitterFrame(bytes(packet), 100 * OPUS_FRAME_SAMPLES)))
    assert output.qsize() == 1


def test_heard_counts_drops_and_jitter_inside_the_window() -> None:
    steady = [10 + i * 0.02 for i in range(200)]
    gappy = [t for i, t in enumerate(steady) if i != 100]  # one frame missing
    late = list(steady)
    late[50] += 0.015  # 15 ms late, then on time again
    stats = [
        CallStats(0, arrivals=steady, started=9.0, ended=15.0),
        CallStats(1, arrivals=gappy, started=9.5, ended=15.0),
        CallStats(2, arrivals=late, started=9.2, ended=14.5),
    ]
    start, end = window(stats, settle_s=0.4)
    assert (start, end) == (pytest.approx(9.9), pytest.approx(14.0))
    heard = heard_in(stats, 10.0, 13.99)
    assert heard.dropped == 1 and heard.calls_dropping == 1
    assert heard.jitter_max_ms == pytest.approx(20.0)  # the gap: 40 ms where 20 were due
    assert heard.jitter_p50_ms == pytest.approx(0.0, abs=1e-6)


def test_profile_breakdown_by_leaf_upwards() -> None:
    folded = "\n".join(
        [
            "thread (0x1);main (voicemesh/__main__.py:1);Runner.run (asyncio/runners.py:118) 70",
            "thread (0x2);_worker (concurrent/futures/thread.py:81) 5",
            "thread (0x1);Runner.run (asyncio/runners.py:118);_run_rtp (aiortc/rtcrtpsender.py:3);"
            "recv (voicemesh/transport/carriers/webrtc.py:80);"
            "OpusPackets.encode (voicemesh/transport/carriers/rtc.py:120) 9",
            "thread (0x3);decoder_worker (aiortc/rtcrtpreceiver.py:76);"
            "OpusDecoder.decode (aiortc/codecs/opus.py:28) 4",
            "thread (0x1);Call.run (voicemesh/transport/call/call.py:200);"
            "TurnDetector.push (voicemesh/transport/call/turns.py:300);"
            "TurnDetector.voiced (voicemesh/transport/call/turns.py:250) 3",
            "thread (0x1);Call._turn_event (voicemesh/transport/call/call.py:260);"
            "Bus.publish (voicemesh/bus/bus.py:50) 2",
        ]
    )
    counts = breakdown(folded)
    assert counts[IDLE] == 75
    assert counts["Opus encode (voicemesh, on the loop)"] == 9
    assert counts["Opus decode (aiortc/PyAV)"] == 4
    assert counts["VAD (webrtcvad / Silero)"] == 3
    assert counts["NATS publish / frame encode"] == 2


def test_mono_decoding_hears_the_same_samples_as_aiortcs_stereo() -> None:
    """A mono stream (what browsers and our callers send) decoded to mono gives the transport
    the 16 kHz samples aiortc's stereo decode and the float average gave, within 2 LSB (libopus
    renders mono and stereo output apart)."""
    opus = OpusPackets(16_000)
    t = np.arange(320 * 100)
    pcm = (np.sin(t * 2 * np.pi * 300 / 16_000) * 8_000).astype(np.int16).tobytes()
    packets = [bytes(opus.encode(pcm[i : i + 640], i // 2) or b"") for i in range(0, len(pcm), 640)]

    def heard(decoder: object) -> np.ndarray:
        resampler = soxr.ResampleStream(OPUS_RATE, 16_000, 1, dtype="int16")
        pcm16 = b"".join(
            to_16k_mono(f, resampler)
            for i, p in enumerate(packets)
            for f in decoder.decode(JitterFrame(p, i * OPUS_FRAME_SAMPLES))  # type: ignore[attr-defined]
        )
        return np.frombuffer(pcm16, dtype=np.int16).astype(np.int32)

    mono, stereo = heard(MonoOpusDecoder()), heard(OpusDecoder())
    assert mono.size == stereo.size > 30_000
    assert np.abs(mono - stereo).max() <= 2
