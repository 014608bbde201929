"""voicemesh/bus/bus.py on a real nats-server: what a subscription observes per frame."""

from __future__ import annotations

from prometheus_client import REGISTRY

from tests.support import until
from voicemesh.bus import Bus, Frame
from voicemesh.bus.bus import AGE_SAMPLE


def observed(hop: str) -> float:
    return REGISTRY.get_sample_value("voicemesh_frame_age_seconds_count", {"stage": hop}) or 0.0


async def test_frame_age_takes_every_text_frame_and_one_audio_frame_in_the_sample(
    bus: Bus, prefix: str
) -> None:
    """The histogram is fed per frame on the hot path: audio is sampled (a lock and a bucket
    search 50 times a second per call cost 5% of a stage), units of text are not."""
    hop = f"test-{prefix}"
    got: list[Frame] = []

    async def handler(_: str, frame: Frame) -> None:
        got.append(frame)

    await bus.subscribe(f"{prefix}.age", handler, hop=hop)
    await bus.settle()
    audio, texts = 3 * AGE_SAMPLE + 5, 4
    for i in range(audio):
        await bus.publish(f"{prefix}.age", Frame.audio(bytes(640), sample_rate=16000, seq=i))
    for _ in range(texts):
        await bus.publish(f"{prefix}.age", Frame.text("a sentence."))
    await until(lambda: len(got) == audio + texts, what="every frame")
    assert observed(hop) == audio // AGE_SAMPLE + texts
