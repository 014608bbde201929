"""Limits on what a config can make a stage hold (issue 12, item 5, the config and stage side):
caps on every string and list option, a maximum reply length per turn, a few allowed context sizes
with thread counts that load no extra model, and a bounded connector pool whose evicted
connectors stop their health probes. Each limit is hit here, and the stage goes on serving.
"""

from __future__ import annotations

import asyncio
import copy
import types
import typing
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import annotated_types as at
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.support import Services, has_last, listen, scripted, until
from voicemesh.bus import Bus, Frame, Kind, Subjects
from voicemesh.config import limits
from voicemesh.config.connectors import CONNECTOR_OPTIONS, SmolLM2Options, WhisperOptions
from voicemesh.config.models import (
    AgentConfig,
    FlowEdge,
    PipelineSpec,
    StageConnectors,
    parse_agent_config,
)
from voicemesh.config.secrets import credential_fields
from voicemesh.config.settings import Settings
from voicemesh.connectors.health import fingerprint
from voicemesh.connectors.registry import ConnectorPool
from voicemesh.connectors.threads import clamp_threads, usable_cores
from voicemesh.pipeline import LLMService
from voicemesh.pipeline.llm import REPLY_TRUNCATED
from voicemesh.state import ConfigStore
from voicemesh.transport.api.app import create_app
from voicemesh.transport.api.service import TransportService

# --- caps on every string and list option --------------------------------------------------

#: longer than every string cap (the system prompt's is the largest), short enough that a body
#: carrying it stays far under any HTTP body limit: the cap, not the transport, must refuse it
HUGE_CHARS = limits.PROMPT_MAX_CHARS + 1
HUGE_ITEMS = 1_000


def _unwrap(annotation: Any) -> Any:
    """The annotation without `| None` and Annotated."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _capped(annotation: Any, metadata: list[Any]) -> bool:
    if any(isinstance(m, at.MaxLen) for m in metadata):
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        for extra in typing.get_args(annotation)[1:]:
            if any(isinstance(m, at.MaxLen) for m in getattr(extra, "metadata", [extra])):
                return True
    return False


Kind_ = Literal["str", "list", "dict"]


def sized_fields(model: type[BaseModel]) -> Iterator[tuple[str, Kind_, bool]]:
    """(field, kind, capped) for every field of `model` that holds a string, a list or a dict
    (a Literal is bounded by its choices; numbers and booleans have no length)."""
    for name, info in model.model_fields.items():
        bare = _unwrap(info.annotation)
        origin = typing.get_origin(bare)
        if origin is Literal or bare in (bool, int, float) or isinstance(bare, type(BaseModel)):
            continue
        kind: Kind_ | None = (
            "str"
            if bare is str
            else "list"
            if origin is list
            else "dict"
            if origin is dict
            else None
        )
        if kind is None:
            continue
        yield name, kind, _capped(info.annotation, list(info.metadata))
        if kind == "list":  # and each item
            (item,) = typing.get_args(bare)
            if _unwrap(item) is str:
                yield f"{name}[]", "str", _capped(item, [])


CONFIG_MODELS: list[type[BaseModel]] = [AgentConfig, PipelineSpec, StageConnectors, FlowEdge]
OPTION_MODELS = [
    (stage, name, m) for stage, ms in CONNECTOR_OPTIONS.items() for name, m in ms.items()
]


def test_every_string_and_list_option_has_a_cap() -> None:
    """Attack: a config of megabytes (a 20 MB prompt, a million replies) stored and served."""
    uncapped = [
        f"{model.__name__}.{field}"
        for model in [*CONFIG_MODELS, *(m for _, _, m in OPTION_MODELS)]
        for field, _, capped in sized_fields(model)
        if not capped
    ]
    assert not uncapped, f"fields with no length cap: {uncapped}"


def test_the_caps_are_in_the_json_schema() -> None:
    from voicemesh.config.models import agent_config_schema

    schema = agent_config_schema()
    assert schema["properties"]["system_prompt"]["maxLength"] == limits.PROMPT_MAX_CHARS
    replies = schema["$defs"]["ScriptedOptions"]["properties"]["replies"]
    assert replies["maxItems"] == limits.REPLIES_MAX
    assert replies["items"]["maxLength"] == limits.REPLY_MAX_CHARS
    n_ctx = schema["$defs"]["SmolLM2Options"]["properties"]["n_ctx"]
    assert n_ctx["enum"] == [512, 1024, 2048, 4096, 8192]


def _required_options(model: type[BaseModel]) -> dict[str, Any]:
    """The least options that validate: a required field gets a short value."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.is_required():
            spec = credential_fields(model).get(name)
            bare = _unwrap(info.annotation)
            out[name] = f"${{{spec.env[0]}}}" if spec else (["hi"] if bare is not str else "m")
    return out


