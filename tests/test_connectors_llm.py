"""The cloud LLM connectors (OpenAI, Anthropic) on their real SDKs, over HTTP to loopback servers
that speak each provider's wire protocol: streaming, resuming a reply, every failure mode and its
classification, probes, ${ENV} secrets, and failover between the two through the fallback chain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from voicemesh.config import parse_agent_config
from voicemesh.config.connectors import AnthropicOptions, OpenAILLMOptions
from voicemesh.config.models import AgentConfig
from voicemesh.config.secrets import SecretResolutionError
from voicemesh.connectors.base import NO_KEY, LLMConnector
from voicemesh.connectors.errors import ConnectorError, FailureKind, classify
from voicemesh.connectors.fallback import AllConnectorsFailed, Chain
from voicemesh.connectors.llm.anthropic import AnthropicLLM
from voicemesh.connectors.llm.openai import OpenAILLM
from voicemesh.connectors.registry import ConnectorPool
from voicemesh.pipeline.llm import continue_reply
from voicemesh.servers import free_port
from voicemesh.testing.loopback.anthropic import AnthropicServer
from voicemesh.testing.loopback.openai_chat import OpenAIChatServer

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the test's own variable names in these connectors' credentials."""
    monkeypatch.setenv(
        "VOICEMESH_SECRET_ENV",
        "llm.openai:TEST_LLM_KEY,TEST_OPENAI_KEY,TEST_MISSING_KEY;llm.anthropic:TEST_LLM_KEY,TEST_ANTHROPIC_KEY,TEST_MISSING_KEY",
    )


@pytest.fixture(autouse=True)
def _short_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests time out hung providers through a Chain quickly, including the last one of
    the order, which in production waits up to fallback.LAST_RESORT_S."""
    monkeypatch.setattr("voicemesh.connectors.fallback.LAST_RESORT_S", 0.0)


REPLY = "The quick brown fox jumps over the lazy dog near the river bank."
PARTIAL = "The quick brown"  # what three one-word chunks of REPLY deliver
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about the fox."},
]
OPENAI_KEY = "sk-test-openai-9f8e7d6c5b4a"
ANTHROPIC_KEY = "sk-ant-test-1a2b3c4d5e6f"

Server = OpenAIChatServer | AnthropicServer


@dataclass
class Rig:
    name: str
    server: Server
    conn: LLMConnector

    def options(self, api_key: str) -> dict[str, Any]:
        """This connector's options in an agent config, pointed at the loopback server."""
        if self.name == "openai":
            return {"model": "gpt-test", "base_url": f"{self.server.url}/v1", "api_key": api_key}
        return {"model": "claude-test", "base_url": self.server.url, "api_key": api_key}


def make_server(name: str, **kwargs: Any) -> Server:
    return (
        OpenAIChatServer([REPLY], **kwargs)
        if name == "openai"
        else AnthropicServer([REPLY], **kwargs)
    )


def make_conn(name: str, server: Server, api_key: str | None = "k") -> LLMConnector:
    if name == "openai":
        return OpenAILLM(
            OpenAILLMOptions(model="gpt-test", base_url=f"{server.url}/v1", api_key=api_key)
        )
    return AnthropicLLM(
        AnthropicOptions(model="claude-test", base_url=server.url, api_key=api_key or "k")
    )


