"""The console's live provider swap, heard (issue 17): headless Chromium with a fake microphone
opens the console, calls an agent with "Test this agent" (the call page at /?agent=NAME, over
WebRTC), and while that call runs swaps the session's TTS from `tone` to `piper` in the session
view. The next turn must be heard in Piper's voice (measured on the bot's track in the page: a
tone has one dominant frequency, speech does not) and the session view must show the new
connector and version.

The stages run in-process (real NATS and Valkey, the transport on uvicorn); the STT is the
loopback OpenAI transcriber, which "hears" the pitch of the microphone's tone, and the LLM is the
scripted one, so nothing but Piper loads a model.
"""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from pydantic import SecretStr

from tests.e2e.browser_call import chromium_args
from tests.support import TransportApp, loopback_agent
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_egress")]

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
ADMIN = "k-admin-console-call-1"
A_KEY = "k-acme-console-call-a"
MIC_RATE = 48000
MIC_HZ = 300.0  # what the caller "says": the loopback STT hears "tone 300"
TONE_HZ = 880.0  # the tone TTS's voice, far from the microphone's pitch and from a male voice
NEAR_HZ = 40.0  # FFT bins are 11.7 Hz at 48 kHz/4096; Opus keeps the pitch
AGENT = "swap-agent"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"


