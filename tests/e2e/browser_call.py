"""One call from a real browser: `voicemesh up` and headless Chromium (driven by Playwright) in the
same network namespace, the page at / calling over WebRTC with a WAV file as its microphone.

Run it inside `unshare -n sh -c 'ip link set lo up; exec python tests/e2e/browser_call.py ...'`
(tests/e2e/test_browser.py does): the browser and the server then see nothing but loopback.
It writes what the page showed as JSON to --out; it never asserts (the test does), it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"

#: What the page must show before the call counts as done: the caller's words, a reply that was
#: heard (its audio measured in the page), its latency line, and the reply played to its end.
DONE = """(want) => {
  const s = window.__voicemesh;
  const user = [...document.querySelectorAll('#transcript .line[data-role=user]')]
    .find((el) => new RegExp(want, 'i').test(el.textContent));
  if (!s || !user) return false;
  const epoch = user.dataset.epoch;
  const bot = document.querySelector(
    `#transcript .line[data-role=assistant][data-epoch="${epoch}"]`);
  const latency = document.querySelector(`#transcript .latency[data-epoch="${epoch}"]`);
  const done = s.events.some((e) => e.type === 'bot_done' && String(e.epoch) === epoch);
  return !!(bot && bot.querySelector('.text').textContent.trim() && latency && done
            && s.botAudibleMs >= 300);
}"""

#: Everything the test looks at, read from the page.
SNAPSHOT = """() => {
  const s = window.__voicemesh || {};
  const lines = [...document.querySelectorAll('#transcript .line')].map((el) => ({
    role: el.dataset.role, epoch: Number(el.dataset.epoch),
    text: el.querySelector('.text').textContent.trim(), interrupted: !!el.dataset.interrupted}));
  const latency = [...document.querySelectorAll('#transcript .latency')].map((el) => ({
    epoch: Number(el.dataset.epoch), v2v_ms: el.dataset.v2vMs ? Number(el.dataset.v2vMs) : null,
    text: el.textContent}));
  return {
    status: document.querySelector('#status').textContent,
    status_state: document.querySelector('#status').dataset.state,
    agent: document.querySelector('#agent').value,
    agents: [...document.querySelectorAll('#agent option')].map((o) => o.textContent),
    call_disabled: document.querySelector('#call').disabled,
    hangup_disabled: document.querySelector('#hangup').disabled,
    lines, latency,
    session_id: s.sessionId, error: s.error,
    bot_peak_rms: s.botPeakRms, bot_audible_ms: s.botAudibleMs, mic_peak_rms: s.micPeakRms,
    audio_peak_attr: document.querySelector('#bot-audio').dataset.peakRms || null,
    events: (s.events || []).map((e) => e.type),
    turn_metrics: (s.events || []).filter((e) => e.type === 'turn_metrics'),
  };
}"""


#: How the page shows a reply cut off by the caller: the bot's line of the last turn, fed a
#: synthetic `interrupted` event (the server's shape) once the call is over.
INTERRUPTED = """() => {
  const bot = [...document.querySelectorAll('#transcript .line[data-role=assistant]')].pop();
  if (!bot) return null;
  const full = bot.querySelector('.text').textContent;
  const heard = full.split(' ').slice(0, 2).join(' ');
  onEvent({type: 'interrupted', epoch: Number(bot.dataset.epoch), heard});
  return {full, heard, interrupted: bot.dataset.interrupted || null,
          text: bot.textContent, unheard: bot.querySelector('.unheard')?.textContent ?? null};
}"""


def chromium_args(wav: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
    ]


class Up:
    """`voicemesh up` on a free port with its own servers, output in a log file."""

    def __init__(self, data: Path, port: int, api_key: str | None = None):
        self.log_path = data / "up.log"
        self.port = port
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("VOICEMESH_") and k not in ("NATS_URL", "VALKEY_URL")
        }
        env.update(HF_HUB_OFFLINE="1", VOICEMESH_WEBRTC_LOOPBACK="1")
        if api_key:  # `up` keeps auth on when it is given keys
            env["VOICEMESH_API_KEYS"] = api_key
        self.log = self.log_path.open("w")
        agent_file = ROOT / "config" / "agent-config.json"
        argv = ["up", "--data-dir", str(data / "vm"), "--port", str(port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voicemesh", *argv, "--agent-file", str(agent_file)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )

    def text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 50) -> list[str]:
        return self.text().splitlines()[-n:]

    def wait_up(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while not re.search(r"\bup: .*http://", self.text()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"voicemesh up exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"voicemesh up was not ready within {limit_s:.0f} s")
            time.sleep(0.2)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def enter_key(page: Any, key: str) -> dict[str, Any]:
    """The page asks for a key after a 401, says so when one is refused, remembers the right one
    (localStorage) across a reload. Returns what it showed at each step."""
    status = "document.querySelector('#status')"
    seen: dict[str, Any] = {}
    page.wait_for_selector("#keybox:visible", timeout=15_000)
    seen["asked"] = page.evaluate(f"{status}.textContent")
    seen["call_enabled_without_key"] = page.is_enabled("#call")
    page.fill("#key", "not-the-key")
    page.press("#key", "Enter")
    page.wait_for_function(f"() => /refused/.test({status}.textContent)", timeout=10_000)
    seen["wrong_key"] = page.evaluate(f"{status}.textContent")
    page.fill("#key", key)
    page.click("#keybox button")
    page.wait_for_selector("#call:enabled", timeout=10_000)
    seen["right_key"] = page.evaluate(f"{status}.textContent")
    page.reload()
    page.wait_for_selector("#call:enabled", timeout=15_000)
    seen["after_reload"] = page.evaluate(f"{status}.textContent")
    seen["keybox_hidden_after_reload"] = page.is_hidden("#keybox")
    return seen


def browser_call(args: argparse.Namespace, up: Up, report: dict[str, Any]) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    console: list[str] = report.setdefault("console", [])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(args.wav)
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            url = f"http://127.0.0.1:{up.port}/?raw_audio=1"
            page.goto(url, timeout=15_000)
            if args.api_key:
                report["key_flow"] = enter_key(page, args.api_key)
            page.wait_for_selector("#call:enabled", timeout=15_000)
            report["before_call"] = page.evaluate(SNAPSHOT)
            t0 = time.monotonic()
            page.click("#call")
            try:
                page.wait_for_function(
                    DONE, arg=args.want, timeout=args.call_timeout * 1000, polling=200
                )
                report["answered_s"] = round(time.monotonic() - t0, 1)
            except PlaywrightError as exc:
                report["error"] = f"the call did not complete: {exc.message.splitlines()[0]}"
            report["page"] = page.evaluate(SNAPSHOT)
            if args.screenshot:
                page.screenshot(path=str(args.screenshot), full_page=True)
            page.click("#hangup")
            with contextlib.suppress(PlaywrightError):
                page.wait_for_function(
                    "() => document.querySelector('#status').textContent === 'call ended'",
                    timeout=5_000,
                )
            report["after_hangup"] = page.evaluate(SNAPSHOT)
            report["interrupted_render"] = page.evaluate(INTERRUPTED)
            time.sleep(1.0)  # let the server see the "end" and close its side
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wav", type=Path, required=True, help="the fake microphone (loops)")
    parser.add_argument("--data", type=Path, required=True, help="a scratch directory")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--want", default="capital|france", help="regex the user line matches")
    parser.add_argument("--startup-timeout", type=float, default=240.0)
    parser.add_argument("--call-timeout", type=float, default=90.0)
    parser.add_argument("--screenshot", type=Path, help="a PNG of the page after the reply")
    parser.add_argument("--api-key", help="start `up` with this key required (the page asks)")
    args = parser.parse_args()

    from voicemesh.servers import free_port

    report: dict[str, Any] = {"error": None}
    report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    t0 = time.monotonic()
    up = Up(args.data, free_port(), args.api_key)
    try:
        up.wait_up(args.startup_timeout)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        browser_call(args, up, report)
    except (Exception, KeyboardInterrupt) as exc:  # SIGINT: the test gave up waiting
        report["error"] = report.get("error") or f"{type(exc).__name__}: {exc}"
    finally:
        report["up_exit"] = up.stop()
        report["total_s"] = round(time.monotonic() - t0, 1)
        report["stack_log"] = up.tail(50)
        report["stack_log_calls"] = [
            line for line in up.text().splitlines() if re.search(r"call|WebRTC|error", line, re.I)
        ][-30:]
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