@pytest.fixture(params=["openai", "anthropic"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    name = request.param
    async with make_server(name) as server:
        conn = make_conn(name, server)  # type: ignore[arg-type]
        await conn.warmup()
        yield Rig(name, server, conn)  # type: ignore[arg-type]
        await conn.aclose()


async def collect(stream: AsyncIterator[str]) -> tuple[list[str], BaseException | None]:
    pieces: list[str] = []
    try:
        async for piece in stream:
            pieces.append(piece)
    except Exception as exc:
        return pieces, exc
    return pieces, None


def agent(llm: dict[str, Any]) -> AgentConfig:
    return parse_agent_config(
        {
            "pipeline": {
                "name": "llm-test",
                "flow": [
                    {"from": "transport", "to": "stt", "stream": "audio"},
                    {"from": "stt", "to": "llm", "stream": "text"},
                    {"from": "llm", "to": "tts", "stream": "text"},
                    {"from": "tts", "to": "transport", "stream": "audio"},
                ],
            },
            "connectors": {
                "stt": {"primary": "whisper"},
                "llm": llm,
                "tts": {"primary": "tone"},
            },
        }
    )


# --- streaming and resuming --------------------------------------------------------------------


async def test_streams_the_reply_in_pieces(rig: Rig) -> None:
    pieces, exc = await collect(rig.conn.stream(MESSAGES))
    assert exc is None
    assert "".join(pieces) == REPLY
    assert len(pieces) == len(REPLY.split())
    sent = rig.server.last_request
    assert sent is not None and sent["stream"] is True
    if rig.name == "openai":
        assert sent["model"] == "gpt-test"
        assert sent["messages"] == MESSAGES
    else:
        assert sent["model"] == "claude-test"
        assert sent["system"] == "Be brief."
        assert sent["messages"] == [MESSAGES[1]]  # the system prompt is not a message
        assert sent["max_tokens"] == 512


@pytest.mark.parametrize("partial", [PARTIAL, PARTIAL + " "])
async def test_continues_after_a_partial_reply(rig: Rig, partial: str) -> None:
    resumed = [*MESSAGES, {"role": "assistant", "content": partial}]
    pieces, exc = await collect(rig.conn.stream(resumed))
    assert exc is None
    assert partial + "".join(pieces) == REPLY
    sent = rig.server.last_request
    assert sent is not None
    if rig.name == "openai":  # the trailing assistant message goes as is
        assert sent["messages"][-1] == {"role": "assistant", "content": partial}
    else:  # a prefill, without the trailing whitespace Anthropic rejects
        assert sent["messages"][-1] == {"role": "assistant", "content": PARTIAL}


async def test_continue_reply_resumes_without_repeating(rig: Rig) -> None:
    delivered = ["The", " quick", " brown"]
    pieces, exc = await collect(continue_reply(rig.conn, MESSAGES, delivered))
    assert exc is None
    assert "".join(delivered + pieces) == REPLY


def test_anthropic_messages_are_reshaped() -> None:
    from voicemesh.connectors.llm.anthropic import to_anthropic

    system, turns, cut = to_anthropic(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "assistant", "content": "an answer whose question was cut off"},
            {"role": "user", "content": "one"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "So far \n"},
        ]
    )
    assert system == "Be brief."
    assert turns == [
        {"role": "user", "content": "one\n\ntwo"},
        {"role": "assistant", "content": "So far"},
    ]
    assert cut


# --- failures and their classification -------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("500", FailureKind.SERVER),
        ("error", FailureKind.SERVER),
        ("429", FailureKind.RATE_LIMIT),
        ("401", FailureKind.PERMANENT),
    ],
)
async def test_http_failures_are_classified(rig: Rig, mode: str, kind: FailureKind) -> None:
    rig.server.fail(mode, times=1)  # type: ignore[arg-type]
    pieces, exc = await collect(rig.conn.stream(MESSAGES))
    assert pieces == []
    assert isinstance(exc, ConnectorError)
    err = classify(exc, started=False)
    assert err.kind is kind
    expected_status = {"500": 500, "429": 429, "401": 401}.get(mode)
    if mode == "error":  # OpenAI: 500 server_error; Anthropic: 529 overloaded_error
        expected_status = 500 if rig.name == "openai" else 529
    assert err.status == expected_status
    if mode == "429":
        assert err.retry_after_s == 2.0
    assert err.retryable is (kind is not FailureKind.PERMANENT)
    assert rig.name in str(err)  # the provider's own error text comes along
    # healed after one failure: the next request streams normally
    pieces, exc = await collect(rig.conn.stream(MESSAGES))
    assert exc is None and "".join(pieces) == REPLY


@pytest.mark.parametrize("how", ["cut", "clean", "error_event"])
async def test_a_stream_that_dies_is_a_stream_failure(rig: Rig, how: str) -> None:
    rig.server.die_how = how  # type: ignore[assignment]
    rig.server.fail("die", after=3, times=1)
    pieces, exc = await collect(rig.conn.stream(MESSAGES))
    assert "".join(pieces) == PARTIAL
    assert isinstance(exc, ConnectorError)
    assert exc.kind is not FailureKind.PERMANENT
    assert classify(exc, started=True).kind is FailureKind.STREAM


async def test_connection_refused_is_a_network_failure() -> None:
    port = free_port()
    for conn in (
        OpenAILLM(OpenAILLMOptions(model="m", base_url=f"http://127.0.0.1:{port}/v1")),
        AnthropicLLM(AnthropicOptions(model="m", base_url=f"http://127.0.0.1:{port}", api_key="k")),
    ):
        pieces, exc = await collect(conn.stream(MESSAGES))
        await conn.aclose()
        assert pieces == [] and isinstance(exc, Exception)
        assert classify(exc).kind is FailureKind.NETWORK, exc


