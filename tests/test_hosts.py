"""Egress by allow-list (issue 12, item 2): where a config may point a connector, checked at push
time (API 422 naming the path), at load from Valkey, and when a connector is built; no connector
follows a redirect; a TTS 200 that is not audio fails; a provider's body never reaches the caller
or the stored context.

The fake providers here are raw loopback sockets, so a test can see whether anything (a request,
an Authorization header) arrived at a host it must not reach.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import re
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from tests.support import Inbox, Services, listen, until
from voicemesh.bus import Bus, Frame, Kind, Subjects
from voicemesh.config.connectors import (
    AnthropicOptions,
    AzureTTSOptions,
    DeepgramOptions,
    ElevenLabsOptions,
    OpenAILLMOptions,
    OpenAISTTOptions,
    OpenAITTSOptions,
)
from voicemesh.config.hosts import EgressError, EgressPolicy, egress_fields, url_problem
from voicemesh.config.models import ConfigValidationError, parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.connectors.base import Connector
from voicemesh.connectors.errors import ConnectorError, FailureKind
from voicemesh.connectors.fallback import AllConnectorsFailed, caller_error
from voicemesh.connectors.registry import ConnectorPool
from voicemesh.pipeline import LLMService, TTSService
from voicemesh.state import ConfigStore
from voicemesh.transport.api.app import create_app
from voicemesh.transport.api.service import TransportService

API_KEY = "hosts-test-key"
PROVIDER_KEY = "sk-provider-secret-7f3a9c"
MARKER = "BODY-MARKER-4b1d"


@pytest.fixture(autouse=True)
def _egress_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Private hosts off (the default) unless a test turns them on; no operator hosts."""
    monkeypatch.delenv("VOICEMESH_EGRESS_PRIVATE", raising=False)
    monkeypatch.delenv("VOICEMESH_EGRESS_HOSTS", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)


# --- raw loopback sockets --------------------------------------------------------------------


