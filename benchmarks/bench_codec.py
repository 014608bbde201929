"""Frame codec cost against the alternatives DESIGN.md rejected, measured in the same run.

    .venv/bin/python benchmarks/bench_codec.py

Prints µs per encode+decode of one 20 ms, 16 kHz PCM16 frame (640 B) for: the voicemesh struct
header, JSON with base64 audio, and the same fields as NATS headers (nats-py's header parser),
with ratios against the struct header.
"""

from __future__ import annotations

import base64
import time

import orjson
from nats.aio.client import Client

from voicemesh.router.codec import Flag, Frame, decode, encode

PCM = bytes(range(256)) * 2 + bytes(128)  # 640 bytes
N = 50_000


def per_op(fn, n: int = N) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def struct_roundtrip() -> None:
    f = Frame.audio(PCM, sample_rate=16000, epoch=3, seq=42, flags=Flag.START)
    decode(encode(f))


def json_b64_roundtrip() -> None:
    body = {
        "kind": 1,
        "epoch": 3,
        "seq": 42,
        "flags": 1,
        "rate": 16000,
        "channels": 1,
        "origin_ns": time.time_ns(),
        "audio": base64.b64encode(PCM).decode(),
    }
    d = orjson.loads(orjson.dumps(body))
    base64.b64decode(d["audio"])


_client = Client()
_HDR = (
    b"NATS/1.0\r\nVm-Kind: 1\r\nVm-Epoch: 3\r\nVm-Seq: 42\r\nVm-Flags: 1\r\nVm-Rate: 16000\r\n"
    b"Vm-Origin: 1700000000000000000\r\n\r\n"
)


def nats_headers_roundtrip() -> None:
    hdr = {
        "Vm-Kind": "1",
        "Vm-Epoch": "3",
        "Vm-Seq": "42",
        "Vm-Flags": "1",
        "Vm-Rate": "16000",
        "Vm-Origin": str(time.time_ns()),
    }
    b"".join(f"{k}: {v}\r\n".encode() for k, v in hdr.items())  # what publish() builds
    # what the subscriber's nats-py parses for each message (a coroutine with no awaits inside)
    coro = _client._process_headers(_HDR)
    try:
        coro.send(None)
    except StopIteration:
        pass


def main() -> None:
    base = per_op(struct_roundtrip)
    rows = [
        ("struct header + raw PCM (voicemesh)", base),
        ("JSON + base64 audio", per_op(json_b64_roundtrip)),
        ("NATS headers + raw PCM", per_op(nats_headers_roundtrip)),
    ]
    print(f"{'format':<38} {'µs/frame':>9} {'× voicemesh':>12}")
    for name, us in rows:
        print(f"{name:<38} {us:>9.2f} {us / base:>12.2f}")


if __name__ == "__main__":
    main()