async def test_a_hang_times_out_through_the_chain(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", "k")
    config = agent(
        {
            "primary": rig.name,
            "attempt_timeout_ms": 300,
            "config": {rig.name: rig.options("${TEST_LLM_KEY}")},
        }
    )
    rig.server.fail("hang")
    pool = ConnectorPool()
    chain = Chain(pool, config, "llm", health=None)
    t0 = time.perf_counter()
    with pytest.raises(AllConnectorsFailed):
        async for _ in chain.stream(lambda c, done: continue_reply(c, MESSAGES, done)):
            pass
    assert time.perf_counter() - t0 < 2
    assert [(n, e.kind) for n, e in chain.failures] == [(rig.name, FailureKind.TIMEOUT)]
    await pool.aclose()


# --- probes ----------------------------------------------------------------------------------


async def test_probe(rig: Rig) -> None:
    assert rig.conn.can_probe
    await rig.conn.probe()
    for mode, kind in [
        ("500", FailureKind.SERVER),
        ("429", FailureKind.RATE_LIMIT),
        ("401", FailureKind.PERMANENT),
    ]:
        rig.server.fail(mode, times=1)  # type: ignore[arg-type]
        with pytest.raises(ConnectorError) as info:
            await rig.conn.probe()
        assert classify(info.value).kind is kind
    rig.server.fail("hang")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await rig.conn.probe()
    rig.server.heal()
    await rig.conn.probe()


# --- secrets -----------------------------------------------------------------------------------


async def test_openai_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", OPENAI_KEY)
    async with OpenAIChatServer([REPLY], api_key=OPENAI_KEY) as server:
        pool = ConnectorPool()
        options = OpenAILLMOptions(
            model="gpt-test", base_url=f"{server.url}/v1", api_key="${TEST_OPENAI_KEY}"
        )
        conn = await pool.get("llm", "openai", options)
        assert isinstance(conn, OpenAILLM)
        pieces, exc = await collect(conn.stream(MESSAGES))
        assert exc is None and "".join(pieces) == REPLY
        assert server.last_headers["authorization"] == f"Bearer {OPENAI_KEY}"
        assert options.api_key == "${TEST_OPENAI_KEY}"  # the config keeps the reference
        server.fail("401", times=1)
        _, exc = await collect(conn.stream(MESSAGES))
        assert isinstance(exc, ConnectorError) and OPENAI_KEY not in str(exc)
        await pool.aclose()


async def test_anthropic_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    async with AnthropicServer([REPLY], api_key=ANTHROPIC_KEY) as server:
        pool = ConnectorPool()
        options = AnthropicOptions(
            model="claude-test", base_url=server.url, api_key="${TEST_ANTHROPIC_KEY}"
        )
        conn = await pool.get("llm", "anthropic", options)
        assert isinstance(conn, AnthropicLLM)
        pieces, exc = await collect(conn.stream(MESSAGES))
        assert exc is None and "".join(pieces) == REPLY
        # anthropic SDK 2.x sends an api_key as a bearer token; 0.x sent it as x-api-key
        assert ANTHROPIC_KEY in (
            server.last_headers.get("x-api-key"),
            server.last_headers.get("authorization", "").removeprefix("Bearer "),
        )
        assert options.api_key == "${TEST_ANTHROPIC_KEY}"
        server.fail("401", times=1)
        _, exc = await collect(conn.stream(MESSAGES))
        assert isinstance(exc, ConnectorError) and ANTHROPIC_KEY not in str(exc)
        await pool.aclose()


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_a_missing_secret_fails_to_build(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_MISSING_KEY", raising=False)
    options = (
        OpenAILLMOptions(model="m", base_url="http://127.0.0.1:9/v1", api_key="${TEST_MISSING_KEY}")
        if name == "openai"
        else AnthropicOptions(
            model="m", base_url="http://127.0.0.1:9", api_key="${TEST_MISSING_KEY}"
        )
    )
    pool = ConnectorPool()
    with pytest.raises(LookupError) as info:
        await pool.get("llm", name, options)
    assert isinstance(info.value, SecretResolutionError)
    assert "TEST_MISSING_KEY" in str(info.value)
    assert classify(info.value).kind is FailureKind.PERMANENT


async def test_openai_without_a_key_never_sends_the_process_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local server needs no key; the SDK must not fall back to this host's OPENAI_API_KEY."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host-key-that-must-not-leak")
    async with OpenAIChatServer([REPLY]) as server:
        conn = make_conn("openai", server, api_key=None)
        pieces, exc = await collect(conn.stream(MESSAGES))
        await conn.aclose()
        assert exc is None and "".join(pieces) == REPLY
        assert server.last_headers["authorization"] == f"Bearer {NO_KEY}"  # not the host key


# --- failover through the chain ----------------------------------------------------------------


@dataclass
class Pair:
    primary: Server
    fallback: Server
    config: AgentConfig


async def failover(pair: Pair) -> tuple[Chain, list[tuple[str, str]], BaseException | None]:
    pool = ConnectorPool()
    chain = Chain(pool, pair.config, "llm", health=None)
    got: list[tuple[str, str]] = []
    error: BaseException | None = None
    try:
        async for conn, piece in chain.stream(lambda c, done: continue_reply(c, MESSAGES, done)):
            got.append((conn.name, piece))
    except Exception as exc:
        error = exc
    await pool.aclose()
    return chain, got, error


def pair_config(
    first: str, primary: Server, second: str, fallback: Server, timeout_ms: int = 5000
) -> AgentConfig:
    urls = {first: primary.url, second: fallback.url}
    options = {
        "openai": {
            "model": "gpt-test",
            "base_url": f"{urls.get('openai')}/v1",
            "api_key": "${TEST_OPENAI_KEY}",
        },
        "anthropic": {
            "model": "claude-test",
            "base_url": urls.get("anthropic"),
            "api_key": "${TEST_ANTHROPIC_KEY}",
        },
    }
    return agent(
        {
            "primary": first,
            "fallback": [second],
            # Unless a test makes the primary hang, the first-result deadline only has to
            # outlast a cold SDK client on a loaded CI machine (300 ms did not, once).
            "attempt_timeout_ms": timeout_ms,
            "config": {first: options[first], second: options[second]},
        }
    )


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", OPENAI_KEY)
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("error", FailureKind.SERVER),
        ("500", FailureKind.SERVER),
        ("429", FailureKind.RATE_LIMIT),
        ("401", FailureKind.PERMANENT),
        ("hang", FailureKind.TIMEOUT),
    ],
)
async def test_openai_fails_over_to_anthropic(mode: str, kind: FailureKind) -> None:
    async with (
        OpenAIChatServer([REPLY], api_key=OPENAI_KEY) as a,
        AnthropicServer([REPLY], api_key=ANTHROPIC_KEY) as b,
    ):
        a.fail(mode)  # type: ignore[arg-type]
        timeout_ms = 1000 if mode == "hang" else 5000
        pair = Pair(a, b, pair_config("openai", a, "anthropic", b, timeout_ms))
        t0 = time.perf_counter()
        chain, got, error = await failover(pair)
        assert error is None
        assert "".join(p for _, p in got) == REPLY
        assert {n for n, _ in got} == {"anthropic"}
        assert [(n, e.kind) for n, e in chain.failures] == [("openai", kind)]
        # A hang costs one deadline, not the SDK's own minutes-long timeout.
        assert time.perf_counter() - t0 < timeout_ms / 1000 + 3


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize("how", ["cut", "clean", "error_event"])
@pytest.mark.parametrize("space_after", [False, True])
async def test_a_reply_that_dies_is_finished_by_the_fallback_exactly_once(
    how: str, space_after: bool
) -> None:
    async with (
        OpenAIChatServer([REPLY], space_after=space_after, die_how=how) as a,  # type: ignore[arg-type]
        AnthropicServer([REPLY], api_key=ANTHROPIC_KEY) as b,
    ):
        a.fail("die", after=3)
        chain, got, error = await failover(Pair(a, b, pair_config("openai", a, "anthropic", b)))
        assert error is None
        text = "".join(p for _, p in got)
        assert text == REPLY  # no word lost, none repeated
        assert [n for n, _ in got[:3]] == ["openai"] * 3
        assert {n for n, _ in got[3:]} == {"anthropic"}
        assert [(n, e.kind) for n, e in chain.failures] == [("openai", FailureKind.STREAM)]
        assert b.last_request is not None
        assert b.last_request["messages"][-1] == {"role": "assistant", "content": PARTIAL}