async def shoot(page: Any, name: str) -> None:
    """A screenshot for docs/console/ when VOICEMESH_CONSOLE_SHOTS=1 (as tests/test_console.py)."""
    if os.environ.get("VOICEMESH_CONSOLE_SHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def transport_settings() -> dict[str, Any]:
    return {
        "auth": "required",
        "api_keys": (SecretStr(ADMIN),),
        "tenant_keys": (("acme", SecretStr(A_KEY)),),
        "console_refresh_s": 1.0,
        "webrtc_loopback": True,
    }


def mic_wav(out: Path) -> Path:
    """1 s of the caller's tone, then 5 s of silence: Chromium loops the file, so a turn comes
    every 6 s and each short reply ends before the caller speaks again (no barge-in)."""
    t = np.arange(MIC_RATE) / MIC_RATE
    voice = 0.3 * np.sin(2 * np.pi * MIC_HZ * t)
    audio = np.concatenate([np.zeros(MIC_RATE // 2), voice, np.zeros(5 * MIC_RATE)])
    sf.write(str(out), (audio * 32767).astype(np.int16), MIC_RATE, subtype="PCM_16")
    return out


#: A probe on the call page's bot track: every 50 ms, while the bot is audible, the strongest
#: frequency, labelled with the turn (the last bot_started's epoch) it belongs to.
PROBE = """() => {
  window.__heard = [];
  const timer = setInterval(() => {
    const stream = document.querySelector('#bot-audio').srcObject;
    if (!stream) return;
    clearInterval(timer);
    const ctx = new AudioContext();
    const an = ctx.createAnalyser();
    an.fftSize = 4096;
    an.smoothingTimeConstant = 0;
    ctx.createMediaStreamSource(stream).connect(an);
    const wave = new Float32Array(an.fftSize), spec = new Float32Array(an.frequencyBinCount);
    setInterval(() => {
      an.getFloatTimeDomainData(wave);
      let sum = 0;
      for (const s of wave) sum += s * s;
      if (Math.sqrt(sum / wave.length) < 0.01) return;
      const started = window.__voicemesh.events.filter((e) => e.type === 'bot_started');
      if (!started.length) return;
      an.getFloatFrequencyData(spec);
      let best = 1;
      for (let i = 2; i < spec.length; i++) if (spec[i] > spec[best]) best = i;
      window.__heard.push({epoch: started[started.length - 1].epoch,
                           hz: best * ctx.sampleRate / an.fftSize});
    }, 50);
  }, 50);
}"""


async def heard_turns(call: Any) -> dict[int, list[float]]:
    """Per finished turn (bot_done seen), the dominant frequencies heard while it played."""
    got = await call.evaluate(
        "() => ({heard: window.__heard || [], done: window.__voicemesh.events"
        ".filter((e) => e.type === 'bot_done').map((e) => e.epoch)})"
    )
    turns: dict[int, list[float]] = {}
    for h in got["heard"]:
        if h["epoch"] in got["done"]:
            turns.setdefault(int(h["epoch"]), []).append(float(h["hz"]))
    return turns


def tone_share(freqs: list[float]) -> float:
    """How much of a turn's audible time the tone's frequency dominates."""
    return sum(abs(f - TONE_HZ) < NEAR_HZ for f in freqs) / len(freqs)


async def wait_turn(call: Any, after: int, limit_s: float, what: str) -> tuple[int, list[float]]:
    """The first finished turn with epoch > `after` that was heard for at least 0.4 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        for epoch, freqs in sorted((await heard_turns(call)).items()):
            if epoch > after and len(freqs) >= 8:
                return epoch, freqs
        await asyncio.sleep(0.3)
    events = await call.evaluate("() => window.__voicemesh.events.map((e) => e.type)")
    raise AssertionError(f"no {what} turn after epoch {after} within {limit_s} s: {events}")


def toned_agent(agent_json: dict, transcriber: OpenAITranscribeServer) -> dict[str, Any]:
    """The agent these calls start with: WebRTC, the loopback transcriber, a scripted echo and
    the tone at TONE_HZ (easy to tell from Piper's voice)."""
    data = loopback_agent(
        agent_json,
        transport="webrtc",
        stt_url=transcriber.base_url,
        replies=["You said {user}, thank you."],
        ms_per_word=150,
        jitter_buffer_ms=20,
    )
    data["connectors"]["tts"]["config"]["tone"]["frequency_hz"] = TONE_HZ
    return data


async def stale_then_saved(
    call: Any, select: str, save: str, value: str, reread: str, switched: str
) -> None:
    """The call page's switch read the session when the call began (version 1) and the console
    saved since: its first try is refused as a conflict and reads the session again (the select
    then shows `reread`), its second goes in (version 3)."""
    await call.select_option(select, value)
    await call.click(save)
    await call.wait_for_function(
        "() => document.querySelector('#switch-status').dataset.state === 'error'",
        timeout=10_000,
    )
    refused = await call.text_content("#switch-status")
    assert refused.startswith("Conflict:") and "changed by someone else" in refused
    assert await call.input_value(select) == reread  # read again
    await call.select_option(select, value)
    await call.click(save)
    await call.wait_for_function(
        "(text) => document.querySelector('#switch-status').textContent.includes(text)",
        arg=f"switched: {switched} (version 3)",
        timeout=10_000,
    )


async def test_browser_console_calls_an_agent_and_swaps_its_tts_mid_call(
    transport_app: TransportApp,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    # CI installs it (.ci/run): a missing browser is a broken setup, not a test to skip
    assert HAVE_CHROMIUM, "Debian's chromium is missing: apt-get install chromium (.ci/run)"
    url = transport_app.url
    data = toned_agent(agent_json, transcriber)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {A_KEY}"}, timeout=10
    ) as c:
        r = await c.post("/api/agents", json={"name": AGENT, "config": data})
        assert r.status_code == 201, r.text

    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=chromium_args(mic_wav(tmp_path / "mic.wav")),
        )
        try:
            context = await b.new_context(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            console = await context.new_page()
            console.on("pageerror", lambda e: errors.append(f"console: {e}"))
            # ?raw_audio=1 passes on to the call page: no echo cancellation on a fake microphone
            await console.goto(f"{url}/console?raw_audio=1#agents")
            await console.wait_for_selector("#keybox:visible", timeout=10_000)
            await console.fill("#key", A_KEY)
            await console.press("#key", "Enter")
            row = console.locator(f"#agents tr[data-agent={AGENT}]")
            await row.wait_for(timeout=10_000)
            assert "tts: tone" in await row.text_content()

            async with context.expect_page() as opened:
                await row.locator("button[data-act=test]").click()
            call = await opened.value
            call.on("pageerror", lambda e: errors.append(f"call: {e}"))
            await call.wait_for_selector("#call:enabled", timeout=15_000)  # the key carried over
            assert "agent=swap-agent" in call.url
            assert await call.input_value("#agent") == AGENT
            await call.evaluate(PROBE)
            await call.click("#call")

            first, freqs = await wait_turn(call, 0, 45, "tone")
            assert tone_share(freqs) >= 0.8, (first, freqs)  # one frequency: the tone
            sid = await call.evaluate("() => window.__voicemesh.sessionId")
            assert sid

            await console.goto(f"{url}/console?raw_audio=1#session={sid}")
            await console.wait_for_function(
                "() => /editing version 1/.test("
                "document.querySelector('#swap-version')?.textContent || '')",
                timeout=10_000,
            )
            stage = console.locator("#session-stages [data-stage=tts]")
            assert "tts: tone" in await stage.text_content()
            await console.select_option("#swap-stage", "tts")
            await console.select_option("#swap-connector", "piper")
            await console.click("#swap-save")
            await console.wait_for_function(
                "() => /saved: tts is now piper \\(version 2\\)/.test("
                "document.querySelector('#swap-status').textContent)",
                timeout=10_000,
            )
            swapped_at = await call.evaluate(
                "() => Math.max(0, ...window.__voicemesh.events.map((e) => e.epoch || 0))"
            )
            # the view shows it: the session's stream brings version 2 with tts: piper
            await console.wait_for_function(
                "() => /version 2/.test(document.querySelector('#session-version').textContent)"
                " && /tts: piper/.test(document.querySelector("
                "'#session-stages [data-stage=tts]').textContent)",
                timeout=10_000,
            )

            # ... and the next turn is heard in Piper's voice: speech, not the tone
            later, voiced = await wait_turn(call, swapped_at, 60, "piper")
            assert tone_share(voiced) <= 0.3, (later, voiced)
            assert len({round(f / 50) for f in voiced}) >= 3, voiced  # many pitches: a voice
            # the console's transcript followed the same call, both turns
            transcript = await console.text_content("#transcript")
            assert "You said tone 300" in transcript, transcript
            assert await call.get_attribute("#switch", "hidden") is None
            # the call page's own switch read the session when the call began (version 1): the
            # console's save since makes its first try a conflict, its second (re-read) goes in
            await call.select_option("#switch-stage", "tts")
            assert await call.input_value("#switch-connector") == "tone"  # as read at version 1
            await stale_then_saved(
                call, "#switch-connector", "#switch-save", "tone", "piper", "tts is now tone"
            )
            switched_at = await last_epoch(call)
            back, toned = await wait_turn(call, switched_at, 60, "tone again")
            assert tone_share(toned) >= 0.8, (back, toned)
            # the call page's waterfall: one per turn_metrics, each phase and the total in ms
            metrics = await call.evaluate(
                "() => window.__voicemesh.events.filter((e) => e.type === 'turn_metrics')"
            )
            shown = call.locator("#waterfall .wf")
            assert await shown.count() == len(metrics) >= 3
            m = metrics[0]
            bars = call.locator(f"#waterfall .wf[data-epoch='{m['epoch']}']")
            text = await bars.text_content()
            for phase in ("eou", "stt", "llm", "tts", "audio"):
                assert f"turn {m['epoch']} {phase}" in text, text
            assert f"{round(m['v2v_ms'])} ms" in await bars.locator(".v2v").text_content()
            assert await bars.locator(".seg.llm").count() == 1
            await call.click("#hangup")
            assert not errors, errors
        finally:
            await b.close()


async def open_console_and_call(b: Any, url: str, agent: str, errors: list[str]) -> tuple[Any, Any]:
    """The console with acme's key, then "Test this agent" on `agent`: (console page, call page)
    with the call page's probe on and the call started."""
    context = await b.new_context(viewport={"width": 1280, "height": 860})
    console = await context.new_page()
    console.on("pageerror", lambda e: errors.append(f"console: {e}"))
    await console.goto(f"{url}/console?raw_audio=1#agents")
    await console.wait_for_selector("#keybox:visible", timeout=10_000)
    await console.fill("#key", A_KEY)
    await console.press("#key", "Enter")
    row = console.locator(f"#agents tr[data-agent={agent}]")
    await row.wait_for(timeout=10_000)
    async with context.expect_page() as opened:
        await row.locator("button[data-act=test]").click()
    call = await opened.value
    call.on("pageerror", lambda e: errors.append(f"call: {e}"))
    await call.wait_for_selector("#call:enabled", timeout=15_000)
    assert await call.input_value("#agent") == agent
    await call.evaluate(PROBE)
    return console, call


async def last_epoch(call: Any) -> int:
    return int(
        await call.evaluate(
            "() => Math.max(0, ...window.__voicemesh.events.map((e) => e.epoch || 0))"
        )
    )


async def test_browser_switching_a_live_calls_agent_is_heard_and_shown(
    transport_app: TransportApp,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    tmp_path: Path,
) -> None:
    """During a call, the console's session view switches the session to another agent (one
    that speaks with Piper): the next turn is heard in Piper's voice and the view names the new
    agent and the TTS connector that served it; the call page's own control switches back (its
    first try is a conflict: the console changed the session since it read it), and the next
    turn is the tone again."""
    from playwright.async_api import async_playwright

    assert HAVE_CHROMIUM, "Debian's chromium is missing: apt-get install chromium (.ci/run)"
    url = transport_app.url
    toned = toned_agent(agent_json, transcriber)
    voiced = copy.deepcopy(toned)
    voiced["connectors"]["tts"] = {"primary": "piper", "config": {"piper": {}}}
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {A_KEY}"}, timeout=10
    ) as c:
        for name, data in (("tone-agent", toned), ("piper-agent", voiced)):
            r = await c.post("/api/agents", json={"name": name, "config": data})
            assert r.status_code == 201, r.text

    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=chromium_args(mic_wav(tmp_path / "mic.wav")),
        )
        try:
            errors: list[str] = []
            console, call = await open_console_and_call(b, url, "tone-agent", errors)
            await call.click("#call")
            first, freqs = await wait_turn(call, 0, 45, "tone")
            assert tone_share(freqs) >= 0.8, (first, freqs)
            sid = await call.evaluate("() => window.__voicemesh.sessionId")

            await console.goto(f"{url}/console?raw_audio=1#session={sid}")
            await console.wait_for_function(
                "() => /editing version 1/.test("
                "document.querySelector('#swap-version')?.textContent || '')"
                " && document.querySelector('#switch-agent option[value=piper-agent]')",
                timeout=10_000,
            )
            assert await console.text_content("#session-agent") == "tone-agent"
            await console.select_option("#switch-agent", "piper-agent")
            await console.click("#agent-switch-save")
            await console.wait_for_function(
                "() => /switched: the session is now agent piper-agent \\(version 2\\)/.test("
                "document.querySelector('#agent-switch-status').textContent)",
                timeout=10_000,
            )
            switched_at = await last_epoch(call)
            later, heard = await wait_turn(call, switched_at, 60, "piper")
            assert tone_share(heard) <= 0.3, (later, heard)
            assert len({round(f / 50) for f in heard}) >= 3, heard  # many pitches: a voice
            # the view names the new agent, and the TTS connector that served the turn
            await console.wait_for_function(
                "() => document.querySelector('#session-agent').textContent === 'piper-agent'"
                " && document.querySelector('#session-stages [data-stage=tts]')"
                ".dataset.serving === 'piper'",
                timeout=10_000,
            )
            tts = await console.text_content("#session-stages [data-stage=tts]")
            assert tts.startswith("tts: piper") and "(serving: piper)" in tts, tts
            assert "fallback" not in tts
            await call.wait_for_function(
                "() => /tts: piper/.test(document.querySelector('#serving [data-stage=tts]')"
                "?.textContent || '')",
                timeout=10_000,
            )
            await shoot(console, "session-agent-switch")

            # the call page's control: it read the session at version 1, so its first try is
            # refused as a conflict (and it reads again); the second goes in
            await stale_then_saved(
                call,
                "#switch-agent",
                "#switch-agent-save",
                "tone-agent",
                "piper-agent",
                "the agent is now tone-agent",
            )
            back_at = await last_epoch(call)
            back, toned_again = await wait_turn(call, back_at, 60, "tone again")
            assert tone_share(toned_again) >= 0.8, (back, toned_again)
            await console.wait_for_function(
                "() => document.querySelector('#session-agent').textContent === 'tone-agent'"
                " && document.querySelector('#session-stages [data-stage=tts]')"
                ".dataset.serving === 'tone'",
                timeout=10_000,
            )
            await call.click("#hangup")
            assert not errors, errors
        finally:
            await b.close()


async def test_browser_a_fallback_after_a_primary_failure_is_shown_as_serving(
    transport_app: TransportApp,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent whose TTS primary (a loopback ElevenLabs) is made to fail every request, with the
    tone as its fallback: the turn is heard as the tone, and the console's sessions list, its
    session view and the call page all name the tone as the connector serving TTS, marked as a
    fallback, not the configured primary."""
    from playwright.async_api import async_playwright

    from voicemesh.testing.loopback.elevenlabs import ElevenLabsServer

    assert HAVE_CHROMIUM, "Debian's chromium is missing: apt-get install chromium (.ci/run)"
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "elevenlabs:VM_TEST_KEY")
    monkeypatch.setenv("VM_TEST_KEY", "sk-loopback-secret")
    url = transport_app.url
    data = toned_agent(agent_json, transcriber)
    eleven = ElevenLabsServer(frequency_hz=300.0)
    await eleven.start()
    try:
        eleven.fail("500")  # forced: every request of the primary fails
        data["connectors"]["tts"] = {
            "primary": "elevenlabs",
            "fallback": ["tone"],
            "attempt_timeout_ms": 1000,
            "config": {
                "elevenlabs": {
                    "api_key": "${VM_TEST_KEY}",
                    "base_url": eleven.url,
                    "voice_id": "v1",
                },
                "tone": {"ms_per_word": 150, "frequency_hz": TONE_HZ},
            },
        }
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {A_KEY}"}, timeout=10
        ) as c:
            r = await c.post("/api/agents", json={"name": "eleven-agent", "config": data})
            assert r.status_code == 201, r.text

        async with async_playwright() as pw:
            b = await pw.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=chromium_args(mic_wav(tmp_path / "mic.wav")),
            )
            try:
                errors: list[str] = []
                console, call = await open_console_and_call(b, url, "eleven-agent", errors)
                await console.goto(f"{url}/console?raw_audio=1#sessions")  # the list, live
                await call.click("#call")
                first, freqs = await wait_turn(call, 0, 45, "tone (the fallback)")
                assert tone_share(freqs) >= 0.8, (first, freqs)  # the fallback spoke
                assert eleven.failed >= 1  # ... because the primary was tried and failed
                sid = await call.evaluate("() => window.__voicemesh.sessionId")
                cell = console.locator(f"#sessions tr[data-session='{sid}'] [data-stage=tts]")
                await cell.wait_for(timeout=10_000)
                await console.wait_for_function(
                    f"() => document.querySelector(\"#sessions tr[data-session='{sid}'] "
                    "[data-stage=tts]\").dataset.serving === 'tone'",
                    timeout=10_000,
                )
                assert await cell.text_content() == "tts: tone (fallback)"
                assert "fallback" in (await cell.get_attribute("class") or "")
                await shoot(console, "sessions-fallback")
                await console.goto(f"{url}/console?raw_audio=1#session={sid}")
                stage = console.locator("#session-stages [data-stage=tts]")
                await stage.wait_for(timeout=10_000)
                shown = await stage.text_content()
                assert shown == "tts: elevenlabs → tone (serving: tone, fallback)", shown
                served = await call.text_content("#serving [data-stage=tts]")
                assert "tts: tone (fallback)" in served, served
                await call.click("#hangup")
                assert not errors, errors
            finally:
                await b.close()
    finally:
        await eleven.stop()
