"""Piper's first audio (voicemesh/connectors/tts/piper.py): phrase by phrase, each phrase's audio
out as soon as it exists; the onnxruntime session's threads; the warm-up; the settings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from voicemesh.config.connectors import PiperOptions
from voicemesh.config.settings import Settings
from voicemesh.connectors.threads import usable_cores

pytest.importorskip("piper")

from piper import SynthesisConfig

from voicemesh.connectors.tts import piper as piper_tts
from voicemesh.connectors.tts.piper import PiperTTS, load_voice, phrases, speak

#: one sentence (Piper's synthesize makes it one chunk) of ~45 words with clause breaks
LONG = (
    "Well, the weather here today looks sunny and warm, with a light breeze coming in from the "
    "west all afternoon; so take a hat, some water and a good book - and if it rains later in "
    "the evening, come back inside and make yourself a nice cup of tea."
)


def test_phrases_end_at_clause_breaks() -> None:
    assert phrases(LONG) == [
        "Well,",
        "the weather here today looks sunny and warm,",
        "with a light breeze coming in from the west all afternoon;",
        "so take a hat,",
        "some water and a good book -",
        "and if it rains later in the evening,",
        "come back inside and make yourself a nice cup of tea.",
    ]
    assert phrases("It is 1,000 miles. A well-known way\u2014yes: ok") == [
        "It is 1,000 miles. A well-known way\u2014yes:",
        "ok",
    ]
    assert phrases('He said "no," then left.') == ['He said "no,"', "then left."]
    assert phrases("   ") == []


async def test_a_long_sentence_s_first_audio_comes_before_the_rest_is_made() -> None:
    """On main the connector yielded Piper's one chunk per sentence: a 45-word sentence's first
    audio came when all of it was made. Now its first phrase is out first."""
    conn = PiperTTS(PiperOptions())
    await conn.warmup()
    times: list[float] = []
    sizes: list[int] = []
    t0 = time.perf_counter()
    async for pcm in conn.synthesize(LONG):
        times.append(time.perf_counter() - t0)
        sizes.append(len(pcm))
    assert len(times) == len(phrases(LONG))
    assert times[0] < 0.5 * times[-1], times
    assert sizes[0] < 0.2 * sum(sizes)  # "Well," is a small part of the audio
    assert sum(sizes) / 2 / conn.sample_rate > 8  # all of it spoken


def test_a_phrase_sounds_as_piper_makes_it() -> None:
    """Same samples as PiperVoice.synthesize for a text with no clause break (noise off, so the
    model is deterministic), and one piece per sentence."""
    voice = load_voice("joe", 1)
    syn = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    text = "The weather looks sunny today. Take a hat."
    theirs = [c.audio_int16_bytes for c in voice.synthesize(text, syn_config=syn)]
    ours = list(speak(voice, text, syn))
    assert len(ours) == 2 and ours == theirs
    loud = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, volume=0.5)
    half = np.frombuffer(b"".join(speak(voice, text, loud)), dtype=np.int16)
    assert 16000 < np.abs(half).max() <= 16384  # normalized to full range, then the volume


def test_the_session_never_spins_and_takes_its_thread_count() -> None:
    """piper-tts's own PiperVoice.load keeps onnxruntime's default: spin-waiting threads, which
    delay Piper's first audio 14-40% on 2 cores busy with other work
    (benchmarks/bench_tts_first_audio.py)."""
    one = load_voice("joe", 1).session.get_session_options()
    assert one.intra_op_num_threads == 1
    assert one.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    many = load_voice("joe", 64).session.get_session_options()
    assert many.intra_op_num_threads == usable_cores()  # never past this process's cores
    assert load_voice("joe", 0).session.get_session_options().intra_op_num_threads == 0


def test_the_connector_loads_with_voicemesh_piper_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_PIPER_THREADS", "1")
    piper_tts._voice.cache_clear()
    try:
        voice, _ = piper_tts._voice("joe")
        assert voice.session.get_session_options().intra_op_num_threads == 1
    finally:
        piper_tts._voice.cache_clear()


async def test_the_voice_runs_once_when_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run of a fresh session is slower than later ones: the process pays it when
    the voice loads (at preload, or the pool's warmup), once, not on a caller's first unit nor
    again for a connector made for a session's own options."""
    said: list[str] = []
    real = piper_tts.speak

    def spy(voice: object, text: str, syn: object):  # type: ignore[no-untyped-def]
        said.append(text)
        return real(voice, text, syn)

    monkeypatch.setattr(piper_tts, "speak", spy)
    piper_tts._voice.cache_clear()
    try:
        await PiperTTS(PiperOptions()).warmup()
        await PiperTTS(PiperOptions(length_scale=1.2)).warmup()
        assert said == [piper_tts.WARMUP_TEXT]
    finally:
        piper_tts._voice.cache_clear()