@pytest.mark.usefixtures("keys")
async def test_anthropic_dies_and_openai_continues_the_reply() -> None:
    async with (
        AnthropicServer([REPLY], api_key=ANTHROPIC_KEY) as a,
        OpenAIChatServer([REPLY], api_key=OPENAI_KEY) as b,
    ):
        a.fail("die", after=3)
        chain, got, error = await failover(Pair(a, b, pair_config("anthropic", a, "openai", b)))
        assert error is None
        assert "".join(p for _, p in got) == REPLY
        assert [(n, e.kind) for n, e in chain.failures] == [("anthropic", FailureKind.STREAM)]
        assert b.last_request is not None
        assert b.last_request["messages"][-1] == {"role": "assistant", "content": PARTIAL}


@pytest.mark.usefixtures("keys")
async def test_every_connector_failing_is_reported() -> None:
    async with OpenAIChatServer([REPLY]) as a, AnthropicServer([REPLY]) as b:
        a.fail("500")
        b.fail("401")
        _, got, error = await failover(Pair(a, b, pair_config("openai", a, "anthropic", b)))
        assert got == []
        assert isinstance(error, AllConnectorsFailed)
        assert [(n, e.kind) for n, e in error.errors] == [
            ("openai", FailureKind.SERVER),
            ("anthropic", FailureKind.PERMANENT),
        ]
        assert ANTHROPIC_KEY not in str(error) and OPENAI_KEY not in str(error)
