"""Speculative STT (issue 13, item 1): the transport marks the caller's pauses on the STT stream,
STT transcribes the audio so far at each mark, and a turn that ends in the pause last marked
takes that transcript without transcribing again; a caller who goes on makes it moot.

The turn detector on synthetic frames; the STT stage on the bus; then whole calls over the
WebSocket transport, real NATS and Valkey, the stages in-process, and a loopback STT that names
each voiced run of tone it hears by its pitch ("tone 220 tone 440"), so a transcript shows
whether the words after a pause were in it. The loopback can hold its answers (`delay_s`) as an
engine's transcription time would.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import soundfile as sf
import websockets
from prometheus_client import REGISTRY

from tests.support import Inbox, Services, heard, listen, loopback_agent, until
from voicemesh.bus import Bus, Flag, Frame, Kind, Subjects
from voicemesh.callers.websocket import call_over_websocket
from voicemesh.config.connectors import TurnOptions
from voicemesh.config.models import parse_agent_config
from voicemesh.pipeline import STTService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer, Transcript
from voicemesh.transport.call.audio import FRAME_BYTES
from voicemesh.transport.call.turns import TurnDetector, TurnEvent, dbfs

# the calls transcribe on a loopback OpenAI-compatible server
pytestmark = pytest.mark.usefixtures("private_egress")

RATE = 16000
SECOND = 2 * RATE  # bytes of one second of PCM16 mono
LONG_REPLY = (
    "One two three four five six seven eight. Nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen. Seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three."
)


def tone(ms: int, hz: float = 220.0) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


HEARD: list[int] = []  # the size of each utterance the loopback STT transcribed


def runs(pcm: bytes) -> str:
    """Each voiced run (20 ms frames over -40 dBFS, at least 100 ms of them) named by its
    pitch, in order."""
    HEARD.append(len(pcm))
    words, run = [], bytearray()
    for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
        frame = pcm[i : i + FRAME_BYTES]
        if dbfs(frame) > -40:
            run += frame
            continue
        if len(run) >= 5 * FRAME_BYTES:
            words.append(heard(bytes(run)))
        run.clear()
    if len(run) >= 5 * FRAME_BYTES:
        words.append(heard(bytes(run)))
    return " ".join(words)


@pytest.fixture(scope="module")
def transcript() -> Transcript:
    return runs


@pytest.fixture
def engine(transcriber: OpenAITranscribeServer) -> Iterator[OpenAITranscribeServer]:
    """The module's loopback transcriber, its delay put back after the test."""
    yield transcriber
    transcriber.delay_s = 0.0


def speculations(outcome: str, stage: str = "stt") -> float:
    labels = {"stage": stage, "outcome": outcome}
    return REGISTRY.get_sample_value("voicemesh_speculations_total", labels) or 0.0


class Counts:
    """voicemesh_speculations_total{stage} by outcome since it was made."""

    OUTCOMES = ("started", "used", "discarded", "skipped")

    def __init__(self, stage: str = "stt") -> None:
        self.stage = stage
        self.base = {o: speculations(o, stage) for o in self.OUTCOMES}

    def __call__(self) -> dict[str, float]:
        return {o: speculations(o, self.stage) - self.base[o] for o in self.OUTCOMES}


# --- the turn detector -----------------------------------------------------------------------


def options(**overrides: Any) -> TurnOptions:
    base: dict[str, Any] = {
        "vad": "energy",
        "turn": "silence",
        "start_speech_ms": 60,
        "preroll_ms": 100,
        "end_of_turn_silence_ms": 200,
        "speculative_stt": True,
    }
    return TurnOptions(**{**base, **overrides})


async def turn_events(det: TurnDetector, pcm: bytes) -> list[tuple[int, TurnEvent]]:
    """Every event but "audio", with the number of the frame that raised it."""
    out = []
    for n, i in enumerate(range(0, len(pcm), FRAME_BYTES)):
        out += [(n, ev) for ev in await det.push(pcm[i : i + FRAME_BYTES]) if ev.kind != "audio"]
    return out


