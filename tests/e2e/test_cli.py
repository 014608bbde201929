"""The `voicemesh` command line as a user runs it: `call` with WAV files and `config ...` against
the running stack's API, each as its own process."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
import soundfile as sf

from tests.conftest import ROOT
from tests.e2e.conftest import API_KEY, RunningStack

pytestmark = pytest.mark.slow


async def voicemesh(
    *args: str, limit_s: float = 60, api_key: str | None = API_KEY
) -> subprocess.CompletedProcess[str]:
    """The stack's key reaches the CLI as a user would give it: VOICEMESH_API_KEY."""
    env = {k: v for k, v in os.environ.items() if k != "VOICEMESH_API_KEY"}
    if api_key is not None:
        env["VOICEMESH_API_KEY"] = api_key
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "voicemesh", *args],
        capture_output=True,
        text=True,
        timeout=limit_s,
        cwd=ROOT,
        env=env,
    )


def scripted(agent_json: dict, replies: list[str]) -> dict:
    cfg = copy.deepcopy(agent_json)
    cfg["connectors"]["llm"] = {"primary": "scripted", "config": {"replies": replies}}
    cfg["connectors"]["tts"] = {"primary": "piper"}
    return cfg


def invalid(agent_json: dict) -> dict:
    cfg = copy.deepcopy(agent_json)
    cfg["connectors"]["llm"]["primary"] = "gpt-nope"
    cfg["connectors"]["tts"]["config"]["piper"]["volume"] = 99
    return cfg


async def new_session(stack: RunningStack, config: dict) -> str:
    async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers) as http:
        resp = await http.post("/api/sessions", json={"config": config})
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]