def _huge(kind: Kind_, over: int) -> Any:
    if kind == "str":
        return "a" * (HUGE_CHARS + over)
    if kind == "list":
        return ["a"] * (HUGE_ITEMS + over)
    return {f"k{i}": {} for i in range(HUGE_ITEMS + over)}


Target = tuple[tuple[str | int, ...], str, Kind_]


def targets(agent: dict[str, Any]) -> list[Target]:
    """Every sized field of every config model, as (JSON path to set, field, kind)."""
    out: list[Target] = []
    where: dict[type[BaseModel], tuple[str | int, ...]] = {
        AgentConfig: (),
        PipelineSpec: ("pipeline",),
        StageConnectors: ("connectors", "llm"),
        FlowEdge: ("pipeline", "flow", 0),
    }
    aliases = {"source": "from", "target": "to"}
    for model, base in where.items():
        for field, kind, _ in sized_fields(model):
            key = aliases.get(field, field)
            out.append(((*base, key), key, kind))
    for stage, name, model in OPTION_MODELS:
        for field, kind, _ in sized_fields(model):
            out.append((("connectors", stage, "config", name, field), field, kind))
    # one connector's options object itself: a million unknown keys are one issue, not a million
    out.append((("connectors", "llm", "config", "echo"), "echo", "dict"))
    return out


def _place(agent: dict[str, Any], path: tuple[str | int, ...], kind: Kind_, over: int) -> str:
    """Set the huge value at `path` in `agent` (the connector's chain made to use it); returns
    the dotted path an issue about it must name."""
    data: Any = agent
    field = path[-1]
    item = isinstance(field, str) and field.endswith("[]")
    if path[:1] == ("connectors",) and len(path) == 5:
        stage, name = path[1], path[3]
        model = CONNECTOR_OPTIONS[str(stage)][str(name)]
        agent["connectors"][stage] = {
            "primary": name,
            "config": {name: _required_options(model)},
        }
    for part in path[:-1]:
        data = data.setdefault(part, {}) if isinstance(data, dict) else data[part]
    if item:
        key = str(field)[:-2]
        data[key] = [_huge("str", over)]
        return ".".join(str(p) for p in path[:-1]) + f".{key}[0]"
    data[field] = _huge(kind, over)
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    svc = TransportService(settings.model_copy(update={"auth": "off"}))
    await svc.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(svc)), base_url="http://t"
        ) as client:
            yield client
    finally:
        await svc.stop()


@pytest.fixture(scope="module")
def agent() -> dict[str, Any]:
    from tests.config_strategies import AGENT

    return AGENT


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_fuzz_huge_values_are_refused_with_their_path(
    api: httpx.AsyncClient, store: ConfigStore, agent: dict[str, Any], data: st.DataObject
) -> None:
    """Attack: huge values in any string, list or dict of a config are stored and then held,
    sent and synthesized by every stage. Each is a 422 naming the path; nothing is stored."""
    path, _, kind = data.draw(st.sampled_from(targets(agent)), label="target")
    over = data.draw(st.integers(0, 2_000), label="over")
    config = copy.deepcopy(agent)
    expected = _place(config, path, kind, over)
    as_session = data.draw(st.booleans(), label="as a session")
    before = (await api.get("/api/sessions")).json()
    if as_session:
        r = await api.post("/api/sessions", json={"config": config})
    else:
        r = await api.post("/api/agents", json={"name": "huge", "config": config})
    assert r.status_code == 422, (expected, r.status_code, r.text[:300])
    named = [d["path"] for d in r.json()["detail"]]
    assert any(p == f"config.{expected}" or p.startswith(f"config.{expected}") for p in named), (
        expected,
        named[:5],
    )
    assert len(r.content) < 200_000, "the error must not echo the huge value back many times"
    assert (await api.get("/api/agents/huge")).status_code == 404
    assert (await api.get("/api/sessions")).json() == before