async def test_a_pause_is_marked_halfway_to_the_end_and_the_turn_ends_in_it() -> None:
    """Silence alone, 200 ms to the end: the pause is marked after 100 ms of it, once, and the
    end says the turn ended in that pause. Without speculative_stt: no mark (as on main)."""
    pcm = silence(200) + tone(500) + silence(400)
    got = await turn_events(TurnDetector(options()), pcm)
    speech_end = (200 + 500) // 20  # the first silent frame after the tone
    assert [(n, ev.kind, ev.paused) for n, ev in got][1:] == [
        (speech_end + 5 - 1, "pause", False),
        (speech_end + 10 - 1, "end", True),
    ]
    got = await turn_events(TurnDetector(options(speculative_stt=False)), pcm)
    assert [(ev.kind, ev.paused) for _, ev in got] == [("start", False), ("end", False)]


async def test_each_pause_is_marked_and_speech_after_a_mark_clears_it() -> None:
    """A short pause (140 ms: marked, not the end), more speech, then the end: two marks, the
    speech after the first says the caller resumed, and the end is in the second pause. A turn
    cut by the utterance limit while the caller speaks after a mark did not end in a pause."""
    pcm = silence(200) + tone(400) + silence(140) + tone(400, 440) + silence(400)
    got = await turn_events(TurnDetector(options()), pcm)
    assert [(ev.kind, ev.paused) for _, ev in got] == [
        ("start", False),
        ("pause", False),
        ("resume", False),
        ("pause", False),
        ("end", True),
    ]
    pcm = silence(200) + tone(400) + silence(140) + tone(2000)
    got = await turn_events(TurnDetector(options(), max_utterance_s=1), pcm)
    assert [(ev.kind, ev.cut, ev.paused) for _, ev in got] == [
        ("start", False, False),
        ("pause", False, False),
        ("resume", False, False),
        ("end", True, False),
    ]


async def test_pause_mark_ms_marks_the_pause_sooner_and_never_after_the_end() -> None:
    """pause_mark_ms 100 with silence alone (400 ms to the end): the mark comes after 100 ms of
    silence, not halfway (200 ms); one past the end is clamped to the frame before it."""
    pcm = silence(200) + tone(500) + silence(600)
    speech_end = (200 + 500) // 20
    got = await turn_events(
        TurnDetector(options(end_of_turn_silence_ms=400, pause_mark_ms=100)), pcm
    )
    assert [(n, ev.kind) for n, ev in got][1:] == [
        (speech_end + 5 - 1, "pause"),
        (speech_end + 20 - 1, "end"),
    ]
    got = await turn_events(
        TurnDetector(options(end_of_turn_silence_ms=400, pause_mark_ms=900)), pcm
    )
    assert [(n, ev.kind) for n, ev in got][1:] == [
        (speech_end + 19 - 1, "pause"),
        (speech_end + 20 - 1, "end"),
    ]


async def test_with_smart_turn_the_pause_is_marked_when_the_model_is_asked() -> None:
    det = TurnDetector(options(turn="smart_turn", smart_turn_max_silence_ms=1000))
    pcm = silence(200) + tone(600) + silence(1200)
    asked = marked = None
    for n, i in enumerate(range(0, len(pcm), FRAME_BYTES)):
        events = await det.push(pcm[i : i + FRAME_BYTES])
        if det.deciding and asked is None:
            asked = n
        if any(ev.kind == "pause" for ev in events):
            marked = n
        if any(ev.kind == "end" for ev in events):
            assert [ev.paused for ev in events if ev.kind == "end"] == [True]
            break
        await det.settle()
    assert asked is not None and marked == asked == (200 + 600) // 20 + 10 - 1


# --- the STT stage on the bus ----------------------------------------------------------------


