"""The wire codec: a 32-byte struct header, then the raw payload; bad bytes raise FrameError."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from voicemesh.bus.codec import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    VERSION,
    Flag,
    Frame,
    FrameError,
    Kind,
    decode,
    encode,
)


def _pcm(samples: int = 320, channels: int = 1) -> bytes:
    rng = np.random.default_rng(7)
    return rng.integers(-32768, 32767, samples * channels, dtype=np.int16).tobytes()


def _header(**over: int) -> bytes:
    fields = dict(
        version=VERSION,
        kind=int(Kind.AUDIO),
        flags=0,
        epoch=0,
        index=0,
        seq=0,
        rate=16000,
        channels=1,
        origin=0,
    )
    fields.update(over)
    return HEADER.pack(*fields.values())


def test_header_is_32_bytes() -> None:
    assert HEADER_SIZE == 32
    assert HEADER.size == 32
    assert len(encode(Frame.text(""))) == 32
    assert len(encode(Frame.text("hi"))) == 34


def test_audio_roundtrip_keeps_every_field() -> None:
    pcm = _pcm(320)
    frame = Frame.audio(
        pcm,
        sample_rate=16000,
        epoch=7,
        index=3,
        seq=123456,
        flags=Flag.START | Flag.END,
        origin_ns=1_700_000_000_123_456_789,
    )
    data = encode(frame)
    assert len(data) == 32 + 640
    # The payload is the raw PCM, right after the header: no base64, no JSON.
    assert data[32:] == pcm
    out = decode(data)
    assert out == frame
    assert out.kind is Kind.AUDIO
    assert out.sample_rate == 16000 and out.channels == 1
    assert out.epoch == 7 and out.index == 3 and out.seq == 123456
    assert out.has(Flag.START) and out.has(Flag.END) and not out.has(Flag.LAST)
    assert out.origin_ns == 1_700_000_000_123_456_789


def test_audio_roundtrip_stereo_at_native_tts_rate() -> None:
    pcm = _pcm(441, channels=2)
    frame = Frame.audio(pcm, sample_rate=22050, channels=2, flags=Flag.LAST)
    out = decode(encode(frame))
    assert out.payload == pcm
    assert (out.sample_rate, out.channels) == (22050, 2)
    assert out.has(Flag.LAST)


def test_header_fields_at_documented_offsets() -> None:
    frame = Frame.audio(b"\x01\x00", sample_rate=48000, epoch=2, index=5, seq=9, origin_ns=42)
    frame.flags = Flag.END
    data = encode(frame)
    version, kind, flags, epoch, index, seq, rate, channels = struct.unpack_from("<BBHIIIIB", data)
    assert (version, kind, flags, epoch, index, seq, rate, channels) == (
        VERSION,
        1,
        2,
        2,
        5,
        9,
        48000,
        1,
    )
    assert data[21:24] == b"\x00\x00\x00"  # reserved
    assert struct.unpack_from("<Q", data, 24)[0] == 42


def test_text_roundtrip_utf8() -> None:
    frame = Frame.text("Grüße, 世界! ✓", epoch=3, index=1, flags=Flag.END | Flag.LAST)
    data = encode(frame)
    assert data[32:] == "Grüße, 世界! ✓".encode()
    out = decode(data)
    assert out.kind is Kind.TEXT
    assert out.as_text == "Grüße, 世界! ✓"
    assert (out.epoch, out.index) == (3, 1)
    assert out.has(Flag.LAST)
    assert out.sample_rate == 0 and out.channels == 0


def test_event_roundtrip() -> None:
    body = {"type": "interrupt", "epoch": 4, "nested": {"a": [1, 2, None]}, "s": "é"}
    out = decode(encode(Frame.event(body, epoch=4)))
    assert out.kind is Kind.EVENT
    assert out.as_event == body
    assert out.epoch == 4


def test_empty_event_and_text_payloads() -> None:
    assert decode(encode(Frame.text(""))).as_text == ""
    assert decode(encode(Frame.event({}))).as_event == {}


def test_event_payload_must_be_an_object() -> None:
    with pytest.raises(FrameError, match="JSON object"):
        decode(encode(Frame(Kind.EVENT, b"[1, 2]")))
    with pytest.raises(FrameError, match="not JSON"):
        decode(encode(Frame(Kind.EVENT, b"not json")))
    with pytest.raises(FrameError, match="UTF-8"):
        decode(encode(Frame(Kind.TEXT, b"\xff\xfe")))
    with pytest.raises(FrameError):
        _ = Frame(Kind.EVENT, b"[1, 2]").as_event


def test_default_origin_is_now() -> None:
    import time

    before = time.time_ns()
    out = decode(encode(Frame.text("x")))
    after = time.time_ns()
    assert before <= out.origin_ns <= after


@pytest.mark.parametrize("size", [0, 1, 16, 31])
def test_short_frame(size: int) -> None:
    with pytest.raises(FrameError, match="shorter"):
        decode(b"\x01" * size)


def test_truncated_header_of_a_real_frame() -> None:
    data = encode(Frame.audio(_pcm(320), sample_rate=16000))
    with pytest.raises(FrameError):
        decode(data[:20])


def test_truncated_audio_payload_is_odd_length() -> None:
    data = encode(Frame.audio(_pcm(320), sample_rate=16000))
    with pytest.raises(FrameError, match="PCM16"):
        decode(data[:-1])


def test_odd_pcm_length() -> None:
    with pytest.raises(FrameError, match="PCM16"):
        decode(_header() + b"\x00\x01\x02")


def test_stereo_payload_must_be_whole_sample_pairs() -> None:
    # 6 bytes = 3 int16 samples: not a whole number of stereo frames.
    with pytest.raises(FrameError):
        decode(_header(channels=2) + b"\x00" * 6)
    assert decode(_header(channels=2) + b"\x00" * 8).channels == 2


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version: int) -> None:
    data = bytearray(encode(Frame.text("hi")))
    data[0] = version
    with pytest.raises(FrameError, match="version"):
        decode(bytes(data))


@pytest.mark.parametrize("kind", [0, 4, 200])
def test_unknown_kind(kind: int) -> None:
    data = bytearray(encode(Frame.text("hi")))
    data[1] = kind
    with pytest.raises(FrameError, match="kind"):
        decode(bytes(data))


@pytest.mark.parametrize(("rate", "channels"), [(0, 1), (16000, 0), (16000, 9), (500, 1)])
def test_audio_with_impossible_format(rate: int, channels: int) -> None:
    with pytest.raises(FrameError):
        decode(_header(rate=rate, channels=channels) + b"\x00\x00" * max(channels, 1))


def test_oversized_payload() -> None:
    ok = encode(Frame.text("a" * MAX_PAYLOAD))
    assert len(decode(ok).payload) == MAX_PAYLOAD
    with pytest.raises(FrameError, match="exceeds"):
        decode(encode(Frame.text("a" * (MAX_PAYLOAD + 1))))