async def test_every_sized_field_is_refused_when_huge(
    api: httpx.AsyncClient, agent: dict[str, Any]
) -> None:
    """The sweep behind the fuzz: each target once, so none is left to chance."""
    found = targets(agent)
    assert len(found) > 40
    for path, _, kind in found:
        config = copy.deepcopy(agent)
        expected = _place(config, path, kind, 0)
        r = await api.post("/api/sessions", json={"config": config})
        assert r.status_code == 422, (expected, r.status_code)
        named = [d["path"] for d in r.json()["detail"]]
        assert any(p.startswith(f"config.{expected}") for p in named), (expected, named[:5])


async def test_each_cap_holds_and_a_value_at_it_is_accepted(agent: dict[str, Any]) -> None:
    """The caps are generous: a value exactly at each of the main ones is a valid config."""
    config = copy.deepcopy(agent)
    config["system_prompt"] = "p" * limits.PROMPT_MAX_CHARS
    config["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {"scripted": {"replies": ["r" * limits.REPLY_MAX_CHARS] * limits.REPLIES_MAX}},
    }
    parse_agent_config(config)
    config["connectors"]["llm"]["config"]["scripted"]["replies"].append("one more")
    with pytest.raises(ValueError, match=r"connectors\.llm\.config\.scripted\.replies"):
        parse_agent_config(config)


# --- a few context sizes; threads clamped and not part of the model's key --------------------


async def test_n_ctx_outside_the_allowed_sizes_is_a_422(
    api: httpx.AsyncClient, agent: dict[str, Any]
) -> None:
    """Attack: each new n_ctx loads another model in every LLM stage that serves the config."""
    for n_ctx in (3000, 256, 16_384):
        config = copy.deepcopy(agent)
        config["connectors"]["llm"] = {
            "primary": "smollm2",
            "config": {"smollm2": {"n_ctx": n_ctx}},
        }
        r = await api.post("/api/sessions", json={"config": config})
        assert r.status_code == 422, r.text
        assert "config.connectors.llm.config.smollm2.n_ctx" in [
            d["path"] for d in r.json()["detail"]
        ]
    config["connectors"]["llm"]["config"]["smollm2"]["n_ctx"] = 1024
    assert (await api.post("/api/sessions", json={"config": config})).status_code == 201


def test_thread_counts_are_clamped_to_the_cores() -> None:
    cores = usable_cores()
    assert clamp_threads(64) == cores
    assert clamp_threads(1) == 1
    assert clamp_threads(0) == 1


async def test_two_thread_counts_share_one_loaded_llama_model() -> None:
    """Attack: a config per thread count makes the stage load a model copy each (1..64)."""
    pytest.importorskip("llama_cpp")
    from voicemesh.connectors.llm import smollm2

    one = smollm2.SmolLM2LLM(SmolLM2Options(threads=1, max_tokens=3, n_ctx=512))
    many = smollm2.SmolLM2LLM(SmolLM2Options(threads=64, max_tokens=3, n_ctx=512))
    await one.warmup()
    await many.warmup()
    assert smollm2._model(512) is smollm2._model(512)
    assert smollm2._model.cache_info().currsize == 1, "a thread count loaded its own model"
    messages = [{"role": "user", "content": "Say hi."}]
    for conn, threads in ((many, usable_cores()), (one, 1), (many, usable_cores())):
        said = "".join([piece async for piece in conn.stream(messages)])
        llm, _ = smollm2._model(512)
        assert llm.n_threads == threads and said
    smollm2._model.cache_clear()


