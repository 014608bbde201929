"""A real browser calls: headless Debian Chromium opens the page at /, picks the default agent and
calls over WebRTC, its fake microphone saying "What is the capital of France?" (Piper). Both sides
of the conversation must appear in the page's transcript, with the turn's latency, and the bot's
reply must reach the page as sound (measured there: headless audio output goes nowhere).

The browser and `voicemesh up` run together in a fresh network namespace (`unshare -n`, loopback
only) via tests/e2e/browser_call.py, which reports what the page showed as JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
HELPER = Path(__file__).with_name("browser_call.py")
MIC_RATE = 48000
STARTUP_S, CALL_S = 240, 90  # the engines load in a few seconds here; the call is bounded apart


def fake_mic(speech: Path, out: Path) -> Path:
    """The question between silences, 48 kHz mono PCM16: Chromium loops the file, so the leading
    2 s keep the question whole while the call connects, the trailing 10 s leave the reply
    room before it is asked again."""
    pcm, rate = sf.read(str(speech), dtype="float32")
    voice = soxr.resample(pcm, rate, MIC_RATE)
    audio = np.concatenate([np.zeros(2 * MIC_RATE), voice, np.zeros(10 * MIC_RATE)])
    sf.write(str(out), (audio * 32767).astype(np.int16), MIC_RATE, subtype="PCM_16")
    return out


@cache
def netns_prefix() -> tuple[str, ...]:
    """How to start a command in a new network namespace with only loopback, up: as root, or in a
    user namespace. A container that allows neither (no CAP_SYS_ADMIN) runs the call on the host's
    network instead, with a warning: everything still goes to 127.0.0.1."""
    up_lo = ("sh", "-c", 'ip link set lo up && exec "$0" "$@"')
    for unshare in (("unshare", "-n"), ("unshare", "-rn")):
        try:
            probe = subprocess.run([*unshare, *up_lo, "true"], capture_output=True, timeout=10)
        except OSError:  # no unshare (util-linux) at all
            break
        if probe.returncode == 0:
            return (*unshare, *up_lo)
    warnings.warn(
        "unshare -n is not available or permitted here: the browser call runs on the host's "
        "network",
        stacklevel=1,
    )
    return ()


def explain(report: dict[str, Any]) -> str:
    """What happened, for a failure message: the page, the browser console, the stack's log."""
    page = report.get("page") or report.get("before_call") or {}
    return "\n".join(
        [
            f"error: {report.get('error')}",
            f"page status: {page.get('status')!r} ({page.get('status_state')})",
            f"transcript: {json.dumps(page.get('lines'))}",
            f"latency: {json.dumps(page.get('latency'))}",
            f"events: {page.get('events')}",
            f"bot peak RMS {page.get('bot_peak_rms')}, audible {page.get('bot_audible_ms')} ms, "
            f"mic peak RMS {page.get('mic_peak_rms')}",
            f"key flow: {report.get('key_flow')}",
            "console:",
            *(f"  {line}" for line in report.get("console", [])[-30:]),
            "stack log (last 50 lines):",
            *(f"  {line}" for line in report.get("stack_log", [])),
        ]
    )


