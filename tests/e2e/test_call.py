"""End to end: every role in its own process (two of each stage), real NATS and Valkey, a spoken
WAV in through the WebSocket transport and a spoken reply out."""

from __future__ import annotations

import asyncio
import difflib
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import RunningStack, rms_dbfs
from voicemesh.callers.script import TurnResult
from voicemesh.callers.websocket import call_over_websocket

pytestmark = pytest.mark.slow


def close(word: str, choices: tuple[str, ...]) -> str | None:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return match[0] if match else None


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


async def new_session(stack: RunningStack, **body: object) -> str:
    async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers) as http:
        resp = await http.post("/api/sessions", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]


def scripted(agent_json: dict, replies: list[str], tts: str = "piper") -> dict:
    cfg = {**agent_json, "connectors": dict(agent_json["connectors"])}
    cfg["connectors"]["llm"] = {"primary": "scripted", "config": {"replies": replies}}
    cfg["connectors"]["tts"] = {"primary": tts}
    return cfg


async def test_spoken_question_gets_a_spoken_reply(
    stack: RunningStack, say: Callable[[str], Path], hear: Callable[[bytes], str], tmp_path: Path
) -> None:
    """The default agent (whisper → SmolLM2 → Piper) answers a spoken question."""
    sid = await new_session(stack)  # no agent named: the default one
    out = tmp_path / "reply.wav"
    result = await call_over_websocket(
        stack.url,
        [say("What is the capital of France?")],
        out,
        session_id=sid,
        turn_timeout=90,
        api_key=stack.api_key,
    )
    turn = result.turns[0]
    assert {"capital", "france"} <= set(words(turn.user_text)), turn.user_text
    assert turn.latency_ms is not None and turn.connectors == {"smollm2"}
    # the transport's trace of the turn: every phase measured, and they add up
    phases = turn.phases
    for key in ("eou_ms", "stt_ms", "llm_ttft_ms", "tts_ttfb_ms", "first_audio_ms", "v2v_ms"):
        assert phases.get(key) is not None and phases[key] > 0, (key, phases)
    assert phases["v2v_ms"] >= phases["eou_ms"] + phases["stt_ms"]
    assert out.stat().st_size > 44 + 16000  # at least half a second of audio
    assert rms_dbfs(turn.bot_audio) > -40, "the reply is silent"
    heard = hear(turn.bot_audio)
    assert len(words(heard)) >= 2, f"whisper heard no words in the reply: {heard!r}"

    context = await stack.store.get_context(sid)
    roles = [m["role"] for m in context]
    assert roles == ["user", "assistant"], context
    assert "france" in words(context[0]["content"])
    assert (
        context[1]["content"] and context[1]["content"].split()[0].lower() in turn.bot_text.lower()
    )


async def test_live_swap_of_llm_and_tts_while_the_call_is_open(
    stack: RunningStack, agent_json: dict, say: Callable[[str], Path], hear: Callable[[bytes], str]
) -> None:
    sid = await new_session(stack, config=scripted(agent_json, ["The sky is green today."]))
    versions = []

    async def swap(turn_no: int, turn: TurnResult) -> None:
        patch = (
            {"connectors": {"llm": {"primary": "echo", "config": {"echo": {"prefix": "You said"}}}}}
            if turn_no == 0
            else {
                "connectors": {
                    "tts": {"primary": "tone", "config": {"tone": {"frequency_hz": 440}}}
                }
            }
        )
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers) as http:
            resp = await http.patch(f"/api/sessions/{sid}/config", json=patch)
            assert resp.status_code == 200, resp.text
            versions.append(resp.json()["version"])

    line = say("The weather is sunny.")
    result = await call_over_websocket(
        stack.url,
        [line, line, line],
        None,
        session_id=sid,
        after_turn=swap,
        turn_timeout=60,
        api_key=stack.api_key,
    )
    first, second, third = result.turns
    assert versions == [2, 3]
    assert first.connectors == {"scripted"} and "green" in words(hear(first.bot_audio))
    assert second.connectors == {"echo"}
    assert {"you", "said", "weather", "sunny"} <= set(words(second.bot_text)), second.bot_text
    assert "sunny" in words(hear(second.bot_audio))
    # The third reply went through the tone TTS: a 440 Hz sine, not speech.
    pcm = np.frombuffer(third.bot_audio, np.int16).astype(np.float64)
    assert pcm.size > 1600
    spectrum = np.abs(np.fft.rfft(pcm))
    peak_hz = np.argmax(spectrum) * 16000 / pcm.size
    assert abs(peak_hz - 440) < 10, peak_hz


async def test_concurrent_sessions_on_two_instances_of_every_stage(
    stack: RunningStack, agent_json: dict, say: Callable[[str], Path], hear: Callable[[bytes], str]
) -> None:
    """Several sessions at once: each answered, sentences in order, no audio of another session."""
    fruits = ["paris", "london", "tokyo", "berlin"]
    reply = ["Morning. {user}. Afternoon. {user}. Evening. {user}."]
    sids = [await new_session(stack, config=scripted(agent_json, reply)) for _ in fruits]

    async def one(sid: str, fruit: str) -> TurnResult:
        result = await call_over_websocket(
            stack.url,
            [say(f"My city is {fruit.capitalize()}.")],
            None,
            session_id=sid,
            turn_timeout=120,
            api_key=stack.api_key,
        )
        return result.turns[0]

    turns = await asyncio.gather(*(one(s, f) for s, f in zip(sids, fruits, strict=True)))
    marks = ("morning", "afternoon", "evening")
    for fruit, turn in zip(fruits, turns, strict=True):
        assert turn.indexes == list(range(6)), turn.indexes
        heard = words(hear(turn.bot_audio))
        # whisper tiny on Piper's (slightly random) prosody misspells now and then: match loosely
        near = [close(w, (*fruits, *marks)) for w in heard]
        assert fruit in near, (fruit, turn.user_text, turn.bot_text, heard)
        assert not {f for f in fruits if f != fruit} & set(near), (fruit, heard)
        assert [w for w in near if w in marks] == list(marks), heard