class Line:
    """One session's STT stream, spoken straight onto vm.stt.<sid> as the transport would."""

    def __init__(self, bus: Bus, subjects: Subjects, sid: str, out: Inbox, text: Inbox):
        self.bus, self.subjects, self.sid, self.out, self.text = bus, subjects, sid, out, text
        self.epoch, self.seq = 0, 0

    async def turn(self) -> None:
        self.epoch, self.seq = self.epoch + 1, 0
        turn = Frame.event({"type": "turn", "epoch": self.epoch}, epoch=self.epoch)
        await self.bus.publish(self.subjects.ctl(self.sid), turn)

    async def send(self, pcm: bytes = b"", flags: Flag = Flag.NONE) -> None:
        chunks = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)] or [b""]
        for chunk in chunks:
            first = Flag.START if self.seq == 0 else Flag.NONE
            frame = Frame.audio(
                chunk, sample_rate=RATE, epoch=self.epoch, seq=self.seq, flags=flags | first
            )
            self.seq += 1
            await self.bus.publish(self.subjects.data("stt", self.sid), frame)

    async def final(self) -> dict[str, Any]:
        def finals(frames: list[Frame]) -> list[dict[str, Any]]:
            return [
                e
                for f in frames
                if f.kind is Kind.EVENT and f.epoch == self.epoch
                for e in [f.as_event]
                if e.get("type") == "transcript" and e.get("final")
            ]

        (event,) = finals(await self.out.wait_for(lambda fs: bool(finals(fs)), 10))
        return event


@pytest.fixture
async def lines(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    engine: OpenAITranscribeServer,
) -> AsyncIterator[list[Line]]:
    """Two sessions whose streams one STT instance owns."""
    data = loopback_agent(agent_json, transport="websocket", stt_url=engine.base_url)
    config = parse_agent_config(data)
    if not services.running:
        await services.start(STTService)
    out = []
    for _ in range(2):
        sid = (await store.create_session(config)).session_id
        inboxes = [await listen(bus, subjects.data(stage, sid)) for stage in ("transport", "llm")]
        body = orjson.dumps({"session_id": sid})
        await bus.nc.request(subjects.assign("stt"), body, timeout=5)
        out.append(Line(bus, subjects, sid, *inboxes))
    yield out


async def test_stt_uses_the_speculation_when_the_turn_ends_in_the_pause(
    lines: list[Line], engine: OpenAITranscribeServer
) -> None:
    """The mark starts a transcription at once; END|PAUSE after it has finished sends that
    transcript on without asking the engine again, so END to transcript takes no engine time
    (here 0.3 s a transcription)."""
    line, counts, engine.delay_s = lines[0], Counts(), 0.3
    before = engine.transcriptions
    await line.turn()
    await line.send(tone(600))
    await line.send(flags=Flag.PAUSE)
    await line.send(silence(100))
    await until(lambda: engine.transcriptions == before + 1, what="the speculation")
    t0 = time.perf_counter()
    await line.send(flags=Flag.END | Flag.LAST | Flag.PAUSE)
    final = await line.final()
    took = time.perf_counter() - t0
    assert final["text"] == "tone 220" and final["speculative"] is True, final
    assert final["stt_ms"] < 50 and took < 0.2, (final, took)
    assert HEARD[-1] == 600 * SECOND // 1000  # the audio up to the mark, not the silence after
    text = await line.text.wait_for(lambda fs: bool(fs))
    assert [(f.as_text, f.epoch, f.flags) for f in text] == [
        ("tone 220", 1, Flag.START | Flag.END | Flag.LAST)
    ]
    await asyncio.sleep(0.4)
    assert engine.transcriptions == before + 1, "the utterance was transcribed twice"
    assert counts() == {"started": 1, "used": 1, "discarded": 0, "skipped": 0}


