"""The console (issue 17): its API additions (If-Match on session writes, the schema with the
allowed ${ENV} names, connector health, the live event streams and their tenant rule) against a
real transport on uvicorn, real NATS and Valkey; then the page itself in headless Chromium (slow),
each test asserting on what the page shows. Screenshots of each view go to docs/console/ when
VOICEMESH_CONSOLE_SHOTS=1."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from tests.conftest import ROOT
from tests.support import serving
from voicemesh.config.models import parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.transport.api.service import TransportService

ADMIN = "k-admin-console-01"
A_KEY = "k-acme-console-0a"
B_KEY = "k-beta-console-0b"
CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
SHOTS = ROOT / "docs" / "console"


@pytest.fixture
async def console(settings: Settings, agent_json: dict) -> AsyncIterator[tuple[str, Any]]:
    """A transport (no stages: nothing here calls) with an admin key and tenants acme and beta,
    the global default agent 'local', served on a free loopback port."""
    svc = TransportService(
        settings.model_copy(
            update={
                "auth": "required",
                "api_keys": (SecretStr(ADMIN),),
                "tenant_keys": (("acme", SecretStr(A_KEY)), ("beta", SecretStr(B_KEY))),
                "console_refresh_s": 1.0,
            }
        )
    )
    await svc.start()
    try:
        await svc.store.create_agent("local", parse_agent_config(orjson.dumps(agent_json)))
        await svc.store.set_default_agent("local")
        async with serving(svc) as url:
            yield url, svc
    finally:
        await svc.stop()


def client(url: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


async def new_session(url: str, key: str) -> dict[str, Any]:
    async with client(url, key) as c:
        r = await c.post("/api/sessions", json={})
        assert r.status_code == 201, r.text
        return dict(r.json())


async def watch_event(svc: TransportService, sid: str, event: dict[str, Any]) -> None:
    """A call's copy of one caller event, as Call._watched publishes it."""
    body = orjson.dumps({"transport": "webrtc", "event": event})
    await svc.bus.nc.publish(svc.subjects.watch(sid), body)
    await svc.bus.nc.flush()


async def mark_down(svc: TransportService, stage: str, connector: str, message: str) -> None:
    """A health mark as HealthBoard.mark_down writes it."""
    body = {
        "state": "down",
        "stage": stage,
        "connector": connector,
        "fp": "abc123",
        "by": f"{stage}-1",
        "error": {
            "code": "rate_limited",
            "kind": "rate_limit",
            "status": 429,
            "retryable": True,
            "message": message,
        },
        "hold_ms": 60_000,
    }
    key = f"{svc.settings.key_prefix}:health:{stage}:{connector}:abc123"
    await svc.store.client.set(key, orjson.dumps(body), px=60_000)


# --- the API ----------------------------------------------------------------------------------


