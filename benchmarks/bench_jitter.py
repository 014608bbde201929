"""One-way audio latency through aiortc on loopback, by receiver jitter-buffer size.

Two aiortc peers in this process: the sender's track puts a tone burst into a stream of silence
every 400 ms; the receiver times each burst from the moment the sender's track handed it to aiortc
to the moment it came out of the receiving track (Opus encode, RTP over loopback, jitter buffer,
decode). aiortc's own receiver holds 4 packets (80 ms) before it plays any; voicemesh sets the
buffer per session (`jitter_buffer_ms`, default 20). Ratios are against aiortc's default measured
in the same run.

    .venv/bin/python benchmarks/bench_jitter.py [--seconds 8] [--out benchmarks/results/jitter.md]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack
from av import AudioFrame

from voicemesh.transport.carriers.rtc import (
    audio_frame,
    offer_loopback_candidates,
    set_jitter_buffer,
)

RATE = 48000
SAMPLES = RATE // 50  # 20 ms
BURST_EVERY = 20  # frames: one burst per 400 ms


class Bursts(MediaStreamTrack):
    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.start: float | None = None
        self.sent: list[float] = []
        t = np.arange(SAMPLES) / RATE
        self.burst = (0.5 * np.sin(2 * np.pi * 1000 * t) * 32767).astype(np.int16).tobytes()
        self.silence = bytes(SAMPLES * 2)

    async def recv(self) -> AudioFrame:
        if self.start is None:
            self.start = time.perf_counter()
        delay = self.start + self.n * 0.02 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        burst = self.n % BURST_EVERY == 0 and self.n > 0
        frame = audio_frame(self.burst if burst else self.silence, RATE, self.n * SAMPLES)
        if burst:
            self.sent.append(time.perf_counter())
        self.n += 1
        return frame


async def measure(jitter_ms: int | None, seconds: float) -> list[float]:
    """Latencies (ms) of every burst; jitter_ms None keeps aiortc's default buffer."""
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    source = Bursts()
    sender.addTrack(source)
    got: list[float] = []
    done = asyncio.Event()

    async def consume(track: MediaStreamTrack) -> None:
        loud = False
        while not done.is_set():
            frame = await track.recv()
            pcm = frame.to_ndarray().astype(np.float32)
            now = time.perf_counter()
            peak = float(np.abs(pcm).max()) if pcm.size else 0.0
            if peak > 3000 and not loud:
                got.append(now)
            loud = peak > 3000

    tasks: list[asyncio.Task[None]] = []

    @receiver.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.create_task(consume(track)))

    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    if jitter_ms is not None:
        set_jitter_buffer(receiver.getTransceivers()[0].receiver, jitter_ms)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    await asyncio.sleep(seconds)
    done.set()
    await sender.close()
    await receiver.close()
    for t in tasks:
        t.cancel()
    # pair each burst sent with the first burst heard after it (and before the next one)
    out: list[float] = []
    for i, sent in enumerate(source.sent):
        limit = source.sent[i + 1] if i + 1 < len(source.sent) else sent + 0.4
        heard = [g for g in got if sent <= g < limit]
        if heard:
            out.append((heard[0] - sent) * 1000)
    return out[1:]  # the first burst also pays for the connection warming up


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default="benchmarks/results/jitter.md")
    args = ap.parse_args()
    offer_loopback_candidates()
    cases: list[tuple[str, int | None]] = [
        ("aiortc default (prefetch 4 = 80 ms)", None),
        ("jitter_buffer_ms 40", 40),
        ("jitter_buffer_ms 20 (voicemesh default)", 20),
        ("jitter_buffer_ms 0", 0),
    ]
    rows = []
    base = None
    for name, ms in cases:
        lat = await measure(ms, args.seconds)
        p50 = statistics.median(lat)
        p95 = sorted(lat)[int(0.95 * (len(lat) - 1))]
        base = base or p50
        rows.append(f"| {name} | {len(lat)} | {p50:.1f} | {p95:.1f} | {p50 / base:.2f}× |")
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| receiver jitter buffer | bursts | one-way p50 (ms) | p95 (ms) | p50 vs default |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    text = (
        "# One-way audio latency through aiortc on loopback\n\n"
        f"`benchmarks/bench_jitter.py --seconds {args.seconds:g}`: a 20 ms tone burst every "
        "400 ms, timed from the sender's track to the receiver's track (Opus, RTP on loopback, "
        "jitter buffer, decode).\n\n" + table + "\n"
    )
    write(Path(args.out), text)
    print(f"\n{table}\nwrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
