"""pipecat's own clients in a real browser call the default agent (whisper, SmolLM2, Piper): the
example front end on @pipecat-ai/client-js + @pipecat-ai/small-webrtc-transport (the bundle vendored
in examples/pipecat-client/dist, versions in its first line), and pipecat's prebuilt UI at /client.
Headless Debian Chromium with a fake microphone asking "What is the capital of France?", inside a
fresh network namespace, as in test_browser.py (tests/e2e/rtvi_browser_call.py drives it).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.test_browser import fake_mic, netns_prefix, run_browser_call

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("rtvi_browser_call.py")
BUNDLE = ROOT / "examples" / "pipecat-client" / "dist" / "app.js"


def run(tmp_path: Path, mic: Path, *extra: str) -> dict[str, Any]:
    return run_browser_call(tmp_path, mic, *extra, helper=HELPER)


def explain(report: dict[str, Any]) -> str:
    short = {k: v for k, v in report.items() if k not in ("console", "stack_log")}
    return "\n".join(
        [
            json.dumps(short, indent=1)[:6000],
            "console:",
            *(f"  {c}" for c in report.get("console", [])[-40:]),
            "stack log:",
            *(f"  {c}" for c in report.get("stack_log", [])[-40:]),
        ]
    )


def test_pipecat_client_js_calls_the_default_agent(
    tmp_path: Path, say: Callable[[str], Path]
) -> None:
    assert BUNDLE.read_text()[:200].startswith("/* built from examples/pipecat-client")
    mic = fake_mic(say("What is the capital of France?"), tmp_path / "mic.wav")
    report = run(tmp_path, mic, "--client", "example")
    why = explain(report)
    assert report["error"] is None, why
    if netns_prefix():
        assert report["interfaces"] == ["lo"], why
    # connect() resolved: bot-ready came, naming our protocol and the session /start made
    ready = report["after_connect"]["ready"]
    assert ready["version"].startswith("2.") and ready["about"]["library"] == "voicemesh", why
    page = report["page"]
    finals = [t["text"] for t in page["transcripts"] if t["final"]]
    assert any(re.search(r"capital|france", t, re.I) for t in finals), why
    answer = " ".join(page["bot"])
    assert re.search(r"paris|france|capital", answer, re.I), why  # the words fit the answer
    metrics = page["metrics"][0]
    assert {m["processor"] for m in metrics["ttfb"]} >= {"llm", "tts"}, why
    assert {m["processor"] for m in metrics["processing"]} >= {"stt"}, why
    assert page["botAudio"], why
    assert not [c for c in report["console"] if c.startswith("pageerror")], why
    # disconnect-bot ends the call: the client sees the disconnect, the server ends the call
    assert report["after_hangup"]["disconnected"], why
    assert report["status_after_hangup"] == "call ended", why
    assert any("call ended" in line for line in report["stack_log"]), why
    assert any("disconnect-bot" in line for line in report["stack_log"]), why
    assert report["up_exit"] == 0, why


@pytest.mark.skipif(
    importlib.util.find_spec("pipecat_ai_prebuilt") is None,
    reason="pipecat-ai-prebuilt is not installed (pip install 'voicemesh[prebuilt]')",
)
def test_the_prebuilt_ui_at_client_calls_the_default_agent(
    tmp_path: Path, say: Callable[[str], Path]
) -> None:
    mic = fake_mic(say("What is the capital of France?"), tmp_path / "mic.wav")
    report = run(tmp_path, mic, "--client", "prebuilt", "--screenshot", str(tmp_path / "ui.png"))
    why = explain(report)
    assert report["error"] is None, why
    text = report["body_text"]
    # the conversation panel: the question as transcribed, then the bot's answer
    assert re.search(r"user\s+What is the capital of France", text, re.I), why
    assert re.search(r"assistant\s+[^\n]*(paris|france|capital)", text, re.I), why
    # the UI's status panel: connected, with our protocol version from bot-ready
    assert re.search(r"RTVI Server\s+v2\.2\.0", text), why
    assert re.search(r"Agent\s+READY", text), why
    assert any("RTVI client ready" in line for line in report["stack_log"]), why
    assert report["up_exit"] == 0, why