class RawServer:
    """Answers each request with `respond(head)` and records what arrived (and how many
    connections were made at all)."""

    def __init__(self, respond: Callable[[bytes], bytes] | None = None):
        self.respond = respond
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            self.requests.append(head + body)
            if self.respond is not None:
                writer.write(self.respond(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def http_response(status: int, body: bytes = b"", content_type: str = "", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} Status", f"Content-Length: {len(body)}", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def redirect_to(target: str) -> Callable[[bytes], bytes]:
    def respond(head: bytes) -> bytes:
        path = head.split(b" ", 2)[1].decode()
        return http_response(307, Location=f"{target}{path}")

    return respond


@pytest.fixture
async def sink() -> AsyncIterator[RawServer]:
    """A second loopback server: nothing may ever reach it."""
    async with RawServer(lambda head: http_response(200, b"{}", "application/json")) as s:
        yield s


def connector(name: str, url: str) -> Connector:
    """Each cloud connector, pointed at `url`, holding PROVIDER_KEY."""
    from voicemesh.connectors.llm.anthropic import AnthropicLLM
    from voicemesh.connectors.llm.openai import OpenAILLM
    from voicemesh.connectors.stt.deepgram import DeepgramSTT
    from voicemesh.connectors.stt.openai import OpenAISTT
    from voicemesh.connectors.tts.azure import AzureTTS
    from voicemesh.connectors.tts.elevenlabs import ElevenLabsTTS
    from voicemesh.connectors.tts.openai import OpenAITTS

    key = PROVIDER_KEY
    build: dict[str, Callable[[], Connector]] = {
        "llm.openai": lambda: OpenAILLM(
            OpenAILLMOptions(model="m", api_key=key, base_url=f"{url}/v1")
        ),
        "llm.anthropic": lambda: AnthropicLLM(
            AnthropicOptions(model="m", api_key=key, base_url=url)
        ),
        "stt.openai": lambda: OpenAISTT(OpenAISTTOptions(api_key=key, base_url=f"{url}/v1")),
        "stt.deepgram": lambda: DeepgramSTT(DeepgramOptions(api_key=key, base_url="ws" + url[4:])),
        "tts.openai": lambda: OpenAITTS(OpenAITTSOptions(api_key=key, base_url=f"{url}/v1")),
        "tts.azure": lambda: AzureTTS(AzureTTSOptions(api_key=key, base_url=url)),
        "tts.elevenlabs": lambda: ElevenLabsTTS(
            ElevenLabsOptions(api_key=key, voice_id="v", base_url=url)
        ),
    }
    return build[name]()


async def use(conn: Connector) -> list[Any]:
    """One unit of work on a connector: what it yields."""
    from voicemesh.connectors.base import LLMConnector, STTConnector, TTSConnector

    if isinstance(conn, LLMConnector):
        return [c async for c in conn.stream([{"role": "user", "content": "hi"}])]
    if isinstance(conn, TTSConnector):
        return [c async for c in conn.synthesize("hello there")]
    assert isinstance(conn, STTConnector)
    return [await conn.transcribe(bytes(16000 * 2 // 2), 16000)]


CLOUD = [
    "llm.openai",
    "llm.anthropic",
    "stt.openai",
    "stt.deepgram",
    "tts.openai",
    "tts.azure",
    "tts.elevenlabs",
]


# --- a redirect is not followed ------------------------------------------------------------------


@pytest.mark.parametrize("name", CLOUD)
async def test_a_redirect_to_another_host_is_not_followed(name: str, sink: RawServer) -> None:
    """The allowed fake answers 307 to another loopback server: the connector fails (permanent)
    and the second server receives nothing, in particular no key. On main the openai and
    anthropic SDKs followed it (anthropic's x-api-key with it) and so did Deepgram's websocket."""
    target = ("ws" + sink.url[4:]) if name == "stt.deepgram" else sink.url
    async with RawServer(redirect_to(target)) as redirector:
        conn = connector(name, redirector.url)
        try:
            with pytest.raises(Exception) as info:
                await use(conn)
                raise AssertionError("no failure")
        finally:
            await conn.aclose()
        assert redirector.requests, "the connector never reached the allowed host"
    assert sink.connections == 0 and sink.requests == [], sink.requests
    assert isinstance(info.value, ConnectorError), info.value
    assert info.value.kind is FailureKind.PERMANENT, info.value
    assert "redirect" in str(info.value)


async def test_a_request_to_another_origin_is_refused_before_it_is_sent(sink: RawServer) -> None:
    from voicemesh.connectors.http import EgressGuard

    guard = EgressGuard("x", "https://api.openai.com/v1")
    async with guard.client() as http:
        with pytest.raises(ConnectorError, match="another origin"):
            await http.get(f"{sink.url}/v1/models")
    assert sink.connections == 0


# --- a TTS 200 that is not audio -------------------------------------------------------------


@pytest.mark.parametrize("name", ["tts.openai", "tts.azure", "tts.elevenlabs"])
async def test_a_tts_answer_that_is_not_audio_is_refused(name: str) -> None:
    """Read-SSRF: an internal service's HTML page answered with 200 must not be played as
    audio (on main its bytes went to the caller as PCM)."""
    page = f"<html><body>internal admin {MARKER}</body></html>".encode()
    async with RawServer(lambda head: http_response(200, page, "text/html")) as internal:
        conn = connector(name, internal.url)
        try:
            with pytest.raises(ConnectorError) as info:
                await use(conn)
        finally:
            await conn.aclose()
    assert info.value.kind is FailureKind.PERMANENT
    assert "not audio" in str(info.value) and MARKER not in str(info.value)


async def test_a_voice_id_cannot_aim_the_key_elsewhere_on_the_providers_api(
    sink: RawServer,
) -> None:
    """The ElevenLabs SDK pastes voice_id into the path unencoded: "../../v1/user?" made the
    synthesis a POST to /v1/user, on the allowed host, whose JSON answer the caller heard. The
    id is refused at push, and any POST answer of a TTS connector must be audio whatever its
    path."""
    from voicemesh.connectors.http import EgressGuard

    for bad in ("../../v1/user?", "a/b", "a?b", "a#b", "x" * 65, ""):
        with pytest.raises(ValidationError, match="voice_id"):
            ElevenLabsOptions(api_key="${ELEVENLABS_API_KEY}", voice_id=bad)
    ElevenLabsOptions(api_key="${ELEVENLABS_API_KEY}", voice_id="21m00Tcm4TlvDq8ikWAM")
    account = orjson.dumps({"subscription": MARKER})
    async with RawServer(lambda head: http_response(200, account, "application/json")) as api:
        guard = EgressGuard("elevenlabs", api.url, audio_path="/text-to-speech/")
        async with guard.client() as http:
            with pytest.raises(ConnectorError, match="not audio") as info:
                await http.post(f"{api.url}/v1/user?/stream", json={"text": "hi"})
            assert MARKER not in str(info.value)
            assert (await http.get(f"{api.url}/v1/voices/abc")).status_code == 200  # probes


@pytest.mark.parametrize("content_type", ["audio/pcm", "application/octet-stream", "audio/x-wav"])
async def test_audio_answers_still_play(content_type: str) -> None:
    pcm = bytes(3200)
    async with RawServer(lambda head: http_response(200, pcm, content_type)) as provider:
        conn = connector("tts.azure", provider.url)
        try:
            chunks = await use(conn)
        finally:
            await conn.aclose()
    assert b"".join(chunks) == pcm


# --- push time ---------------------------------------------------------------------------------


def with_llm(agent_json: dict, options: dict[str, Any], name: str = "openai") -> dict:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = {"primary": name, "config": {name: options}}
    return data


def with_tts(agent_json: dict, options: dict[str, Any], name: str = "azure") -> dict:
    data = copy.deepcopy(agent_json)
    data["connectors"]["tts"] = {"primary": name, "config": {name: options}}
    return data


def issue_paths(exc: ConfigValidationError) -> dict[str, str]:
    return {i.path: i.msg for i in exc.issues}


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    svc = TransportService(settings.model_copy(update={"api_keys": (SecretStr(API_KEY),)}))
    await svc.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(svc)),
            base_url="http://t",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as client:
            yield client
    finally:
        await svc.stop()


async def test_base_url_off_the_allow_list_is_a_422_naming_the_path(
    api: httpx.AsyncClient, agent_json: dict
) -> None:
    path = "config.connectors.llm.config.openai.base_url"  # the request body's "config"
    for url in (
        "https://evil.example/v1",
        "https://api.openai.com.evil.example/v1",
        "https://api.openai.com:8443/v1",
        "http://api.openai.com/v1",
        "https://user:hunter2-secret@api.openai.com/v1",
    ):
        config = with_llm(
            agent_json, {"model": "m", "base_url": url, "api_key": "${OPENAI_API_KEY}"}
        )
        r = await api.post("/api/sessions", json={"config": config})
        assert r.status_code == 422, (url, r.text)
        detail = {d["path"]: d["msg"] for d in r.json()["detail"]}
        assert path in detail, (url, detail)
        assert "hunter2-secret" not in r.text and PROVIDER_KEY not in r.text
        r = await api.post("/api/agents", json={"name": "evil", "config": config})
        assert r.status_code == 422 and path in r.text
    assert (await api.get("/api/sessions")).json()["sessions"] == []
    # the official host is fine, and the service goes on serving
    ok = with_llm(
        agent_json,
        {"model": "m", "base_url": "https://api.openai.com/v1", "api_key": "${OPENAI_API_KEY}"},
    )
    r = await api.post("/api/sessions", json={"config": ok})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    patch = {"connectors": {"llm": {"config": {"openai": {"base_url": "https://evil.example"}}}}}
    r = await api.patch(f"/api/sessions/{sid}/config", json=patch)
    assert r.status_code == 422 and "connectors.llm.config.openai.base_url" in r.text


def test_azure_region_is_a_region_name(agent_json: dict) -> None:
    for region in ("evil.example/x?", "evil.example", "west europe", "WestEurope", "x", "a" * 40):
        config = with_tts(agent_json, {"api_key": "${AZURE_SPEECH_KEY}", "region": region})
        with pytest.raises(ConfigValidationError) as info:
            parse_agent_config(config)
        assert "connectors.tts.config.azure.region" in issue_paths(info.value), region
    ok = with_tts(agent_json, {"api_key": "${AZURE_SPEECH_KEY}", "region": "westeurope"})
    assert parse_agent_config(ok).options("tts", "azure").region == "westeurope"  # type: ignore[attr-defined]


async def test_azure_host_is_built_from_a_checked_region_only() -> None:
    from voicemesh.connectors.tts.azure import AzureTTS

    pool = ConnectorPool()
    with pytest.raises(EgressError, match="region"):
        await pool.get("tts", "azure", AzureTTSOptions(api_key="k", region="evil.example/x?"))
    assert AzureTTS(AzureTTSOptions(api_key="k", region="westeurope")).base_url == (
        "https://westeurope.tts.speech.microsoft.com"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://localhost:11434/v1",
        "https://10.1.2.3/v1",
        "https://100.64.0.1/v1",
        "https://[::1]:8000/v1",
        "https://[fd00::1]/v1",
        "https://[::ffff:127.0.0.1]/v1",
        "http://ollama.internal/v1",
    ],
)
def test_private_hosts_need_the_operator_setting(
    url: str, agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = with_llm(agent_json, {"model": "m", "base_url": url})
    with pytest.raises(ConfigValidationError, match="VOICEMESH_EGRESS_PRIVATE"):
        parse_agent_config(config)
    monkeypatch.setenv("VOICEMESH_EGRESS_PRIVATE", "on")
    parse_agent_config(config)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://[fe80::1]/v1",
        "http://0.0.0.0:8000/v1",
        "http://[::]:8000/v1",
        "http://[fd00:ec2::254]/latest",
        "http://2130706433/v1",
        "http://0177.0.0.1/v1",
        "http://0x7f.0.0.1/v1",
        "http://127.1/v1",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://instance-data.ec2.internal/latest",
        "http://metadata/v1",
    ],
)
def test_metadata_and_odd_ip_forms_are_refused_even_with_private_on(
    url: str, agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICEMESH_EGRESS_PRIVATE", "on")
    with pytest.raises(ConfigValidationError):
        parse_agent_config(with_llm(agent_json, {"model": "m", "base_url": url}))


def test_operator_hosts_extend_the_list_per_connector_and_stage(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    groq = {"model": "m", "base_url": "https://api.groq.com/openai/v1"}
    with pytest.raises(ConfigValidationError, match="VOICEMESH_EGRESS_HOSTS"):
        parse_agent_config(with_llm(agent_json, groq))
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "llm.openai:api.groq.com;deepgram:dg.example:8443")
    parse_agent_config(with_llm(agent_json, groq))
    # stage-scoped: the openai TTS may not use it
    with pytest.raises(ConfigValidationError, match=r"connectors\.tts\.config\.openai\.base_url"):
        parse_agent_config(with_tts(agent_json, {"base_url": groq["base_url"]}, "openai"))
    data = copy.deepcopy(agent_json)
    data["connectors"]["stt"] = {
        "primary": "deepgram",
        "config": {"deepgram": {"api_key": "${DEEPGRAM_API_KEY}", "base_url": ""}},
    }
    for url, ok in (("wss://dg.example:8443", True), ("wss://dg.example", False)):
        data["connectors"]["stt"]["config"]["deepgram"]["base_url"] = url
        if ok:
            parse_agent_config(data)
        else:
            with pytest.raises(ConfigValidationError):
                parse_agent_config(data)


@pytest.mark.parametrize(
    "value",
    [
        "nope:api.example.com",  # not a connector
        "stt.anthropic:api.example.com",  # anthropic has no stt
        "scripted:api.example.com",  # no endpoints
        "openai:",
        "openai:https://api.example.com",
        "openai:api.example.com:99999",
        "openai:2130706433",
    ],
)
def test_the_hosts_setting_is_checked(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", value)
    with pytest.raises(ValidationError, match="VOICEMESH_EGRESS_HOSTS"):
        Settings()


def test_daily_room_and_turn_hosts(agent_json: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def transport(options: dict[str, Any], name: str) -> dict:
        data = copy.deepcopy(agent_json)
        data["connectors"]["transport"] = {"primary": name, "config": {name: options}}
        return data

    parse_agent_config(transport({"room_url": "https://acme.daily.co/standup"}, "daily"))
    for bad in (
        "https://evil.example/room",
        "https://a.b.daily.co/r",
        "https://daily.co.evil.io/r",
    ):
        with pytest.raises(ConfigValidationError, match="room_url"):
            parse_agent_config(transport({"room_url": bad}, "daily"))
    parse_agent_config(transport({"ice_servers": ["stun:stun.l.google.com:19302"]}, "webrtc"))
    turn = {
        "ice_servers": ["turn:turn.example.com:3478?transport=udp"],
        "ice_username": "u",
        "ice_credential": "${TURN_CREDENTIAL}",
    }
    with pytest.raises(ConfigValidationError, match=r"ice_servers\[0\]"):
        parse_agent_config(transport(turn, "webrtc"))  # the credential would go to any host
    for bad in ("stun:169.254.169.254", "turn://x.example", "turn:u@x.example", "http://x.example"):
        with pytest.raises(ConfigValidationError, match=r"ice_servers\[0\]"):
            parse_agent_config(transport({"ice_servers": [bad]}, "webrtc"))
    monkeypatch.setenv("VOICEMESH_EGRESS_HOSTS", "webrtc:turn.example.com")
    parse_agent_config(transport(turn, "webrtc"))


# --- load from Valkey ----------------------------------------------------------------------------


async def test_a_config_written_to_valkey_directly_does_not_bypass_the_policy(
    settings: Settings,
    services: Services,
    store: ConfigStore,
    bus: Bus,
    subjects: Subjects,
    agent_json: dict,
    sink: RawServer,
) -> None:
    """Someone with Valkey access (or a config stored under an older rule) writes a session whose
    LLM points at a loopback host: the stage refuses the config on load and the host receives
    nothing; another session is served as before."""
    good = with_llm(agent_json, {"prefix": "E"}, "echo")
    good["connectors"]["tts"] = {"primary": "tone"}
    sid = (await store.create_session(parse_agent_config(good))).session_id
    raw = with_llm(
        agent_json, {"model": "m", "base_url": f"{sink.url}/v1", "api_key": "${OPENAI_API_KEY}"}
    )
    raw["connectors"]["tts"] = {"primary": "tone"}
    await store.client.hset(store.keys.session(sid), "config", orjson.dumps(raw))
    with pytest.raises(ConfigValidationError, match=r"connectors\.llm\.config\.openai\.base_url"):
        await store.get_config(sid)

    await services.start(LLMService)
    await services.start(TTSService)
    out = await listen(bus, subjects.data("transport", sid))
    await bus.publish(subjects.data("llm", sid), Frame.text("hello", epoch=1))
    await asyncio.sleep(1.0)
    assert sink.connections == 0, "the stage sent the turn to a host off the allow-list"

    other = (await store.create_session(parse_agent_config(good))).session_id
    out2 = await listen(bus, subjects.data("transport", other))
    await bus.publish(subjects.data("llm", other), Frame.text("hello", epoch=1))
    await out2.wait_for(
        lambda frames: any(f.kind is Kind.AUDIO and f.payload for f in frames), limit_s=10
    )
    assert not [f for f in out.frames if f.kind is Kind.AUDIO and f.payload]


# --- a provider's body never reaches the caller ------------------------------------------------


def leaky(status: int) -> Callable[[bytes], bytes]:
    """An error body quoting a marker and the request's own headers (as some servers do)."""

    def respond(head: bytes) -> bytes:
        body = orjson.dumps(
            {"error": {"message": f"{MARKER} {head.decode('latin-1')}", "type": "x", "code": "y"}}
        )
        return http_response(status, body, "application/json")

    return respond


@pytest.mark.parametrize("stage", ["llm", "tts"])
async def test_a_provider_error_body_reaches_neither_the_caller_nor_the_context(
    stage: str,
    services: Services,
    store: ConfigStore,
    bus: Bus,
    subjects: Subjects,
    agent_json: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("VOICEMESH_EGRESS_PRIVATE", "on")
    async with RawServer(leaky(401)) as provider:
        data = copy.deepcopy(agent_json)
        if stage == "llm":
            data["connectors"]["llm"] = {
                "primary": "openai",
                "config": {
                    "openai": {
                        "model": "m",
                        "base_url": f"{provider.url}/v1",
                        "api_key": "${OPENAI_API_KEY}",
                    }
                },
            }
            data["connectors"]["tts"] = {"primary": "tone"}
        else:
            data["connectors"]["llm"] = {
                "primary": "scripted",
                "config": {"scripted": {"replies": ["Hello there."]}},
            }
            data["connectors"]["tts"] = {
                "primary": "openai",
                "config": {
                    "openai": {"base_url": f"{provider.url}/v1", "api_key": "${OPENAI_API_KEY}"}
                },
            }
        sid = (await store.create_session(parse_agent_config(data))).session_id
        await services.start(LLMService)
        await services.start(TTSService)
        out: Inbox = await listen(bus, subjects.data("transport", sid))
        await bus.publish(subjects.data("llm", sid), Frame.text("hello", epoch=1))

        def errors(frames: list[Frame]) -> list[dict[str, Any]]:
            events = [f.as_event for f in frames if f.kind is Kind.EVENT]
            return [e for e in events if e.get("type") == "error"]

        await out.wait_for(lambda frames: bool(errors(frames)), limit_s=15)
        assert provider.requests, "the provider was never asked"
        (event,) = errors(out.frames)
        assert event["code"] == "CONNECTOR_PERMANENT_3004" and event["stage"] == stage
        assert event["error"] == f"{stage} provider failed: openai: permanent, http 401"
        context = await store.get_context(sid)
        wire = orjson.dumps(context).decode() + orjson.dumps(event).decode()
        assert MARKER not in wire and PROVIDER_KEY not in wire
        # the details are in the stage's log, without the key (the body echoed the header)
        await until(lambda: MARKER in caplog.text, what="the failure logged")
        assert PROVIDER_KEY not in caplog.text


def test_caller_error_texts_are_generic() -> None:
    err = ConnectorError(FailureKind.PERMANENT, f"Azure TTS: {MARKER}", status=401)
    failed = AllConnectorsFailed("tts", [("azure", err)])
    assert caller_error("tts", failed) == (
        "tts provider failed: azure: permanent, http 401",
        "CONNECTOR_PERMANENT_3004",
    )
    assert MARKER in str(failed)  # the logs keep the detail
    assert caller_error("llm", RuntimeError(MARKER)) == (
        "llm failed (see the stage's logs)",
        "STAGE_INTERNAL_3100",
    )
    assert MARKER not in str(err.to_dict())  # what the health board publishes
    scrubbed = ConnectorError(
        FailureKind.PERMANENT, f"headers {{'Authorization': 'Bearer {PROVIDER_KEY}'}} " + "x" * 900
    )
    assert PROVIDER_KEY not in str(scrubbed) and len(str(scrubbed)) < 400


# --- every egress field is declared ------------------------------------------------------------


def test_every_endpoint_option_is_declared() -> None:
    from voicemesh.config.connectors import CONNECTOR_OPTIONS

    endpointish = re.compile(r"(url|host|region|endpoint|ice_servers|server)s?$")
    for stage, models in CONNECTOR_OPTIONS.items():
        for name, model in models.items():
            for field in model.model_fields:
                if endpointish.search(field):
                    assert field in egress_fields(model), f"{stage}.{name}.{field}"


# --- fuzz: URLs of every shape -------------------------------------------------------------------

ALLOWED = {"api.openai.com"}
HOSTS = [
    "api.openai.com",
    "API.OpenAI.com",
    "api.openai.com.",
    "api.openai.com..",
    "api.openai.com.evil.example",
    "evil.example",
    "evil.example\\@api.openai.com",
    "api.openai.com\\@evil.example",
    "api.openai.com%2eevil.example",
    "%61pi.openai.com",
    "аpi.openai.com",  # Cyrillic а
    "api。openai。com",
    "ａｐｉ.openai.com",
    "xn--pi-7kc.openai.com",
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "[::1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[fe80::1%25eth0]",
    "169.254.169.254",
    "[fd00:ec2::254]",
    "10.0.0.1",
    "8.8.8.8",
    "localhost",
    "api.openai.com@evil.example",
    "evil.example#@api.openai.com",
    "evil.example?@api.openai.com",
    "",
]
SCHEMES = ["https", "HTTPS", "http", "wss", "ws", "ftp", "file", "javascript", "", "https:"]
PORTS = ["", ":443", ":8443", ":0", ":65536", ":+443", ": 443", ":443:", ":", ":0443", ":१२"]
USERINFO = ["", "user@", "user:pw@", "@", ":@", "api.openai.com@", "%40@"]
PATHS = ["", "/", "/v1", "/v1?x=1", "/v1#frag", "/v1/../..", "/%2e%2e/", "/\\evil", "/v1 x", "/é"]

url_parts = st.tuples(
    st.sampled_from(SCHEMES),
    st.sampled_from(["://", ":/", ":\\\\", ":///", "//"]),
    st.sampled_from(USERINFO),
    st.one_of(st.sampled_from(HOSTS), st.text(max_size=30)),
    st.sampled_from(PORTS),
    st.one_of(st.sampled_from(PATHS), st.text(max_size=40)),
).map(lambda p: "".join(p))
urls = st.one_of(
    url_parts,
    st.text(max_size=80),
    st.builds(lambda n: "https://api.openai.com/" + "a" * n, st.integers(2000, 5000)),
)


def accepted_host(url: str) -> tuple[str, int | None, str]:
    """Where a client would connect for an accepted URL: httpx's reading and urllib's must
    agree on it."""
    parsed = httpx.URL(url)
    split = urlsplit(url)
    assert parsed.host == (split.hostname or "").encode("idna").decode(), url
    return parsed.host, parsed.port, parsed.scheme


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls, private=st.booleans())
def test_fuzz_every_accepted_url_is_on_the_allow_list(url: str, private: bool) -> None:
    policy = EgressPolicy(private=private)
    problem = url_problem(url, "llm", "openai", ("https",), policy)
    if problem is not None:
        assert PROVIDER_KEY not in problem
        return
    host, port, scheme = accepted_host(url)
    if host in ALLOWED:
        assert scheme == "https" and port in (None, 443), url
        return
    assert private, f"accepted off the list with private off: {url!r}"
    ip = ipaddress.ip_address(host.strip("[]")) if host[:1].isdigit() or ":" in host else None
    assert (
        host == "localhost"
        or host.endswith((".local", ".internal", ".localhost"))
        or (
            ip is not None
            and (ip.is_private or ip.is_loopback or ip in ipaddress.ip_network("100.64.0.0/10"))
        )
    ), url
    assert ip is None or not ip.is_link_local, url


FLOW = [
    {"from": "transport", "to": "stt", "stream": "audio"},
    {"from": "stt", "to": "llm", "stream": "text"},
    {"from": "llm", "to": "tts", "stream": "text"},
    {"from": "tts", "to": "transport", "stream": "audio"},
]
CLOUD_OPTIONS = [
    ("llm", "openai", {"model": "m"}),
    ("llm", "anthropic", {"model": "m", "api_key": "${ANTHROPIC_API_KEY}"}),
    ("tts", "openai", {}),
    ("tts", "elevenlabs", {"voice_id": "v", "api_key": "${ELEVENLABS_API_KEY}"}),
    ("tts", "azure", {"api_key": "${AZURE_SPEECH_KEY}"}),
    ("stt", "openai", {}),
    ("stt", "deepgram", {"api_key": "${DEEPGRAM_API_KEY}"}),
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls)
def test_fuzz_pushed_configs_never_keep_a_url_off_the_list(url: str) -> None:
    """The same through the whole config validation (what the API and the stages run), for the
    base_url of every cloud connector: a config that validates names an official host."""
    for stage, name, extra in CLOUD_OPTIONS:
        connectors: dict[str, Any] = {
            "stt": {"primary": "passthrough"},
            "llm": {"primary": "echo"},
            "tts": {"primary": "tone"},
        }
        connectors[stage] = {"primary": name, "config": {name: {**extra, "base_url": url}}}
        data = {"pipeline": {"name": "p", "flow": FLOW}, "connectors": connectors}
        try:
            parse_agent_config(data)
        except ConfigValidationError as exc:
            assert f"connectors.{stage}.config.{name}.base_url" in issue_paths(exc), url
            continue
        host, port, _ = accepted_host(url)
        rules = EgressPolicy().rules(stage, name)
        assert any(r.host == host for r in rules) and port in (None, 443), (stage, name, url)