async def test_stt_discards_the_speculation_when_the_caller_goes_on(
    lines: list[Line], engine: OpenAITranscribeServer
) -> None:
    """Speech after the mark, then a plain END: the speculation ("tone 220") is thrown away and
    counted, and the transcript is of the whole utterance."""
    line, counts = lines[0], Counts()
    before = engine.transcriptions
    await line.turn()
    await line.send(tone(400))
    await line.send(flags=Flag.PAUSE)
    await line.send(silence(100) + tone(400, 440))
    await line.send(flags=Flag.END | Flag.LAST)
    final = await line.final()
    assert final["text"] == "tone 220 tone 440" and final["discarded"] == 1, final
    assert "speculative" not in final
    # both in flight at once (the loopback has no lock), so in either order
    assert sorted(HEARD[-2:]) == [400 * SECOND // 1000, (400 + 100 + 400) * SECOND // 1000]
    assert engine.transcriptions == before + 2
    assert counts() == {"started": 1, "used": 0, "discarded": 1, "skipped": 0}


async def test_a_newer_mark_discards_the_older_speculation(
    lines: list[Line], engine: OpenAITranscribeServer
) -> None:
    line, counts = lines[0], Counts()
    before = engine.transcriptions
    await line.turn()
    await line.send(tone(400))
    await line.send(flags=Flag.PAUSE)
    await line.send(silence(100) + tone(400, 440))
    await until(lambda: counts()["started"] == 1 and engine.transcriptions == before + 1)
    await asyncio.sleep(0.1)  # the first speculation is done: the engine is idle again
    await line.send(flags=Flag.PAUSE)
    await line.send(silence(100))
    await line.send(flags=Flag.END | Flag.LAST | Flag.PAUSE)
    final = await line.final()
    assert final["text"] == "tone 220 tone 440", final
    assert final["speculative"] is True and final["discarded"] == 1, final
    assert counts() == {"started": 2, "used": 1, "discarded": 1, "skipped": 0}


async def test_a_speculation_never_starts_while_a_final_transcription_runs(
    lines: list[Line], engine: OpenAITranscribeServer
) -> None:
    """Session A's turn ended and is being transcribed (0.4 s): session B's pause starts no
    speculation, so A's transcription never waits behind one (whisper's lock is process-wide).
    B's END is then transcribed as usual."""
    a, b = lines
    counts, engine.delay_s = Counts(), 0.4
    before = engine.transcriptions
    await a.turn()
    await a.send(tone(400))
    await a.send(flags=Flag.END | Flag.LAST)
    await b.turn()
    await b.send(tone(400, 440))
    await asyncio.sleep(0.1)  # A's END is in the engine
    await b.send(flags=Flag.PAUSE)
    await b.send(silence(100))
    await b.send(flags=Flag.END | Flag.LAST | Flag.PAUSE)
    assert (await a.final())["text"] == "tone 220"
    final = await b.final()
    assert final["text"] == "tone 440" and "speculative" not in final, final
    assert engine.transcriptions == before + 2
    assert counts() == {"started": 0, "used": 0, "discarded": 0, "skipped": 1}


@pytest.mark.parametrize("services_settings", [{"speculative_stt": False}])
async def test_with_speculative_stt_off_the_stage_ignores_the_marks(
    settings: Any,
    services: Services,
    services_settings: dict[str, Any],
    lines: list[Line],
    engine: OpenAITranscribeServer,
) -> None:
    """VOICEMESH_SPECULATIVE_STT=false: the marks start nothing; END|PAUSE is transcribed then."""
    assert [svc.settings.speculative_stt for svc in services.running] == [False]
    line, counts = lines[0], Counts()
    before = engine.transcriptions
    await line.turn()
    await line.send(tone(400))
    await line.send(flags=Flag.PAUSE)
    await asyncio.sleep(0.2)
    assert engine.transcriptions == before
    await line.send(silence(100))
    await line.send(flags=Flag.END | Flag.LAST | Flag.PAUSE)
    final = await line.final()
    assert final["text"] == "tone 220" and "speculative" not in final
    assert engine.transcriptions == before + 1
    assert counts() == {"started": 0, "used": 0, "discarded": 0, "skipped": 0}


@pytest.fixture
def services_settings() -> dict[str, Any]:
    return {}


@pytest.fixture
async def services(settings: Any, services_settings: dict[str, Any]) -> AsyncIterator[Services]:
    """The STT stage on the test's settings with `services_settings` (the calls below start
    the llm and tts stages too)."""
    s = Services(settings.model_copy(update=services_settings))
    yield s
    for svc in reversed(list(s.running)):
        await s.stop(svc)


# --- whole calls -----------------------------------------------------------------------------


def wav(tmp_path: Path, name: str, pcm: bytes) -> Path:
    path = tmp_path / f"{name}.wav"
    sf.write(str(path), np.frombuffer(pcm, "<i2"), RATE, subtype="PCM_16")
    return path


async def agent(
    store: ConfigStore,
    agent_json: dict,
    url: str,
    name: str,
    replies: tuple[str, ...] = ("You said {user}.",),
    **opts: Any,
) -> str:
    data = loopback_agent(
        agent_json,
        transport="websocket",
        stt_url=url,
        replies=list(replies),
        ms_per_word=90,
        **{"end_of_turn_silence_ms": 400, **opts},
    )
    await store.create_agent(name, parse_agent_config(copy.deepcopy(data)))
    return name


async def test_a_call_that_pauses_at_its_end_skips_the_transcription_time(
    transport_app: Any,
    store: ConfigStore,
    agent_json: dict,
    engine: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    """The same two turns with speculative_stt on and off, on an engine that takes 0.15 s a
    transcription (less than the 200 ms from the mark to the end): on, the transport's stt
    phase (its END to the transcript) holds none of it, and each turn was transcribed once;
    off, it holds all of it."""
    engine.delay_s = 0.15
    turns = [
        wav(tmp_path, "a", tone(600) + silence(700)),
        wav(tmp_path, "b", tone(600, 440) + silence(700)),
    ]
    stt_ms: dict[bool, list[float]] = {}
    for on in (False, True):  # off first: it warms the connector up (no preloading here)
        name = await agent(store, agent_json, engine.base_url, f"spec-{on}", speculative_stt=on)
        before, counts = engine.transcriptions, Counts()
        result = await call_over_websocket(transport_app.url, turns, None, agent=name)
        assert [t.user_text for t in result.turns] == ["tone 220", "tone 440"]
        assert [t.bot_text for t in result.turns] == ["You said tone 220.", "You said tone 440."]
        assert engine.transcriptions - before == 2, "a turn was transcribed twice"
        assert [t.stt_speculative for t in result.turns] == [on] * 2
        assert counts()["used"] == (2 if on else 0)
        stt_ms[on] = [float(t.phases["stt_ms"] or 0) for t in result.turns]
    print(f"END to transcript, ms: speculative {stt_ms[True]}, not {stt_ms[False]}")
    assert max(stt_ms[True]) < 60 and min(stt_ms[False]) >= 150, stt_ms


async def test_a_call_that_goes_on_after_a_pause_is_answered_in_whole(
    transport_app: Any,
    store: ConfigStore,
    agent_json: dict,
    engine: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    """A 260 ms pause mid-utterance is marked (200 ms) but is not the end (400 ms): its
    speculation ("tone 220") is discarded and counted, and the reply answers the whole
    utterance, which is also what the context keeps."""
    engine.delay_s = 0.1
    name = await agent(store, agent_json, engine.base_url, "spec-on", speculative_stt=True)
    counts = Counts()
    said = tone(500) + silence(260) + tone(500, 440) + silence(700)
    result = await call_over_websocket(
        transport_app.url, [wav(tmp_path, "a", said)], None, agent=name
    )
    (turn,) = result.turns
    assert turn.user_text == "tone 220 tone 440"
    assert turn.bot_text == "You said tone 220 tone 440."
    assert turn.stt_discarded == 1 and turn.stt_speculative
    assert counts() == {"started": 2, "used": 1, "discarded": 1, "skipped": 0}
    context = await store.get_context(result.session_id)
    assert [(m["role"], m["content"]) for m in context] == [
        ("user", "tone 220 tone 440"),
        ("assistant", "You said tone 220 tone 440."),
    ]


@pytest.mark.parametrize("reply", [False, True], ids=["stt", "stt+reply"])
async def test_a_barge_in_with_speculation_on_cuts_the_bot_off(
    transport_app: Any,
    store: ConfigStore,
    agent_json: dict,
    engine: OpenAITranscribeServer,
    tmp_path: Path,
    reply: bool,
) -> None:
    """Turn 2's long reply is spoken over 1 s in: the bot is cut off, the context keeps what was
    heard of it, and the barge-in turn is transcribed and answered. With speculative replies,
    turn 2's reply was made at the pause, so this is a barge-in over a speculative reply."""
    replies = ("You said {user}.", LONG_REPLY)
    llm = Counts("llm")
    name = await agent(
        store,
        agent_json,
        engine.base_url,
        "spec-on",
        replies,
        speculative_stt=True,
        speculative_reply=reply,
    )
    turns = [
        wav(tmp_path, "a", tone(500) + silence(600)),
        wav(tmp_path, "b", tone(500, 440) + silence(600)),
        wav(tmp_path, "c", tone(500, 660) + silence(600)),
    ]
    result = await call_over_websocket(
        transport_app.url, turns, None, agent=name, turn_timeout=30, barge_in_after_s=1.0
    )
    assert [t.user_text for t in result.turns] == ["tone 220", "tone 440", "tone 660"]
    assert [ev["epoch"] for ev in result.interrupts] == [result.turns[1].epoch]
    assert result.turns[2].bot_text == "You said tone 660."
    context = await store.get_context(result.session_id)
    cut = [m for m in context if m.get("interrupted")]
    assert len(cut) == 1 and 0 < len(cut[0]["content"]) < len(LONG_REPLY), context
    assert context[-1]["content"] == "You said tone 660."
    assert [m["role"] for m in context] == ["user", "assistant"] * 3, context
    assert llm()["used"] == (3 if reply else 0), llm()


async def test_a_speculative_reply_is_never_heard_nor_stored_when_the_caller_goes_on(
    transport_app: Any,
    store: ConfigStore,
    agent_json: dict,
    engine: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    """A 1.2 s pause mid-utterance is marked (700 ms) but is not the end (1.4 s): the reply to
    "tone 220" is made at the mark and then dropped, as the caller goes on. The caller hears
    only the reply to the whole utterance, the context holds only that, and the turn moved to
    a new epoch once."""
    engine.delay_s = 0.1
    name = await agent(
        store,
        agent_json,
        engine.base_url,
        "spec-reply",
        speculative_stt=True,
        speculative_reply=True,
        end_of_turn_silence_ms=1400,
    )
    stt, llm = Counts(), Counts("llm")
    said = tone(500) + silence(1200) + tone(500, 440) + silence(1800)
    result = await call_over_websocket(
        transport_app.url, [wav(tmp_path, "a", said)], None, agent=name
    )
    (turn,) = result.turns
    assert turn.user_text == "tone 220 tone 440"
    assert turn.bot_text == "You said tone 220 tone 440."
    # the tone voice speaks 90 ms a word: six words heard, not the four of the dropped reply too
    assert len(turn.bot_audio) == pytest.approx(6 * 0.09 * SECOND, abs=0.1 * SECOND)
    assert llm() == {"started": 2, "used": 1, "discarded": 1, "skipped": 0}, llm()
    assert stt() == {"started": 2, "used": 1, "discarded": 1, "skipped": 0}, stt()
    context = await store.get_context(result.session_id)
    assert [(m["role"], m["content"]) for m in context] == [
        ("user", "tone 220 tone 440"),
        ("assistant", "You said tone 220 tone 440."),
    ]
    assert turn.epoch == 2  # the utterance began as turn 1 and went on as turn 2


async def test_a_speculative_reply_is_played_when_the_turn_ends_in_its_pause(
    transport_app: Any,
    store: ConfigStore,
    agent_json: dict,
    engine: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    """The turn ends in the pause marked halfway (silence alone, 1 s to the end): the reply made
    at the mark is the one heard and stored, and no other is made. It was ready before the end,
    so the end to the first audio is short: printed, beside the same turn without it."""
    engine.delay_s = 0.1
    first_audio: dict[bool, float] = {}
    for on in (False, True):
        name = await agent(
            store,
            agent_json,
            engine.base_url,
            f"spec-reply-{on}",
            speculative_stt=True,
            speculative_reply=on,
            end_of_turn_silence_ms=1000,
        )
        llm = Counts("llm")
        said = [wav(tmp_path, "a", tone(500) + silence(1500))]
        result = await call_over_websocket(transport_app.url, said, None, agent=name)
        (turn,) = result.turns
        assert (turn.user_text, turn.bot_text) == ("tone 220", "You said tone 220.")
        assert llm() == {"started": int(on), "used": int(on), "discarded": 0, "skipped": 0}
        context = await store.get_context(result.session_id)
        assert [(m["role"], m["content"]) for m in context] == [
            ("user", "tone 220"),
            ("assistant", "You said tone 220."),
        ]
        first_audio[on] = float(turn.phases["first_audio_ms"] or 0)
    on, off = first_audio[True], first_audio[False]
    print(f"end of turn to first audio, ms: speculative reply {on}, not {off}")


@pytest.mark.parametrize(
    "transport_settings",
    [{"auth": "off", "caller_audio_max_rate": 100.0, "caller_audio_burst_s": 60.0}],
)
async def test_a_turn_cut_at_the_utterance_limit_is_transcribed_in_whole(
    transport_app: Any,
    store: ConfigStore,
    agent_json: dict,
    engine: OpenAITranscribeServer,
) -> None:
    """A pause 1 s in is marked, then 40 s of speech without one: the turn is cut at 30 s and
    transcribed from all 30 s, not answered from the speculation of its first second."""
    name = await agent(store, agent_json, engine.base_url, "spec-on", speculative_stt=True)
    counts = Counts()
    url = transport_app.ws(f"/ws/call?agent={name}")
    events: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None) as ws:
        pcm = silence(200) + tone(1000) + silence(260) + tone(40_000, 440) + silence(1000)
        for i in range(0, len(pcm), FRAME_BYTES):
            await ws.send(pcm[i : i + FRAME_BYTES])
        deadline = time.monotonic() + 20
        while not any(e.get("final") for e in events):
            assert time.monotonic() < deadline, events
            msg = await asyncio.wait_for(ws.recv(), 20)
            if isinstance(msg, str):
                events.append(orjson.loads(msg))
    (stop,) = [e for e in events if e["type"] == "user_stopped"]
    assert stop.get("reason") == "max_utterance"
    (final,) = [e for e in events if e.get("final")]
    assert final["text"] == "tone 220 tone 440" and "speculative" not in final, final
    assert final["discarded"] == 1
    assert HEARD[-1] == 30 * SECOND, HEARD[-3:]
    assert counts()["discarded"] == 1 and counts()["used"] == 0


def test_the_default_agent_speculates(agent_json: dict) -> None:
    config = parse_agent_config(agent_json)
    for carrier in ("webrtc", "websocket"):
        options = config.transport_options(carrier)
        assert isinstance(options, TurnOptions) and options.speculative_stt, carrier
    assert not TurnOptions().speculative_stt  # an agent that does not ask for it: off
