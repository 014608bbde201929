"""voicemesh/connectors/audio.py: the helpers connectors and the TTS stage share."""

from __future__ import annotations

import numpy as np

from voicemesh.connectors.audio import quiet_lead

RATE = 22050


def pcm(*parts: tuple[int, float]) -> bytes:
    """(ms, amplitude 0..1) pieces of a 440 Hz tone, PCM16."""
    out = []
    for ms, amp in parts:
        t = np.arange(RATE * ms // 1000) / RATE
        out.append((amp * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2"))
    return np.concatenate(out).tobytes()


def test_the_quiet_opening_is_dropped_but_for_ten_ms() -> None:
    audio = pcm((50, 0.001), (200, 0.3))  # -60 dBFS for 50 ms, then the voice
    cut = quiet_lead(audio, RATE)
    assert abs(cut / 2 / RATE * 1000 - 40) <= 5  # 50 ms quiet, 10 ms kept
    assert quiet_lead(audio[cut:], RATE) <= 2 * RATE * 10 // 1000


def test_a_loud_start_loses_nothing_and_a_quiet_chunk_all_of_it() -> None:
    assert quiet_lead(pcm((200, 0.3)), RATE) == 0
    quiet = pcm((30, 0.0005))
    assert quiet_lead(quiet, RATE) == len(quiet)
    assert quiet_lead(b"", RATE) == 0
    assert quiet_lead(quiet + b"\x01", RATE) == len(quiet)  # an odd byte is never split off alone


def test_a_soft_voice_over_the_threshold_is_kept() -> None:
    audio = pcm((100, 0.01), (100, 0.3))  # -40 dBFS: soft, but sound
    assert quiet_lead(audio, RATE) == 0
