"""One call from a real browser through pipecat's client SDK: `voicemesh up` and headless Chromium
in the same network namespace (run it as browser_call.py is run: inside `unshare -n`).

`--client example`: examples/pipecat-client (its vendored bundle of @pipecat-ai/client-js and
@pipecat-ai/small-webrtc-transport), served at the transport's origin by the browser itself
(Playwright answers /example/* from the directory), so nothing but `up` listens. The page calls
`startBotAndConnect` (POST /start, then /sessions/{id}/api/offer), waits for bot-ready, lets its
fake microphone ask the question, and hangs up with disconnect-bot.

`--client prebuilt`: pipecat's prebuilt UI at /client, served by the transport.

It writes what the page saw as JSON to --out; it never asserts (the test does), it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mimetypes
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_call import CHROMIUM, ROOT, Up, chromium_args

EXAMPLE = ROOT / "examples" / "pipecat-client"
CALL_MACHINE = Path(__file__).with_name("daily_call_machine.js")

STATE = "() => JSON.parse(JSON.stringify(window.__rtvi || null))"

#: the example page is done when the question was heard, the bot answered, and metrics came
DONE = """(want) => {
  const s = window.__rtvi;
  if (!s) return false;
  const asked = s.transcripts.some((t) => t.final && new RegExp(want, 'i').test(t.text));
  return asked && s.bot.length > 0 && s.metrics.length > 0;
}"""


def serve_example(route: Any) -> None:
    """Answer /example/<path> from examples/pipecat-client (same origin as the transport)."""
    path = route.request.url.split("/example/", 1)[1].split("?", 1)[0] or "index.html"
    file = (EXAMPLE / path).resolve()
    if EXAMPLE not in file.parents or not file.is_file():
        route.fulfill(status=404, body="not found")
        return
    kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    route.fulfill(status=200, body=file.read_bytes(), headers={"content-type": kind})


def example_call(args: argparse.Namespace, up: Up, page: Any, report: dict[str, Any]) -> None:
    from playwright.sync_api import Error as PlaywrightError

    base = f"http://127.0.0.1:{up.port}"
    page.route(f"{base}/example/**", serve_example)
    page.goto(f"{base}/example/index.html?raw_audio=1", timeout=15_000)
    t0 = time.monotonic()
    page.click("#connect")
    try:
        page.wait_for_function("() => !!(window.__rtvi && window.__rtvi.ready)", timeout=30_000)
        report["connected_s"] = round(time.monotonic() - t0, 1)
        report["after_connect"] = page.evaluate(STATE)
        page.wait_for_function(DONE, arg=args.want, timeout=args.call_timeout * 1000, polling=200)
        report["answered_s"] = round(time.monotonic() - t0, 1)
    except PlaywrightError as exc:
        report["error"] = f"the call did not complete: {exc.message.splitlines()[0]}"
    report["page"] = page.evaluate(STATE)
    report["transcript_text"] = page.inner_text("#transcript")
    page.click("#hangup")
    with contextlib.suppress(PlaywrightError):
        page.wait_for_function("() => window.__rtvi.disconnected", timeout=10_000)
    report["after_hangup"] = page.evaluate(STATE)
    report["status_after_hangup"] = page.inner_text("#status")
    time.sleep(1.0)  # the server's side of the hang-up reaches its log


def prebuilt_call(args: argparse.Namespace, up: Up, page: Any, report: dict[str, Any]) -> None:
    """The prebuilt UI: it connects on its Connect button and shows the conversation."""
    from playwright.sync_api import Error as PlaywrightError

    rtvi: list[str] = report.setdefault("rtvi_in", [])

    def on_ws_or_dc(msg: Any) -> None:  # console lines the UI logs at debug level
        text = msg.text
        if "rtvi-ai" in text:
            rtvi.append(text[:300])

    page.on("console", on_ws_or_dc)
    # offline, daily-js' call machine (fetched from Daily's CDN) is answered by a stand-in
    page.route(
        "https://c.daily.co/call-machine/**",
        lambda route: route.fulfill(
            status=200, body=CALL_MACHINE.read_text(), headers={"content-type": "text/javascript"}
        ),
    )
    page.goto(f"http://127.0.0.1:{up.port}/client/", timeout=15_000)
    t0 = time.monotonic()
    try:
        # the UI sets its devices up first (the client reads INITIALIZED), then Connect works
        page.wait_for_function(
            "() => /INITIALIZED/.test(document.body.innerText)", timeout=30_000, polling=250
        )
        page.get_by_role("button", name="Connect", exact=True).click(timeout=10_000)
        page.wait_for_function(
            "() => /READY/.test(document.body.innerText)", timeout=30_000, polling=250
        )
        report["connected_s"] = round(time.monotonic() - t0, 1)
        page.wait_for_function(
            "(want) => new RegExp(want, 'i').test(document.body.innerText)",
            arg=args.want,
            timeout=args.call_timeout * 1000,
            polling=250,
        )
        report["answered_s"] = round(time.monotonic() - t0, 1)
        time.sleep(4.0)  # the bot's reply follows the question
    except PlaywrightError as exc:
        report["error"] = f"the call did not complete: {exc.message.splitlines()[0]}"
    report["body_text"] = page.inner_text("body")[-3000:]
    if args.screenshot:
        page.screenshot(path=str(args.screenshot), full_page=True)


def run(args: argparse.Namespace, up: Up, report: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    console: list[str] = report.setdefault("console", [])
    failed: list[str] = report.setdefault("failed_requests", [])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(args.wav)
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:500]))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: failed.append(r.url[:200]))
            if args.client == "example":
                example_call(args, up, page, report)
            else:
                prebuilt_call(args, up, page, report)
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wav", type=Path, required=True, help="the fake microphone (loops)")
    parser.add_argument("--data", type=Path, required=True, help="a scratch directory")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--client", choices=("example", "prebuilt"), default="example")
    parser.add_argument("--want", default="capital|france", help="regex the user line matches")
    parser.add_argument("--startup-timeout", type=float, default=240.0)
    parser.add_argument("--call-timeout", type=float, default=90.0)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()

    from voicemesh.servers import free_port

    report: dict[str, Any] = {"error": None}
    report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    up = Up(args.data, free_port())
    try:
        up.wait_up(args.startup_timeout)
        run(args, up, report)
    except (Exception, KeyboardInterrupt) as exc:
        report["error"] = report.get("error") or f"{type(exc).__name__}: {exc}"
    finally:
        report["up_exit"] = up.stop()
        report["stack_log"] = up.tail(60)
        report["stack_log_calls"] = [
            line
            for line in up.text().splitlines()
            if re.search(r"call|WebRTC|RTVI|error|typed", line, re.I)
        ][-40:]
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
