"""The shipped test set of voices the bot was never tuned on: espeak-ng, flite and festival
voices and a few human recordings, each utterance finished or cut mid-clause. Made once by
benchmarks/make_voices.py; see README.md beside the WAVs for what is here and where it came from.
"""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DIR = Path(__file__).resolve().parent
MANIFEST = DIR / "manifest.json"


class VoiceItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*\.wav$")
    text: str = Field(min_length=1)
    label: Literal["finished", "unfinished"]
    voice: str = Field(min_length=1)
    synthesizer: str
    settings: str
    human: bool
    #: RMS of the noise mixed in (dBFS), None for clean audio; a benchmark pads the pause with it
    noise_dbfs: float | None

    @property
    def path(self) -> Path:
        return DIR / self.file


class VoiceSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: Literal[16000]
    lead_ms: int
    trail_ms: int
    made_by: str
    items: tuple[VoiceItem, ...]


@cache
def load() -> VoiceSet:
    return VoiceSet.model_validate_json(MANIFEST.read_bytes())


def turns(n: int, *, label: str = "finished") -> list[VoiceItem]:
    """n utterances of one label for a call, taking the voices in turn (round-robin) so that
    even a short run hears several voices and none of them is the bot's own."""
    by_voice: dict[str, list[VoiceItem]] = {}
    for item in load().items:
        if item.label == label:
            by_voice.setdefault(item.voice, []).append(item)
    ring = [
        item
        for group in itertools.zip_longest(*by_voice.values())
        for item in group
        if item is not None
    ]
    if not ring:
        raise RuntimeError(f"the shipped voice set has no {label} utterance")
    return [ring[i % len(ring)] for i in range(n)]
