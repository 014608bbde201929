"""End to end with a tool (issue 15): every role in its own process, the example NATS tool service
(examples/weather_tool.py) in another, a spoken question in over the WebSocket transport, and a
spoken reply out that carries the service's answer, heard with whisper."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import AGENT_FILE, ROOT, Servers
from tests.e2e.conftest import RunningStack
from voicemesh.callers.websocket import call_over_websocket
from voicemesh.config.models import parse_agent_config

pytestmark = pytest.mark.slow

FORECASTS = ("sunny", "cloudy", "rainy", "windy", "snowy")


@pytest.fixture
def weather_service(servers: Servers) -> Iterator[subprocess.Popen[bytes]]:
    """The example tool service as its own process, on the suite's NATS (the operator's user)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "weather_tool.py")],
        env={**os.environ, "NATS_URL": servers.nats.url, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # printed once it serves
        assert "serving get_weather" in line, line
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_spoken_question_is_answered_with_a_nats_tool_s_result(
    stack: RunningStack,
    weather_service: subprocess.Popen[bytes],
    say: Callable[[str], Path],
    hear: Callable[[bytes], str],
) -> None:
    """The scripted LLM calls get_weather(Paris) (deterministic: what is under test is the mesh,
    not SmolLM2's judgement); the service in its own process answers; the reply Piper speaks
    holds its forecast, which whisper hears; the context holds the call and its result."""
    data = json.loads(AGENT_FILE.read_text())
    data = copy.deepcopy(data)
    data["tools"] = [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
            "handler": {"type": "nats", "subject": "tools.weather"},
        }
    ]
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {
            "scripted": {
                "replies": ["The forecast is {result}."],
                "tool_rounds": [
                    {"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
                ],
            }
        },
    }
    await stack.store.create_agent("weather", parse_agent_config(data))
    expected = FORECASTS[zlib.crc32(b"paris") % len(FORECASTS)]

    result = await call_over_websocket(
        stack.url,
        [say("What is the weather in Paris?")],
        None,
        agent="weather",
        turn_timeout=90,
        api_key=stack.api_key,
    )
    (turn,) = result.turns
    assert "paris" in turn.user_text.lower(), turn.user_text
    assert expected in turn.bot_text, turn.bot_text
    heard = hear(turn.bot_audio)
    assert expected in re.findall(r"[a-z]+", heard.lower()), heard

    assert result.session_id is not None
    context = await stack.store.get_context(result.session_id)
    assert [m["role"] for m in context] == ["user", "tool_calls", "tool_result", "assistant"]
    (call,) = context[1]["calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    answer = json.loads(context[2]["content"])
    assert answer["forecast"] == expected and answer["call"] == call["id"]  # the service's own