async def test_two_thread_counts_share_one_loaded_whisper_model() -> None:
    pytest.importorskip("faster_whisper")
    from voicemesh.connectors.stt import whisper

    first = whisper.WhisperSTT(WhisperOptions(cpu_threads=1))
    second = whisper.WhisperSTT(WhisperOptions(cpu_threads=64))
    await first.warmup()
    await second.warmup()
    assert whisper._model("int8", 1) == whisper._model("int8", 64)
    assert list(whisper._models) == ["int8"]
    assert isinstance(await second.transcribe(b"\0\0" * 16000, 16000), str)


# --- a maximum reply length per turn --------------------------------------------------------


def _texts(frames: list[Frame], epoch: int) -> list[str]:
    return [f.as_text for f in frames if f.epoch == epoch and f.kind is Kind.TEXT and f.as_text]


def _warnings(frames: list[Frame]) -> list[dict[str, Any]]:
    return [
        e for f in frames if f.kind is Kind.EVENT for e in [f.as_event] if e["type"] == "warning"
    ]


async def test_a_runaway_reply_is_cut_and_the_stage_serves_the_next_session(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """Attack: a reply with no end (a model that runs on, or a long echo of a long turn) is
    spoken, sent and stored whole. It is cut at VOICEMESH_MAX_REPLY_CHARS: the turn ends
    normally, the context keeps the cut text, and the caller is told with a typed warning."""
    limit = 500
    echo = copy.deepcopy(agent_json)
    echo["connectors"]["llm"] = {"primary": "echo"}
    echo["connectors"]["tts"] = {"primary": "tone"}
    sid = (await store.create_session(parse_agent_config(echo))).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    side = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService, max_reply_chars=limit)

    turn = " ".join(f"word{i}" for i in range(20_000))  # ~150k characters, no end mark
    await bus.publish(subjects.data("llm", sid), Frame.text(turn, epoch=1))
    frames = await tts.wait_for(lambda fs: has_last(fs, 1), 10)
    spoken = " ".join(_texts(frames, 1))
    assert spoken.startswith("You said word0 word1")
    assert len(spoken) <= limit
    assert spoken.split()[-1].startswith("word"), "cut at a word boundary"
    (warning,) = _warnings(await side.wait_for(lambda fs: bool(_warnings(fs))))
    assert warning["code"] == REPLY_TRUNCATED and warning["stage"] == "llm"
    assert warning["epoch"] == 1 and str(limit) in warning["message"]
    context = await store.get_context(sid)
    assert context[-1]["role"] == "assistant" and context[-1]["truncated"] is True
    assert context[-1]["content"] == spoken

    # the same stage serves another session at once, and this one's next turn, in full
    other = (await store.create_session(scripted(agent_json, ["All fine here."]))).session_id
    other_tts = await listen(bus, subjects.data("tts", other))
    other_side = await listen(bus, subjects.data("transport", other))
    await bus.publish(subjects.data("llm", other), Frame.text("hello", epoch=1))
    frames = await other_tts.wait_for(lambda fs: has_last(fs, 1))
    assert _texts(frames, 1) == ["All fine here."]
    await bus.publish(subjects.data("llm", sid), Frame.text("short one", epoch=2))
    frames = await tts.wait_for(lambda fs: has_last(fs, 2))
    assert _texts(frames, 2) == ["You said short one."]
    await asyncio.sleep(0.1)
    assert not _warnings(other_side.frames)
    assert len(_warnings(side.frames)) == 1


def test_max_reply_chars_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.model_fields["max_reply_chars"].default == 4000
    monkeypatch.setenv("VOICEMESH_MAX_REPLY_CHARS", "1200")
    assert Settings().max_reply_chars == 1200
    monkeypatch.setenv("VOICEMESH_MAX_REPLY_CHARS", "5")
    with pytest.raises(ValueError):
        Settings()


# --- a bounded connector pool -------------------------------------------------------------


def _openai(model: str, base_url: str = "http://127.0.0.1:9/v1") -> Any:
    return CONNECTOR_OPTIONS["llm"]["openai"](model=model, base_url=base_url)