async def api(stack: RunningStack, method: str, path: str, **kw: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers) as http:
        return await http.request(method, path, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
async def test_call_with_two_wavs(
    stack: RunningStack,
    agent_json: dict,
    say: Callable[[str], Path],
    tmp_path: Path,
    transport: str,
) -> None:
    """Caller, transport and every stage in a process of its own; over WebRTC the CLI is an aiortc
    peer and times the reply to its first audible sound."""
    replies = ["The first answer.", "The second answer is longer."]
    sid = await new_session(stack, scripted(agent_json, replies))
    out = tmp_path / "bot" / "reply.wav"
    proc = await voicemesh(
        "call",
        "--transport",
        transport,
        "--url",
        stack.url,
        "--wav",
        str(say("Hello there.")),
        "--wav",
        str(say("How are you today?")),
        "--out",
        str(out),
        "--session",
        sid,
        "--timeout",
        "90",
        limit_s=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert re.search(r"^turn 1: you said: ", text, re.M), text
    assert re.search(r"^turn 2: you said: ", text, re.M), text
    assert text.count("you said:") == 2
    first_line = next(line for line in text.splitlines() if line.startswith("turn 1:"))
    assert "hello" in first_line.lower(), first_line
    assert "bot said:  'The first answer.'" in text, text
    assert "bot said:  'The second answer is longer.'" in text, text
    latencies = re.findall(r"end of speech to first bot audio: (\d+) ms", text)
    assert len(latencies) == 2 and all(0 < int(ms) < 90_000 for ms in latencies), text
    saved = re.search(r"saved ([\d.]+) s of bot audio to (.+)$", text, re.M)
    assert saved and Path(saved.group(2)) == out, text

    info = sf.info(str(out))
    assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
    assert info.duration > 1.0, info.duration  # two spoken sentences
    assert abs(info.duration - float(saved.group(1))) < 0.1
    context = await stack.store.get_context(sid)
    assert [m["role"] for m in context] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in context if m["role"] == "assistant"] == replies


async def test_barge_in_from_the_command_line(
    stack: RunningStack, agent_json: dict, say: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--barge-in-after 1` speaks the second line a second into the bot's long first reply: the
    bot is cut off, and the context keeps only what was heard of that reply."""
    long_reply = (
        "Let me tell you a long story about the sea. It begins on a grey morning in the north. "
        "The fishing boats were leaving the harbour one by one. Nobody expected the storm."
    )
    sid = await new_session(stack, scripted(agent_json, [long_reply, "Sure, stopping."]))
    proc = await voicemesh(
        "call",
        "--url",
        stack.url,
        "--wav",
        str(say("Tell me a story.")),
        "--wav",
        str(say("Stop, please.")),
        "--out",
        str(tmp_path / "bot.wav"),
        "--session",
        sid,
        "--timeout",
        "90",
        "--barge-in-after",
        "1",
        limit_s=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cut = re.search(r"^turn 1: interrupted; the bot had said: '(.*)'$", proc.stdout, re.M)
    assert cut, proc.stdout
    heard = cut.group(1)
    assert heard and long_reply.startswith(heard.rstrip(".")), heard
    assert len(heard.split()) < len(long_reply.split())
    context = await stack.store.get_context(sid)
    first = [m for m in context if m["role"] == "assistant" and m["epoch"] == 1]
    assert first and first[0]["content"] == heard and first[0]["interrupted"] is True
    assert "bot said:  'Sure, stopping.'" in proc.stdout, proc.stdout


async def test_call_to_a_missing_session_fails(
    stack: RunningStack, say: Callable[[str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "none.wav"
    proc = await voicemesh(
        "call",
        "--url",
        stack.url,
        "--wav",
        str(say("Hello there.")),
        "--out",
        str(out),
        "--session",
        "NoSuchSession123",
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("voicemesh call:"), proc.stderr
    assert "NoSuchSession123 not found" in proc.stderr, proc.stderr
    assert not out.exists()


async def test_config_commands_against_the_api(
    stack: RunningStack, agent_json: dict, tmp_path: Path
) -> None:
    url = ("config", "--url", stack.url)

    listed = await voicemesh(*url, "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\* local\s+v\d+", listed.stdout, re.M), listed.stdout

    got = await voicemesh(*url, "get", "local")
    assert got.returncode == 0, got.stderr
    agent = orjson.loads(got.stdout)
    assert agent["name"] == "local"
    assert (
        agent["config"]["connectors"]["llm"]["primary"]
        == agent_json["connectors"]["llm"]["primary"]
    )

    sid = await new_session(stack, scripted(agent_json, ["Hi."]))
    sessions = await voicemesh(*url, "sessions")
    assert sessions.returncode == 0, sessions.stderr
    assert sid in sessions.stdout.split()

    session = await voicemesh(*url, "session", sid)
    assert session.returncode == 0, session.stderr
    body = orjson.loads(session.stdout)
    assert body["session_id"] == sid and body["version"] == 1
    assert body["config"]["connectors"]["llm"]["primary"] == "scripted"

    # Push a file as a new agent and make it the default; push again updates it.
    name = f"cli-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "agent.json"
    path.write_bytes(orjson.dumps(scripted(agent_json, ["Pushed."])))
    try:
        pushed = await voicemesh(*url, "push", str(path), "--agent", name, "--default")
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        listed = await voicemesh(*url, "list")
        assert re.search(rf"^\* {re.escape(name)}\s+v1\b", listed.stdout, re.M), listed.stdout
        assert re.search(r"^  local\s", listed.stdout, re.M), listed.stdout

        again = await voicemesh(*url, "push", str(path), "--agent", name, "--description", "two")
        assert again.returncode == 0, again.stdout + again.stderr
        record = (await api(stack, "GET", f"/api/agents/{name}")).json()
        assert record["version"] == 2 and record["description"] == "two"
        assert record["config"]["connectors"]["llm"]["config"]["scripted"]["replies"] == ["Pushed."]

        # And as a live session's config.
        pushed = await voicemesh(*url, "push", str(path), "--session", sid)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert orjson.loads(pushed.stdout) == {"session_id": sid, "version": 2}
        stored = await stack.store.get_config(sid)
        assert stored is not None and stored.version == 2
        assert stored.config.options("llm", "scripted").replies == ["Pushed."]  # type: ignore[attr-defined]
    finally:
        resp = await api(stack, "POST", "/api/agents/local/set-default")
        assert resp.status_code == 200, resp.text
        await api(stack, "DELETE", f"/api/agents/{name}")
    assert (await stack.store.get_default_agent()).name == "local"  # type: ignore[union-attr]


async def test_config_push_of_an_invalid_file_names_each_problem(
    stack: RunningStack, agent_json: dict, tmp_path: Path
) -> None:
    url = ("config", "--url", stack.url)
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps(invalid(agent_json)))
    name = f"bad-{uuid.uuid4().hex[:6]}"
    before = (await api(stack, "GET", "/api/agents")).json()

    proc = await voicemesh(*url, "push", str(bad), "--agent", name, "--default")
    assert proc.returncode != 0
    assert "rejected (422)" in proc.stderr, proc.stderr
    assert "config.connectors.llm.primary:" in proc.stderr, proc.stderr
    assert "gpt-nope" in proc.stderr
    assert "config.connectors.tts.config.piper.volume:" in proc.stderr, proc.stderr
    after = (await api(stack, "GET", "/api/agents")).json()
    assert after == before, "an invalid agent was stored"
    missing = await voicemesh(*url, "get", name)
    assert missing.returncode != 0 and "404" in missing.stderr

    sid = await new_session(stack, scripted(agent_json, ["Hi."]))
    proc = await voicemesh(*url, "push", str(bad), "--session", sid)
    assert proc.returncode != 0
    assert re.search(r"^\s+connectors\.llm\.primary: ", proc.stderr, re.M), proc.stderr
    stored = await stack.store.get_config(sid)
    assert stored is not None and stored.version == 1

    validated = await voicemesh(*url, "validate", str(bad))
    assert validated.returncode == 1
    assert f"{bad}: invalid" in validated.stderr
    assert "connectors.llm.primary:" in validated.stderr

    broken = tmp_path / "broken.json"
    broken.write_text('{"system_prompt": ')
    proc = await voicemesh(*url, "push", str(broken), "--agent", name)
    assert proc.returncode != 0 and str(broken) in proc.stderr, proc.stderr
    assert (await api(stack, "GET", f"/api/agents/{name}")).status_code == 404


async def test_cli_without_the_api_key_is_refused_and_with_it_works(
    stack: RunningStack, say: Callable[[str], Path], tmp_path: Path
) -> None:
    url = ("config", "--url", stack.url)
    refused = await voicemesh(*url, "list", api_key=None)
    assert refused.returncode != 0
    assert "401: missing API key" in refused.stderr, refused.stderr
    assert "--api-key" in refused.stderr  # the hint
    wrong = await voicemesh(*url, "--api-key", "not-the-key", "list", api_key=None)
    assert wrong.returncode != 0 and "401: invalid API key" in wrong.stderr, wrong.stderr
    assert "not-the-key" not in wrong.stderr + wrong.stdout
    given = await voicemesh(*url, "--api-key", stack.api_key, "list", api_key=None)
    assert given.returncode == 0, given.stderr
    assert re.search(r"^\* local\s", given.stdout, re.M), given.stdout

    out = tmp_path / "none.wav"
    call = await voicemesh(
        "call", "--url", stack.url, "--wav", str(say("Hello.")), "--out", str(out), api_key=None
    )
    assert call.returncode != 0
    assert call.stderr.startswith("voicemesh call: "), call.stderr
    assert "(401): missing API key" in call.stderr and "--api-key" in call.stderr, call.stderr
    assert not out.exists()
