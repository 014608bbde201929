"""Hypothesis strategies for agent configs, shared by the config and API fuzz tests: arbitrary
JSON-ish values, mutations of the default agent (config/agent-config.json), and valid configs
built from the connector options models themselves."""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import orjson
from hypothesis import strategies as st
from pydantic import BaseModel

from voicemesh.config.connectors import CONNECTOR_OPTIONS, STAGES
from voicemesh.config.hosts import DEFAULT_HOSTS, EgressSpec, egress_fields
from voicemesh.config.secrets import credential_fields, is_secret_ref

AGENT_FILE = Path(__file__).resolve().parent.parent / "config" / "agent-config.json"
AGENT: dict[str, Any] = orjson.loads(AGENT_FILE.read_bytes())
ALL_NAMES = frozenset(n for names in CONNECTOR_OPTIONS.values() for n in names)
WEBSOCKET = ("connectors", "transport", "config", "websocket")


def json_like(*, finite: bool = False) -> st.SearchStrategy[Any]:
    """Arbitrary JSON-ish values; `finite` leaves out NaN and the infinities, which JSON (and
    so an HTTP body) cannot carry, though Python callers can pass them."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=not finite, allow_infinity=not finite)
        | st.text(max_size=12)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=24,
    )


json_values = json_like()
json_safe = json_like(finite=True)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
# Values shaped a little more like a config, so the fuzzer gets past the first layer now and then.
keys = st.sampled_from(
    [
        "system_prompt",
        "pipeline",
        "connectors",
        "name",
        "flow",
        "from",
        "to",
        "stream",
        "primary",
        "fallback",
        "config",
        "attempt_timeout_ms",
        "probe_interval_ms",
        *STAGES,
        *sorted(ALL_NAMES),
    ]
) | st.text(max_size=6)
config_like = st.recursive(
    scalars | st.sampled_from(["audio", "text", *STAGES, "whisper", "scripted", "tone"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths_of(v, (*prefix, i))
    return out


def parent_of(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


@st.composite
def mutation(draw: st.DrawFn, data: dict[str, Any], values: st.SearchStrategy[Any]) -> None:
    """Apply one random mutation to `data` in place."""
    op = draw(
        st.sampled_from(
            ["drop", "retype", "unknown_key", "stage", "connector", "streams", "options", "flow"]
        )
    )
    paths = [p for p in paths_of(data) if p]
    if op in ("drop", "retype") and paths:
        path = draw(st.sampled_from(paths))
        parent = parent_of(data, path)
        if op == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(values)
    elif op == "unknown_key":
        dicts = [p for p in [(), *paths] if isinstance(_at(data, p), dict)]
        target = _at(data, draw(st.sampled_from(dicts)))
        target[draw(keys)] = draw(values)
    elif op == "stage":
        connectors = data.get("connectors")
        if isinstance(connectors, dict):
            name = draw(
                st.sampled_from(["vision", "llm2", "TTS", "", "transport"]) | st.text(max_size=6)
            )
            connectors[name] = draw(
                st.sampled_from([{"primary": "tone"}, {"primary": "x"}, {}]) | values
            )
    elif op == "connector":
        connectors = data.get("connectors")
        if isinstance(connectors, dict) and connectors:
            stage = draw(st.sampled_from(sorted(connectors, key=str)))
            sc = connectors[stage]
            if isinstance(sc, dict):
                any_name = st.sampled_from(sorted(ALL_NAMES | {"nope"})) | st.text(max_size=6)
                where = draw(st.sampled_from(["primary", "fallback", "config"]))
                if where == "primary":
                    sc["primary"] = draw(any_name)
                elif where == "fallback":
                    fb = sc.get("fallback")
                    sc["fallback"] = [*(fb if isinstance(fb, list) else []), draw(any_name)]
                else:
                    cfg = sc.get("config")
                    cfg = cfg if isinstance(cfg, dict) else {}
                    cfg[draw(any_name)] = draw(st.dictionaries(keys, values, max_size=3))
                    sc["config"] = cfg
    elif op == "streams":
        flow = _at(data, ("pipeline", "flow"))
        if isinstance(flow, list) and flow:
            i = draw(st.integers(0, len(flow) - 1))
            edge = flow[i]
            if isinstance(edge, dict):
                how = draw(st.sampled_from(["flip", "swap_ends", "stage"]))
                if how == "flip":
                    edge["stream"] = "audio" if edge.get("stream") == "text" else "text"
                elif how == "swap_ends":
                    edge["from"], edge["to"] = edge.get("to"), edge.get("from")
                else:
                    edge[draw(st.sampled_from(["from", "to"]))] = draw(
                        st.sampled_from([*STAGES, "camera"])
                    )
    elif op == "options":
        connectors = data.get("connectors")
        if isinstance(connectors, dict):
            stage = draw(st.sampled_from(list(CONNECTOR_OPTIONS)))
            name = draw(st.sampled_from(sorted(CONNECTOR_OPTIONS[stage])))
            model = CONNECTOR_OPTIONS[stage][name]
            sc = connectors.get(stage)
            if isinstance(sc, dict):
                cfg = sc.get("config")
                cfg = cfg if isinstance(cfg, dict) else {}
                opts = cfg.get(name)
                opts = opts if isinstance(opts, dict) else {}
                field = draw(st.sampled_from(sorted(model.model_fields) or ["x"]))
                value = values
                if field in model.model_fields:
                    value |= field_values(model, field)
                opts[field] = draw(value)
                cfg[name] = opts
                sc["config"] = cfg
    elif op == "flow":
        flow = _at(data, ("pipeline", "flow"))
        if isinstance(flow, list):
            how = draw(st.sampled_from(["shuffle", "duplicate", "pop", "reverse"]))
            if how == "shuffle":
                flow[:] = draw(st.permutations(flow))
            elif how == "duplicate" and flow:
                flow.append(copy.deepcopy(draw(st.sampled_from(flow))))
            elif how == "pop" and flow:
                flow.pop(draw(st.integers(0, len(flow) - 1)))
            else:
                flow.reverse()


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    try:
        for part in path:
            data = data[part]
    except (KeyError, IndexError, TypeError):
        return None
    return data


@st.composite
def mutated_agent(draw: st.DrawFn, values: st.SearchStrategy[Any] = json_values) -> dict[str, Any]:
    data = copy.deepcopy(AGENT)
    for _ in range(draw(st.integers(1, 4))):
        draw(mutation(data, values))
    return data


def with_(fn: Any) -> dict[str, Any]:
    data = copy.deepcopy(AGENT)
    fn(data)
    return data


def set_at(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    return with_(lambda d: parent_of(d, path).__setitem__(path[-1], value))


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _str_items(annotation: Any) -> bool:
    """A list of strings (each maybe capped: Annotated[str, ...])."""
    (item,) = typing.get_args(annotation) or (None,)
    if typing.get_origin(item) is typing.Annotated:
        item = typing.get_args(item)[0]
    return item is str


def egress_values(model: type[BaseModel], spec: EgressSpec) -> st.SearchStrategy[Any]:
    """Endpoint values the default egress policy accepts for this connector."""
    if spec.kind == "region":
        return st.sampled_from(["westeurope", "eastus2", "uksouth"])
    if spec.kind == "ice":
        # no TURN host: with an ice_credential drawn, a TURN host must be operator-listed
        stun = ["stun:stun.l.google.com:19302", "stun:stun.example.org"]
        return st.lists(st.sampled_from(stun), max_size=3)
    connector = next(
        n for models in CONNECTOR_OPTIONS.values() for n, m in models.items() if m is model
    )
    hosts = [h.replace("*", "acme") for h in DEFAULT_HOSTS[connector]]
    return st.builds(
        lambda scheme, host, path: f"{scheme}://{host}{path}",
        st.sampled_from(spec.schemes),
        st.sampled_from(hosts),
        st.sampled_from(["", "/", "/v1", "/room-1"]),
    )


def field_values(model: type[BaseModel], name: str) -> st.SearchStrategy[Any]:
    """Values the options model accepts for one field, read off its annotation and constraints."""
    info = model.model_fields[name]
    annotation, optional = _unwrap_optional(info.annotation)
    bounds: dict[str, Any] = {}
    min_len = 0
    pattern: str | None = None
    max_len = 20  # short values; within every cap the options declare (voicemesh.config.limits)
    for meta in info.metadata:
        if isinstance(meta, at.Ge):
            bounds["min_value"] = meta.ge
        elif isinstance(meta, at.Gt):
            bounds["min_value"], bounds["exclude_min"] = meta.gt, True
        elif isinstance(meta, at.Le):
            bounds["max_value"] = meta.le
        elif isinstance(meta, at.Lt):
            bounds["max_value"], bounds["exclude_max"] = meta.lt, True
        elif isinstance(meta, at.MinLen):
            min_len = meta.min_length
        elif isinstance(meta, at.MaxLen):
            max_len = min(max_len, meta.max_length)
        elif getattr(meta, "pattern", None):
            pattern = meta.pattern
    strategy: st.SearchStrategy[Any]
    egress = egress_fields(model).get(name)
    if egress is not None:  # an endpoint: only the operator's allow-list is valid
        strategy = egress_values(model, egress)
        spec = credential_fields(model).get(name)
        if spec is not None:
            strategy = strategy | st.sampled_from([f"${{{e}}}" for e in spec.env])
        return st.none() | strategy if optional else strategy
    if typing.get_origin(annotation) is Literal:
        strategy = st.sampled_from(typing.get_args(annotation))
    elif annotation is bool:
        strategy = st.booleans()
    elif annotation is int:
        strategy = st.integers(bounds.get("min_value"), bounds.get("max_value"))
    elif annotation is float:
        # exactly what the model accepts: NaN fails every bound, an infinity may not
        finite = model.model_config.get("allow_inf_nan", True) is False
        strategy = st.floats(allow_nan=False, allow_infinity=False if finite else None, **bounds)
    elif annotation is str:
        spec = credential_fields(model).get(name)
        # a credential names one of its default variables; "${...}" stands nowhere else
        text = (
            st.from_regex(pattern, fullmatch=True)
            if pattern
            else st.text(min_size=min_len, max_size=max_len).filter(lambda t: not is_secret_ref(t))
        )
        if spec is not None:
            refs = st.sampled_from([f"${{{e}}}" for e in spec.env])
            strategy = refs | text if spec.clear else refs
        else:
            strategy = text
    elif typing.get_origin(annotation) is list and _str_items(annotation):
        items = st.text(max_size=20).filter(lambda t: not is_secret_ref(t))
        strategy = st.lists(items, min_size=max(min_len, 1), max_size=min(3, max_len))
    elif typing.get_origin(annotation) is list and min_len == 0:
        strategy = st.just([])  # a list of objects (scripted tool_rounds): tests/test_tools.py
    else:  # pragma: no cover - a new field type: teach this generator about it
        raise AssertionError(f"no strategy for {model.__name__}.{name}: {info.annotation}")
    return st.none() | strategy if optional else strategy


@st.composite
def options_of(draw: st.DrawFn, model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.is_required() or draw(st.booleans()):
            out[name] = draw(field_values(model, name))
    return out


@st.composite
def stage_connectors(draw: st.DrawFn, stage: str) -> dict[str, Any]:
    known = sorted(CONNECTOR_OPTIONS[stage])
    chain = draw(st.lists(st.sampled_from(known), min_size=1, max_size=len(known), unique=True))
    # options for the chain (required ones must be given) and now and then for others kept aside
    named = set(chain) | set(draw(st.lists(st.sampled_from(known), max_size=2)))
    config: dict[str, Any] = {}
    for name in sorted(named):
        model = CONNECTOR_OPTIONS[stage][name]
        needs = any(f.is_required() for f in model.model_fields.values())
        if needs or draw(st.booleans()):
            config[name] = draw(options_of(model))
    sc: dict[str, Any] = {"primary": chain[0]}
    if len(chain) > 1 or draw(st.booleans()):
        sc["fallback"] = chain[1:]
    if config:
        primary_only = set(config) == {chain[0]} and config[chain[0]]
        # the seed's flat form: the primary's options straight under "config"
        sc["config"] = config[chain[0]] if primary_only and draw(st.booleans()) else config
    if stage != "transport" and draw(st.booleans()):
        sc["attempt_timeout_ms"] = draw(st.integers(50, 120_000))
    if draw(st.booleans()):
        sc["probe_interval_ms"] = draw(st.integers(100, 600_000))
    return sc


FULL_FLOW = [
    {"from": "transport", "to": "stt", "stream": "audio"},
    {"from": "stt", "to": "llm", "stream": "text"},
    {"from": "llm", "to": "tts", "stream": "text"},
    {"from": "tts", "to": "transport", "stream": "audio"},
]
SHORT_FLOW = [FULL_FLOW[0], {"from": "stt", "to": "tts", "stream": "text"}, FULL_FLOW[3]]


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    flow = draw(st.sampled_from([FULL_FLOW, SHORT_FLOW]))
    stages = {e["from"] for e in flow} | {e["to"] for e in flow}
    if draw(st.booleans()):
        stages.discard("transport")  # the transport's connectors may be left out
    data: dict[str, Any] = {
        "pipeline": {
            "name": draw(st.text(min_size=1, max_size=20)),
            "flow": draw(st.permutations(flow)),
        },
        "connectors": {s: draw(stage_connectors(s)) for s in sorted(stages)},
    }
    if draw(st.booleans()):
        data["system_prompt"] = draw(st.text(max_size=60))
    return data


def keyed_options(sc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A stage's options keyed by connector, whether given keyed or in the seed's flat form."""
    config = sc.get("config") or {}
    if all(isinstance(v, dict) for v in config.values()) and any(k in ALL_NAMES for k in config):
        return config
    return {sc["primary"]: config}