async def test_the_pool_stays_bounded_and_closes_what_it_evicts() -> None:
    """Attack: every distinct config leaves a connector (and its HTTP client) in every stage
    forever."""
    evicted: list[tuple[str, str, str]] = []
    pool = ConnectorPool(3, on_evict=lambda s, n, o: evicted.append((s, n, o.model_dump_json())))
    conns = []
    for i in range(10):
        conn: Any = await pool.get("llm", "openai", _openai(f"m{i}"))
        _ = conn.client  # the HTTP client a connector holds
        conns.append(conn)
        assert len(pool) <= 3
    assert len(pool) == 3 and pool.evicted == 7
    assert [c._client is None for c in conns] == [True] * 7 + [False] * 3
    assert [o for _, _, o in evicted] == [_openai(f"m{i}").model_dump_json() for i in range(7)]
    # most recently used is kept: touching m7 makes m8 the next to go
    assert await pool.get("llm", "openai", _openai("m7")) is conns[7]
    await pool.get("llm", "openai", _openai("m10"))
    assert conns[7]._client is not None and conns[8]._client is None
    await pool.aclose()


async def test_a_connector_in_use_is_closed_only_when_its_turn_is_done() -> None:
    pool = ConnectorPool(1)
    async with pool.lease("llm", "openai", _openai("busy")) as busy:
        client = busy.client
        await pool.get("llm", "openai", _openai("other"))  # evicts "busy" from the pool...
        assert len(pool) == 1 and pool.evicted == 1
        assert busy._client is client  # ...but the running turn keeps it open
        fresh = await pool.get("llm", "openai", _openai("busy"))
        assert fresh is not busy  # the session's next turn gets a new one
    assert busy._client is None  # closed when the lease ended
    await pool.aclose()


async def test_evicted_connectors_stop_their_probes_and_their_sessions_still_work(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """A session whose failing connector is probed in the background; other sessions' configs
    push it out of a small pool: its probe task ends, and the session's next turn rebuilds what
    it needs and is answered (by the fallback, since the primary still fails)."""
    failing = copy.deepcopy(agent_json)
    failing["connectors"]["llm"] = {
        "primary": "openai",
        "fallback": ["echo"],
        "probe_interval_ms": 100,
        "config": {"openai": {"model": "m", "base_url": "http://127.0.0.1:9/v1"}},
    }
    failing["connectors"]["tts"] = {"primary": "tone"}
    config = parse_agent_config(failing)
    sid = (await store.create_session(config)).session_id
    llm = await services.start(LLMService, connector_pool_size=2)
    tts = await listen(bus, subjects.data("tts", sid))

    await bus.publish(subjects.data("llm", sid), Frame.text("first", epoch=1))
    frames = await tts.wait_for(lambda fs: has_last(fs, 1))
    assert _texts(frames, 1) == ["You said first."]
    cid = ("llm", "openai", fingerprint(config.options("llm", "openai")))
    await until(lambda: cid in llm.health._probes, what="the probe to start")
    probe = llm.health._probes[cid]
    await asyncio.sleep(0.3)
    assert not probe.done(), "the probe runs while the connector is held"

    # other tenants' configs: each a distinct echo prefix, so a connector of its own
    for i in range(4):
        other = copy.deepcopy(failing)
        other["connectors"]["llm"] = {"primary": "echo", "config": {"echo": {"prefix": f"P{i}"}}}
        osid = (await store.create_session(parse_agent_config(other))).session_id
        out = await listen(bus, subjects.data("tts", osid))
        await bus.publish(subjects.data("llm", osid), Frame.text("hi", epoch=1))
        assert _texts(await out.wait_for(lambda fs: has_last(fs, 1)), 1) == [f"P{i} hi."]
        assert len(llm.pool) <= 2

    await until(lambda: probe.done(), what="the evicted connector's probe to stop")
    assert cid not in llm.health._probes
    assert llm.pool.evicted >= 4

    # the first session's next turn: rebuilt, failed over, answered
    await bus.publish(subjects.data("llm", sid), Frame.text("again", epoch=2))
    frames = await tts.wait_for(lambda fs: has_last(fs, 2))
    assert _texts(frames, 2) == ["You said again."]
    assert len(llm.pool) <= 2


def test_pool_size_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.model_fields["connector_pool_size"].default == 64
    monkeypatch.setenv("VOICEMESH_CONNECTOR_POOL_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()
