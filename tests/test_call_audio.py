"""The call's audio framing (voicemesh/transport/call/audio.py: Rechunker)."""

from __future__ import annotations

from voicemesh.transport.call.audio import FRAME_BYTES, Rechunker


def test_rechunker_exact_frames() -> None:
    r = Rechunker()
    data = bytes(range(256)) * 20  # 5120 bytes = 8 frames of 640
    chunks = [data[:1000], data[1000:1001], data[1001:3000], data[3000:]]
    out: list[bytes] = []
    sizes = []
    for c in chunks:
        got = r.push(c)
        sizes.append(len(got))
        out += got
    assert sizes == [1, 0, 3, 4]
    assert all(len(f) == FRAME_BYTES for f in out)
    assert b"".join(out) == data


def test_rechunker_keeps_remainder() -> None:
    r = Rechunker(frame_bytes=4)
    assert r.push(b"abc") == []
    assert r.push(b"d") == [b"abcd"]
    assert r.push(b"efghij") == [b"efgh"]
    assert r.push(b"kl") == [b"ijkl"]
    assert r.push(b"") == []