def run_browser_call(
    tmp_path: Path, mic: Path, *extra: str, helper: Path = HELPER
) -> dict[str, Any]:
    """Run a browser-driving helper (browser_call.py, or rtvi_browser_call.py) in its own network
    namespace; returns its report, with what it printed."""
    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install chromium (.ci/run)"
    out = tmp_path / "report.json"
    argv = [sys.executable, str(helper), "--wav", str(mic), "--data", str(tmp_path)]
    argv += ["--out", str(out), "--startup-timeout", str(STARTUP_S)]
    argv += ["--call-timeout", str(CALL_S), *extra]
    proc = subprocess.Popen(
        [*netns_prefix(), *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:  # the helper bounds each step itself; this is the last resort
        output, _ = proc.communicate(timeout=STARTUP_S + CALL_S + 120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # it still stops the stack and writes its report
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    assert out.exists(), f"{helper.name} wrote no report ({proc.returncode}):\n{output}"
    report = json.loads(out.read_text())
    report["helper_output"] = output
    return report


def check_call(report: dict[str, Any]) -> None:
    why = explain(report)
    assert report["error"] is None, why
    page = report["page"]
    if netns_prefix():  # the browser and the server saw nothing but loopback
        assert report["interfaces"] == ["lo"], why

    before = report["before_call"]
    assert before["agent"] == "local" and before["agents"] == ["local (default)"], why

    user = [x for x in page["lines"] if x["role"] == "user"]
    asked = [x for x in user if re.search(r"capital|france", x["text"], re.I)]
    assert asked, f"no user line with the question\n{why}"
    epoch = asked[0]["epoch"]
    bot = [x for x in page["lines"] if x["role"] == "assistant" and x["epoch"] == epoch]
    assert bot and bot[0]["text"].strip(), f"no bot line for turn {epoch}\n{why}"
    assert not bot[0]["interrupted"], why

    latency = [x for x in page["latency"] if x["epoch"] == epoch]
    assert latency and latency[0]["v2v_ms"] is not None, why
    assert 0 < latency[0]["v2v_ms"] < 15_000, why
    assert re.search(
        r"voice-to-voice \d+ ms .*stt \d+ ms .*llm first token \d+ ms", latency[0]["text"]
    ), why
    metrics = [m for m in page["turn_metrics"] if m["epoch"] == epoch]
    assert metrics and metrics[0]["v2v_ms"] == pytest.approx(latency[0]["v2v_ms"], abs=1), why

    # The reply as the page heard it on the remote track: speech, not the silence between replies.
    assert page["bot_peak_rms"] > 0.02, why  # about -34 dBFS
    assert page["bot_audible_ms"] >= 500, why
    assert page["mic_peak_rms"] > 0.02, f"the fake microphone was silent\n{why}"
    assert page["events"][0] == "session" and page["session_id"], why
    assert not [c for c in report["console"] if c.startswith("pageerror")], why

    # A reply cut off by the caller (a synthetic event of the server's shape): marked, with what
    # was not heard set apart.
    cut = report["interrupted_render"]
    assert cut and cut["interrupted"] == "true" and "(interrupted)" in cut["text"], why
    assert cut["unheard"] and cut["heard"] + cut["unheard"] == cut["full"], why

    # Hanging up: the page is ready for another call, and the server saw the caller go.
    after = report["after_hangup"]
    assert after["status"] == "call ended" and not after["call_disabled"], why
    assert after["hangup_disabled"], why
    assert any("call ended" in line for line in report["stack_log"]), why
    assert report["up_exit"] == 0, why


def test_browser_calls_the_default_agent(tmp_path: Path, say: Callable[[str], Path]) -> None:
    mic = fake_mic(say("What is the capital of France?"), tmp_path / "mic.wav")
    report = run_browser_call(tmp_path, mic)
    check_call(report)
    assert "key_flow" not in report


def test_browser_asks_for_the_api_key(tmp_path: Path, say: Callable[[str], Path]) -> None:
    """With keys configured the page learns it from a 401, says so, refuses to pretend a wrong key
    works, and remembers the right one across a reload (localStorage); then the call works."""
    mic = fake_mic(say("What is the capital of France?"), tmp_path / "mic.wav")
    report = run_browser_call(tmp_path, mic, "--api-key", "browser-e2e-key-51c2")
    flow = report.get("key_flow") or {}
    why = explain(report)
    assert "needs an API key" in flow.get("asked", ""), why
    assert flow.get("call_enabled_without_key") is False, why
    assert "refused" in flow.get("wrong_key", ""), why
    assert flow.get("right_key", "").startswith("ready"), why
    assert flow.get("after_reload", "").startswith("ready"), why
    assert flow.get("keybox_hidden_after_reload") is True, why
    check_call(report)