async def test_patch_with_a_stale_if_match_is_refused(console: tuple[str, Any]) -> None:
    url, _ = console
    sid = (await new_session(url, A_KEY))["session_id"]
    patch = {"connectors": {"tts": {"primary": "tone", "config": {"tone": {}}}}}
    merge = {"Content-Type": "application/merge-patch+json"}
    async with client(url, A_KEY) as c:
        r = await c.get(f"/api/sessions/{sid}")
        assert r.headers["ETag"] == '"1"'
        first = await c.patch(
            f"/api/sessions/{sid}/config",
            content=orjson.dumps(patch),
            headers={**merge, "If-Match": '"1"'},
        )
        assert first.status_code == 200 and first.json()["version"] == 2
        second = await c.patch(
            f"/api/sessions/{sid}/config",
            content=orjson.dumps(patch),
            headers={**merge, "If-Match": '"1"'},
        )
        assert second.status_code == 409, second.text
        assert "changed by someone else" in second.json()["detail"]
        assert "version 1" in second.json()["detail"] and "version 2" in second.json()["detail"]
        cfg = (await c.get(f"/api/sessions/{sid}")).json()["config"]
        put = await c.put(f"/api/sessions/{sid}/config", json=cfg, headers={"If-Match": "1"})
        assert put.status_code == 409
        bad = await c.patch(
            f"/api/sessions/{sid}/config",
            content=b"{}",
            headers={**merge, "If-Match": "*x"},
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["path"] == "If-Match"
        # without If-Match the old behaviour holds: the patch applies to the current version
        ok = await c.patch(f"/api/sessions/{sid}/config", content=b"{}", headers=merge)
        assert ok.status_code == 200 and ok.json()["version"] == 3


async def test_switching_a_sessions_agent_names_only_the_callers_own(
    console: tuple[str, Any], agent_json: dict
) -> None:
    """PUT /api/sessions/{id}/agent: the session's whole config becomes the named agent's, under
    If-Match; the name is looked up as the caller's tenant sees agents (its own, then global), so
    another tenant's agent answers the same 404 as a name nobody has (attack: a tenant names
    another tenant's agent to read its config or run on its prompt and keys)."""
    url, _ = console
    mine = {**agent_json, "system_prompt": "acme's bot"}
    theirs = {**agent_json, "system_prompt": "beta's secret prompt"}
    async with client(url, A_KEY) as a, client(url, B_KEY) as b:
        assert (
            await a.post("/api/agents", json={"name": "acme-bot", "config": mine})
        ).status_code == 201
        assert (
            await b.post("/api/agents", json={"name": "beta-bot", "config": theirs})
        ).status_code == 201
        sid = (await a.post("/api/sessions", json={"agent": "local"})).json()["session_id"]
        path = f"/api/sessions/{sid}/agent"
        foreign = await a.put(path, json={"agent": "beta-bot"})
        nobody = await a.put(path, json={"agent": "nobody-bot"})
        assert foreign.status_code == nobody.status_code == 404
        assert foreign.json()["detail"] == "agent 'beta-bot' not found"
        assert nobody.json()["detail"] == "agent 'nobody-bot' not found"
        bad = await a.put(path, json={"agent": "../beta-bot"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["path"].endswith("agent")
        # another tenant cannot switch (or learn of) this session at all
        assert (await b.put(path, json={"agent": "beta-bot"})).status_code == 404
        unchanged = (await a.get(f"/api/sessions/{sid}")).json()
        assert unchanged["version"] == 1 and unchanged["agent"] == "local"
        ok = await a.put(path, json={"agent": "acme-bot"}, headers={"If-Match": '"1"'})
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"session_id": sid, "version": 2, "agent": "acme-bot"}
        now = (await a.get(f"/api/sessions/{sid}")).json()
        assert now["agent"] == "acme-bot" and now["config"]["system_prompt"] == "acme's bot"
        stale = await a.put(path, json={"agent": "local"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 409 and "changed by someone else" in stale.json()["detail"]
        # a global agent is the tenant's to name, as when a session starts
        back = await a.put(path, json={"agent": "local"}, headers={"If-Match": '"2"'})
        assert back.status_code == 200 and back.json()["version"] == 3


async def test_schema_names_allowed_env_never_values(
    console: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = console
    monkeypatch.setenv("OPENAI_API_KEY", "sk-resolved-secret-value-77")
    async with client(url, A_KEY) as c:
        r = await c.get("/api/schema")
    assert r.status_code == 200
    body = r.json()
    assert "tone" in body["schema"]["x-connector-options"]["tts"]
    assert "OPENAI_API_KEY" in body["secret_refs"]["llm"]["openai"]["api_key"]
    assert "sk-resolved-secret-value-77" not in r.text


async def test_health_marks_tenant_gets_kind_admin_gets_words(console: tuple[str, Any]) -> None:
    url, svc = console
    await mark_down(svc, "tts", "elevenlabs", "quota of tenant acme at api.example")
    async with client(url, B_KEY) as c:
        tenant = (await c.get("/api/connectors/health")).json()["down"]
    async with client(url, ADMIN) as c:
        admin = (await c.get("/api/connectors/health")).json()["down"]
    assert [(m["stage"], m["connector"], m["code"]) for m in tenant] == [
        ("tts", "elevenlabs", "rate_limited")
    ]
    assert "message" not in tenant[0] and "api.example" not in str(tenant)
    assert admin[0]["message"].startswith("quota") and admin[0]["since_ms"] <= admin[0]["until_ms"]


async def read_events(
    url: str, key: str, path: str, want: int, limit_s: float = 8.0
) -> list[tuple[str, Any]]:
    """The first `want` events of an SSE stream (or what came within limit_s)."""
    out: list[tuple[str, Any]] = []

    async def read() -> None:
        async with client(url, key) as c, c.stream("GET", path) as r:
            assert r.status_code == 200, await r.aread()
            kind = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    out.append((kind, orjson.loads(line[6:])))
                    if len(out) >= want:
                        return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), limit_s)
    return out


async def test_event_streams_show_a_tenant_only_its_own(console: tuple[str, Any]) -> None:
    url, svc = console
    mine = (await new_session(url, A_KEY))["session_id"]
    theirs = (await new_session(url, B_KEY))["session_id"]
    said = {"type": "transcript", "role": "user", "text": "hello acme", "final": True, "epoch": 1}
    other = {"type": "transcript", "role": "user", "text": "hello beta", "final": True, "epoch": 1}

    async def publish() -> None:
        for _ in range(12):
            await asyncio.sleep(0.3)
            await watch_event(svc, theirs, other)
            await watch_event(svc, mine, said)

    pub = asyncio.create_task(publish())
    try:
        one, every = await asyncio.gather(
            read_events(url, A_KEY, f"/api/sessions/{mine}/events", 3),
            read_events(url, A_KEY, "/api/events", 8, limit_s=5),
        )
    finally:
        pub.cancel()
    kinds = [k for k, _ in one]
    assert kinds[0] == "session" and one[0][1]["version"] == 1, one
    calls = [d for k, d in one if k == "call"]
    assert calls and calls[0]["event"]["text"] == "hello acme" and calls[0]["transport"] == "webrtc"
    snapshot = next(d for k, d in every if k == "snapshot")
    assert [s["session_id"] for s in snapshot["sessions"]] == [mine]
    seen = [d["session_id"] for k, d in every if k == "call"]
    assert seen and set(seen) == {mine}, every  # beta's events never reach acme
    async with client(url, A_KEY) as c:  # beta's session does not exist for acme
        r = await c.get(f"/api/sessions/{theirs}/events")
        assert r.status_code == 404


async def test_console_page_is_served_and_closed_to_paths(console: tuple[str, Any]) -> None:
    url, _ = console
    async with httpx.AsyncClient(base_url=url) as c:
        page = await c.get("/console")
        js = await c.get("/console/console.js")
        escape = await c.get("/console/..%2Fapp.py")
        api = await c.get("/api/events")
    assert page.status_code == 200 and "console.js" in page.text
    assert js.headers["content-type"].startswith("text/javascript")
    assert escape.status_code == 404
    assert api.status_code == 401  # the stream needs a key like every /api route


# --- the page, in Chromium ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    # CI installs it (.ci/run): a missing browser is a broken setup, not a test to skip
    assert HAVE_CHROMIUM, "Debian's chromium is missing: apt-get install chromium (.ci/run)"
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
        )
        try:
            yield b
        finally:
            await b.close()


async def open_console(b: Any, url: str, key: str, view: str = "agents") -> Any:
    context = await b.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    await page.goto(f"{url}/console#{view}")
    await page.wait_for_selector("#keybox:visible", timeout=10_000)
    await page.fill("#key", key)
    await page.press("#key", "Enter")
    await page.wait_for_function(
        "() => document.querySelector('#status').dataset.state === 'ok'", timeout=10_000
    )
    return page


async def shoot(page: Any, name: str) -> None:
    if os.environ.get("VOICEMESH_CONSOLE_SHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.slow
async def test_browser_agent_form_error_at_its_field_then_saved_and_default(
    console: tuple[str, Any],
) -> None:
    url, _ = console
    async with browser() as b:
        page = await open_console(b, url, A_KEY)
        assert await page.locator("#agents tr[data-agent=local] .badge.default").count() == 1
        await page.click("#new-agent")
        await page.wait_for_selector("#agent-name")
        await page.fill("#agent-name", "Tone agent!")  # a space and '!' are not allowed
        await page.select_option("#tts-primary", "tone")
        await page.fill("#system-prompt", "You answer in one word.")
        await page.dispatch_event("#system-prompt", "input")
        await page.click("#save-agent")
        err = page.locator(".field[data-path=name] .field-error")
        await err.wait_for(state="visible", timeout=10_000)
        assert "invalid agent name" in await err.text_content()
        assert await page.locator(".field.invalid").count() == 1  # only the field it names
        assert '"primary": "tone"' in await page.input_value("#agent-json")
        await shoot(page, "agent-editor")
        await page.fill("#agent-name", "tone-agent")
        await page.click("#save-agent")
        row = page.locator("#agents tr[data-agent=tone-agent]")
        await row.wait_for(timeout=10_000)
        assert "tts: tone" in await row.text_content()
        assert await row.get_attribute("data-owner") == "acme"
        await row.locator("button[data-act=default]").click()
        await page.locator("#agents tr[data-agent=tone-agent] .badge.default").wait_for()
        assert "tone-agent is now the default" in await page.text_content("#status")
        assert await page.locator("#agents .badge.default").count() == 1
        await shoot(page, "agents")
        calls = await page.evaluate("() => window.__console.calls")
        assert not page.errors, page.errors
    async with client(url, A_KEY) as c:  # what the page showed is what the API holds
        agents = (await c.get("/api/agents")).json()
    assert agents["default"] == "tone-agent"
    # agents: the 401 probe, the list twice, set-default and the list after it; editor: schema,
    # the default to start from, two POSTs
    assert calls["agents"] <= 5 and calls["agent-editor"] <= 4, calls


@pytest.mark.slow
async def test_browser_editor_completes_keys_and_values_from_the_schema(
    console: tuple[str, Any],
) -> None:
    """The agent JSON editor completes from the agent JSON Schema at the cursor's path: inside
    connectors.tts.config.tone it offers the tone connector's options not yet written (with type
    and default), for connectors.tts.primary the TTS connectors; what it inserts is JSON the API
    accepts."""
    url, _ = console
    async with browser() as b:
        page = await open_console(b, url, A_KEY)
        await page.click("#new-agent")
        await page.wait_for_selector("#agent-json")
        await page.fill("#agent-name", "completed")
        cfg = orjson.loads(await page.input_value("#agent-json"))
        cfg["connectors"]["tts"] = {"primary": "tone", "config": {"tone": {"ms_per_word": 150}}}
        text = orjson.dumps(cfg, option=orjson.OPT_INDENT_2).decode()
        await page.fill("#agent-json", text)
        caret = "(at) => { const t = document.querySelector('#agent-json'); t.focus(); t.setSelectionRange(at[0], at[1]); }"  # noqa: E501
        at = text.index('"tone": {') + len('"tone": {')
        await page.evaluate(caret, [at, at])
        await page.keyboard.press("Enter")
        await page.keyboard.type('"')
        box = page.locator("#agent-json-complete")
        await box.wait_for(state="visible", timeout=5_000)
        labels = "els => els.map((e) => e.dataset.label)"
        offered = await box.locator("li").evaluate_all(labels)
        # the tone options not written yet; nothing of another level (primary, system_prompt)
        assert sorted(offered) == ["frequency_hz", "sample_rate"], offered
        hint = await box.locator("li[data-label=frequency_hz]").text_content()
        assert "number" in hint and "440" in hint, hint
        await shoot(page, "agent-editor-complete")
        await page.keyboard.type("fre")
        assert await box.locator("li").evaluate_all(labels) == ["frequency_hz"]
        await page.keyboard.press("Enter")
        await box.wait_for(state="hidden", timeout=5_000)
        edited = orjson.loads(await page.input_value("#agent-json"))  # still JSON
        assert edited["connectors"]["tts"]["config"]["tone"] == {
            "frequency_hz": 440.0,
            "ms_per_word": 150,
        }
        # a value: the TTS stage's primary offers the TTS connectors; Esc closes, typing narrows
        text = await page.input_value("#agent-json")
        at = text.index('"primary": "tone"', text.index('"tts"')) + len('"primary": ')
        await page.evaluate(caret, [at, at + len('"tone"')])
        await page.keyboard.type('"')
        await box.wait_for(state="visible", timeout=5_000)
        async with client(url, A_KEY) as c:
            schema = (await c.get("/api/schema")).json()
        tts = sorted(schema["schema"]["x-connector-options"]["tts"])
        assert await box.locator("li").evaluate_all(labels) == [f'"{n}"' for n in tts]
        await page.keyboard.press("Escape")
        await box.wait_for(state="hidden", timeout=5_000)
        await page.keyboard.type("pi")
        await box.wait_for(state="visible", timeout=5_000)
        assert await box.locator("li").evaluate_all(labels) == ['"piper"']
        await page.keyboard.press("Tab")
        await box.wait_for(state="hidden", timeout=5_000)
        assert await page.input_value("#tts-primary") == "piper"  # the form follows the JSON
        await page.click("#save-agent")
        await page.locator("#agents tr[data-agent=completed]").wait_for(timeout=10_000)
        assert not page.errors, page.errors
    async with client(url, A_KEY) as c:  # what the editor made is what the API took
        saved = (await c.get("/api/agents/completed")).json()["config"]["connectors"]["tts"]
    assert saved["primary"] == "piper"
    assert saved["config"]["tone"] == {"frequency_hz": 440.0, "ms_per_word": 150}


@pytest.mark.slow
async def test_browser_two_editors_second_save_is_refused(console: tuple[str, Any]) -> None:
    url, svc = console
    sid = (await new_session(url, A_KEY))["session_id"]
    async with browser() as b:
        one = await open_console(b, url, A_KEY, f"session={sid}")
        two = await open_console(b, url, A_KEY, f"session={sid}")
        for page in (one, two):
            assert "editing version 1" in await page.text_content("#swap-version")
        # the live parts: a call's events as they come (the transcript, the turn's waterfall)
        await watch_event(
            svc,
            sid,
            {
                "type": "transcript",
                "role": "user",
                "text": "What time is it?",
                "final": True,
                "epoch": 1,
                "connector": "whisper",
            },
        )
        await watch_event(
            svc,
            sid,
            {
                "type": "transcript",
                "role": "assistant",
                "text": "It is noon.",
                "epoch": 1,
                "index": 0,
                "connector": "smollm2",
            },
        )
        await watch_event(
            svc,
            sid,
            {
                "type": "turn_metrics",
                "epoch": 1,
                "trace_id": "t1",
                "eou_ms": 200.0,
                "stt_ms": 150.0,
                "llm_ttft_ms": 90.0,
                "tts_ttfb_ms": 120.0,
                "first_audio_ms": 30.0,
                "v2v_ms": 590.0,
            },
        )
        await watch_event(
            svc,
            sid,
            {
                "type": "error",
                "error": "tts failed over",
                "code": "fallback",
                "stage": "tts",
                "epoch": 1,
            },
        )
        await one.locator("#waterfall .wf[data-epoch='1']").wait_for(timeout=10_000)
        assert "It is noon." in await one.text_content("#transcript")
        assert "590 ms" in await one.text_content("#waterfall")
        assert "tts failed over" in await one.text_content("#session-events")
        assert "transport webrtc" in await one.text_content("#session-transport")
        await one.select_option("#swap-stage", "tts")
        await one.select_option("#swap-connector", "tone")
        await one.click("#swap-save")
        await one.wait_for_function(
            "() => /saved: tts is now tone \\(version 2\\)/.test("
            "document.querySelector('#swap-status').textContent)",
            timeout=10_000,
        )
        # the stream brings version 2 to the second page's header, but its editor keeps 1
        await two.wait_for_function(
            "() => /version 2/.test(document.querySelector('#session-version').textContent)",
            timeout=10_000,
        )
        await two.select_option("#swap-stage", "tts")
        await two.select_option("#swap-connector", "piper")
        await two.click("#swap-save")
        await two.wait_for_function(
            "() => document.querySelector('#swap-status').dataset.state === 'error'",
            timeout=10_000,
        )
        refused = await two.text_content("#swap-status")
        assert refused.startswith("Conflict:") and "changed by someone else" in refused
        await shoot(two, "session-conflict")
        await shoot(one, "session")
        calls = await one.evaluate("() => window.__console.calls")
        assert not one.errors and not two.errors
    async with client(url, A_KEY) as c:
        stored = (await c.get(f"/api/sessions/{sid}")).json()
    assert stored["version"] == 2 and stored["config"]["connectors"]["tts"]["primary"] == "tone"
    # the detail view: the 401 probe, the session, the schema, the agents (for the agent
    # switch), its stream, one PATCH and one GET after it
    assert calls["session"] <= 7, calls


@pytest.mark.slow
async def test_browser_second_tenant_sees_nothing_of_the_first(console: tuple[str, Any]) -> None:
    url, svc = console
    sid = (await new_session(url, A_KEY))["session_id"]
    async with client(url, A_KEY) as c:
        cfg = (await c.get("/api/agents/local")).json()["config"]
        r = await c.post("/api/agents", json={"name": "acme-only", "config": cfg})
        assert r.status_code == 201
    await mark_down(svc, "tts", "elevenlabs", "acme's endpoint api.acme.example refused")
    async with browser() as b:
        acme = await open_console(b, url, A_KEY, "sessions")
        await acme.locator(f"#sessions tr[data-session='{sid}']").wait_for(timeout=10_000)
        await shoot(acme, "sessions")
        beta = await open_console(b, url, B_KEY)
        names = await beta.locator("#agents tbody tr").evaluate_all(
            "rows => rows.map((r) => r.dataset.agent)"
        )
        assert names == ["local"]  # the global agent only
        await beta.goto(f"{url}/console#sessions")
        await beta.wait_for_function(
            "() => /0 live sessions/.test(document.querySelector('#status').textContent)",
            timeout=10_000,
        )
        assert await beta.locator("#sessions tbody tr").count() == 0
        await beta.goto(f"{url}/console#session={sid}")
        await beta.wait_for_function(
            "() => /not found/.test(document.querySelector('#status').textContent)",
            timeout=10_000,
        )
        await beta.goto(f"{url}/console#health")
        row = beta.locator("#health tr[data-connector=elevenlabs]")
        await row.wait_for(timeout=10_000)
        assert "rate_limited" in await row.text_content()
        assert "api.acme.example" not in await beta.text_content("#health")
        admin = await open_console(b, url, ADMIN, "health")
        await admin.locator("#health tr[data-connector=elevenlabs]").wait_for(timeout=10_000)
        await shoot(admin, "health")
        calls = await beta.evaluate("() => window.__console.calls")
        assert not beta.errors
    assert calls.get("health", 0) <= 2, calls


async def test_a_call_copies_each_caller_event_to_its_watch_subject(
    console: tuple[str, Any],
) -> None:
    """The copy the streams read: every event a call's peer delivers goes out on vm.watch.<sid>
    with the carrier's name, after the caller has it."""
    from voicemesh.bus.events import CallerEvent, Session
    from voicemesh.transport.call.call import Call
    from voicemesh.transport.call.peer import Peer

    _, svc = console
    delivered: list[str] = []

    class Fake(Peer):
        name = "websocket"

        async def receive(self) -> bytes | None:
            return None

        async def send_audio(self, pcm: bytes) -> None:
            pass

        async def deliver(self, event: CallerEvent) -> None:
            delivered.append(event.type)

        def hang_up(self) -> None:
            pass

    peer = Fake()
    Call(svc, "S" * 22, peer)
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on(msg: Any) -> None:
        await got.put(msg.data)

    sub = await svc.bus.nc.subscribe(svc.subjects.watch("S" * 22), cb=on)
    await svc.bus.nc.flush()
    await peer.send_event(Session(session_id="S" * 22, version=3))
    body = orjson.loads(await asyncio.wait_for(got.get(), 5))
    await sub.unsubscribe()
    assert delivered == ["session"]
    assert body == {
        "transport": "websocket",
        "event": {"type": "session", "session_id": "S" * 22, "version": 3},
    }


async def test_one_stream_more_than_console_max_streams_is_a_429(
    settings: Settings,
) -> None:
    svc = TransportService(
        settings.model_copy(
            update={"auth": "required", "api_keys": (SecretStr(ADMIN),), "console_max_streams": 1}
        )
    )
    await svc.start()
    try:
        async with serving(svc) as url, client(url, ADMIN) as c:
            async with c.stream("GET", "/api/events") as first:
                assert first.status_code == 200
                second = await c.get("/api/events")
                assert second.status_code == 429 and "at most 1" in second.json()["detail"]
                assert second.headers["Retry-After"]
    finally:
        await svc.stop()