def test_settings() -> None:
    assert Settings.model_fields["piper_threads"].default == 0
    assert Settings.model_fields["first_unit_words"].default == 5
    assert Settings(piper_threads=2, first_unit_words=0).piper_threads == 2
    for bad in ({"piper_threads": -1}, {"first_unit_words": -1}, {"first_unit_words": 101}):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_PIPER_THREADS", "1")
    monkeypatch.setenv("VOICEMESH_FIRST_UNIT_WORDS", "3")
    settings = Settings()
    assert (settings.piper_threads, settings.first_unit_words) == (1, 3)


async def test_a_reply_s_next_unit_waits_for_the_one_before() -> None:
    """Units of a reply reach a TTS instance one after another while the first is still being
    made. The next must not share the cores with it (which would delay the audio the caller
    needs first): units are made in the order they came, each still phrase by phrase."""
    conn = PiperTTS(PiperOptions())
    await conn.warmup()
    order: list[str] = []
    started = asyncio.Event()

    async def run(name: str, text: str) -> None:
        async for _ in conn.synthesize(text):
            order.append(name)
            started.set()

    first = asyncio.ensure_future(run("first", "Well, the weather today looks sunny and warm."))
    await started.wait()  # its first phrase is out; its second is being made
    await asyncio.gather(first, run("next", "Take a hat, and some water."))
    assert order == ["first", "first", "next", "next"]


async def test_the_reply_s_first_unit_starts_at_its_first_sound(
    services: Any, bus: Any, store: Any, subjects: Any, agent_json: dict
) -> None:
    """Piper opens each phrase with 40-50 ms under -40 dBFS. The TTS stage drops that from the
    reply's first unit (index 0: the caller hears the bot that much sooner), not from later ones,
    whose opening is the pause between phrases."""
    from tests.support import listen
    from voicemesh.bus import Frame, Kind
    from voicemesh.config.models import parse_agent_config
    from voicemesh.connectors.audio import quiet_lead
    from voicemesh.pipeline import TTSService

    sid = (await store.create_session(parse_agent_config(agent_json))).session_id
    out = await listen(bus, subjects.data("transport", sid))
    await services.start(TTSService)
    text = "The capital of France is Paris."
    for index in (0, 1):
        await bus.publish(subjects.data("tts", sid), Frame.text(text, epoch=1, index=index))
    await out.wait_for(
        lambda fs: sum(1 for f in fs if f.kind is Kind.AUDIO and not f.payload) >= 2, 30
    )
    audio = {i: b"".join(f.payload for f in out.of(Kind.AUDIO) if f.index == i) for i in (0, 1)}
    rate = {f.sample_rate for f in out.of(Kind.AUDIO) if f.payload}.pop()
    lead = {i: quiet_lead(audio[i], rate) / 2 / rate * 1000 for i in (0, 1)}
    assert lead[1] >= 20, lead  # the voice's own opening, kept in a later unit
    assert lead[0] <= 5, lead  # only the 10 ms lead-in is left, which quiet_lead keeps
