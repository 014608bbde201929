"""agent-config.json as pydantic v2 models, with errors that name the JSON path of the problem.

Structure is checked by the field types; meaning (a known connector, a stream that fits its edge, a
flow that leads from transport back to transport, no secret in clear, "${ENV}" only in a
declared credential field and naming an allowed variable, endpoints only on the operator's egress
allow-list) by `AgentConfig`'s validator,
which reports every problem at once with its path, so a 422 or `config validate` can point at each.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from voicemesh.config.connectors import (
    CONNECTOR_OPTIONS,
    STAGE_IO,
    ConnectorOptions,
    StreamKind,
    connector_names,
)
from voicemesh.config.hosts import EgressPolicy, current_policy, egress_fields, egress_issues
from voicemesh.config.limits import (
    CONNECTOR_CONFIGS_MAX,
    FALLBACKS_MAX,
    FLOW_EDGES_MAX,
    NAME_MAX_CHARS,
    OPTIONS_KEYS_MAX,
    PROMPT_MAX_CHARS,
    STAGES_MAX,
    Name,
    entries_at_most,
)
from voicemesh.config.secrets import reference_issues
from voicemesh.config.stages import STAGES, Stage
from voicemesh.config.tools import TOOLS_MAX, ToolFiller, ToolSpec, tool_issues
from voicemesh.errors import VoicemeshError

Path = tuple[str | int, ...]


class ConfigIssue(BaseModel):
    """One problem in a config: where (JSON path) and what."""

    loc: list[str | int]
    msg: str

    @property
    def path(self) -> str:
        return dotted(self.loc)


def dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


class ConfigValidationError(VoicemeshError, ValueError):
    """A config failed validation; `issues` name each problem by path."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("; ".join(f"{i.path}: {i.msg}" for i in issues))


class FlowEdge(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    source: str = Field(
        alias="from", max_length=NAME_MAX_CHARS, description="stage the stream leaves"
    )
    target: str = Field(
        alias="to", max_length=NAME_MAX_CHARS, description="stage the stream enters"
    )
    stream: StreamKind


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=NAME_MAX_CHARS)
    flow: list[FlowEdge] = Field(min_length=1, max_length=FLOW_EDGES_MAX)


Options = Annotated[
    dict[Name, Any], Field(max_length=OPTIONS_KEYS_MAX), entries_at_most(OPTIONS_KEYS_MAX)
]


class StageConnectors(BaseModel):
    """Primary connector, ordered fallbacks, and each connector's options keyed by its name.

    The seed format's single stage-level `config` object (not keyed by connector) is accepted and
    read as the primary connector's options; see README "Config reference". Options may be kept for
    a known connector that is not in the chain, so swapping back needs no re-typing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary: str = Field(min_length=1, max_length=NAME_MAX_CHARS)
    fallback: list[Name] = Field(default_factory=list, max_length=FALLBACKS_MAX)
    # keyed by connector name; each options object's own fields are capped by its options model,
    # and the number of keys here too, so an object of a million unknown keys is one issue
    config: Annotated[dict[Name, Options], entries_at_most(CONNECTOR_CONFIGS_MAX)] = Field(
        default_factory=dict, max_length=CONNECTOR_CONFIGS_MAX
    )
    attempt_timeout_ms: int | None = Field(
        None,
        ge=50,
        le=120_000,
        description="a connector with no first result within this time fails over to the next "
        "(default per stage: stt 5000, llm 3000, tts 3000; none for transport)",
    )
    probe_interval_ms: int = Field(
        5000,
        ge=100,
        le=600_000,
        description="how often a failed connector is probed in the background until it heals",
    )

    @model_validator(mode="before")
    @classmethod
    def _seed_form(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        config = data.get("config")
        if not isinstance(config, dict) or not config:
            return data
        # Keyed by connector when every value is an object and some key names a connector; the
        # flat form (older configs) holds option values (strings, numbers) for the primary.
        chain = [data.get("primary")]
        if isinstance(data.get("fallback"), list):
            chain += data["fallback"]
        names = {n for n in chain if isinstance(n, str)} | ALL_CONNECTORS
        keyed = all(isinstance(v, dict) for v in config.values()) and any(
            k in names for k in config
        )
        if not keyed and isinstance(data.get("primary"), str):
            data = {**data, "config": {data["primary"]: config}}
        return data

    @property
    def chain(self) -> list[str]:
        return [self.primary, *self.fallback]


ALL_CONNECTORS = frozenset(n for names in CONNECTOR_OPTIONS.values() for n in names)
DEFAULT_TRANSPORT = StageConnectors(primary="websocket")


class AgentConfig(BaseModel):
    """A whole agent: prompt, pipeline flow, connectors per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str = Field(default="", max_length=PROMPT_MAX_CHARS)
    pipeline: PipelineSpec
    connectors: Annotated[dict[Name, StageConnectors], entries_at_most(STAGES_MAX)] = Field(
        max_length=STAGES_MAX
    )
    tools: Annotated[list[ToolSpec], entries_at_most(TOOLS_MAX)] = Field(
        default_factory=list,
        max_length=TOOLS_MAX,
        description="functions the LLM may call (docs/wire-protocol.md, Tools); none: the LLM "
        "stage runs exactly as without tools",
    )
    tool_filler: ToolFiller | None = Field(
        default_factory=ToolFiller,
        description="what the bot says once per turn while tools run slowly; null: nothing",
    )

    @field_validator("connectors")
    @classmethod
    def _not_empty(cls, v: dict[str, StageConnectors]) -> dict[str, StageConnectors]:
        if not v:
            raise ValueError("at least the stages of the flow need connectors")
        return v

    @model_validator(mode="after")
    def _semantics(self) -> AgentConfig:
        issues = list(_check(self))
        if issues:
            raise PydanticCustomError(
                "agent_config",
                "{summary}",
                {
                    "summary": "; ".join(f"{i.path}: {i.msg}" for i in issues),
                    "issues": [i.model_dump() for i in issues],
                },
            )
        return self

    # --- reading -----------------------------------------------------------------------------

    def stage(self, stage: str) -> StageConnectors:
        if stage == Stage.TRANSPORT and stage not in self.connectors:
            return DEFAULT_TRANSPORT
        return self.connectors[stage]

    def options(self, stage: str, name: str) -> ConnectorOptions:
        """Typed options of one connector (defaults where the config gives none)."""
        return self._options[(stage, name)]

    def transport_options(self, name: str) -> ConnectorOptions:
        """Options for the transport a call came in on (websocket, webrtc, twilio, daily): a call
        may use any endpoint, so one its config does not list runs on that transport's defaults."""
        found = self._options.get((Stage.TRANSPORT, name))
        if found is not None:
            return found
        given = self.stage(Stage.TRANSPORT).config.get(name, {})
        return CONNECTOR_OPTIONS[Stage.TRANSPORT][name].model_validate(given)

    def next_hop(self, stage: str, stream: str) -> str | None:
        return self._hops.get((stage, stream))

    @cached_property
    def _hops(self) -> dict[tuple[str, str], str]:
        return {(e.source, e.stream): e.target for e in self.pipeline.flow}

    @cached_property
    def _options(self) -> dict[tuple[str, str], ConnectorOptions]:
        out: dict[tuple[str, str], ConnectorOptions] = {}
        for stage in STAGES:
            if stage not in self.connectors and stage != Stage.TRANSPORT:
                continue
            sc = self.stage(stage)
            for name in sc.chain:
                out[(stage, name)] = CONNECTOR_OPTIONS[stage][name].model_validate(
                    sc.config.get(name, {})
                )
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_unset=True))


def _check(cfg: AgentConfig) -> Iterable[ConfigIssue]:
    def issue(loc: Path, msg: str) -> ConfigIssue:
        return ConfigIssue(loc=list(loc), msg=msg)

    # Connectors: known stages, known names, options that validate, no secret in clear, no
    # endpoint off the egress allow-list.
    policy: EgressPolicy | None = None  # read from the environment once, if a connector needs it
    for stage, sc in cfg.connectors.items():
        base: Path = ("connectors", stage)
        if stage not in STAGES:
            yield issue(base, f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            continue
        known = CONNECTOR_OPTIONS[stage]
        choices = ", ".join(connector_names(stage))
        for at, name in [(("primary",), sc.primary)] + [
            (("fallback", i), n) for i, n in enumerate(sc.fallback)
        ]:
            if name not in known:
                yield issue((*base, *at), f"unknown {stage} connector {name!r}; known: {choices}")
        if len(set(sc.chain)) != len(sc.chain):
            yield issue((*base, "fallback"), "a connector appears twice in primary + fallback")
        for name, options in sc.config.items():
            loc: Path = (*base, "config", name)
            if name not in known:
                yield issue(
                    loc, f"options for unknown {stage} connector {name!r}; known: {choices}"
                )
                continue
            # "${ENV}" only in declared credential fields, naming an allowed variable
            for at_path, msg in reference_issues(stage, name, known[name], options):
                yield issue((*loc, *at_path), msg)
            try:
                known[name].model_validate(options)
            except ValidationError as exc:
                for err in exc.errors():
                    yield issue((*loc, *err["loc"]), err["msg"])
                continue
            # base_url, region, endpoints: only hosts on the operator's egress allow-list
            if egress_fields(known[name]):
                if policy is None:
                    policy = current_policy()
                for at_path, msg in egress_issues(stage, name, known[name], options, policy):
                    yield issue((*loc, *at_path), msg)
            for key, value in options.items():  # kept as given: it must survive to_json()
                try:
                    orjson.dumps(value)
                except orjson.JSONEncodeError as exc:
                    yield issue((*loc, key), f"value cannot be written as JSON: {exc}")
        # A connector in the chain with no options given still needs its required ones.
        for name in dict.fromkeys(sc.chain):
            if name in known and name not in sc.config:
                try:
                    known[name].model_validate({})
                except ValidationError as exc:
                    for err in exc.errors():
                        yield issue((*base, "config", name, *err["loc"]), err["msg"])

    # Flow: known stages, streams that fit both ends, one next hop per (stage, stream).
    seen: dict[tuple[str, str], int] = {}
    edges_ok = True
    for i, edge in enumerate(cfg.pipeline.flow):
        loc = ("pipeline", "flow", i)
        for end, name in (("from", edge.source), ("to", edge.target)):
            if name not in STAGES:
                edges_ok = False
                yield issue((*loc, end), f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        if edge.source in STAGES and edge.target in STAGES:
            produces, consumes = STAGE_IO[edge.source][1], STAGE_IO[edge.target][0]
            if edge.stream != produces or edge.stream != consumes:
                edges_ok = False
                yield issue(
                    (*loc, "stream"),
                    f"{edge.source} produces {produces} and {edge.target} consumes {consumes}; "
                    f"stream {edge.stream!r} does not fit this edge",
                )
        edge_key = (edge.source, edge.stream)
        if edge_key in seen:
            edges_ok = False
            yield issue(
                loc,
                f"second {edge.stream} edge out of {edge.source} (first at flow[{seen[edge_key]}])",
            )
        seen.setdefault(edge_key, i)

    if edges_ok:
        hops: dict[tuple[str, str], tuple[int, str]] = {
            (e.source, e.stream): (i, e.target) for i, e in enumerate(cfg.pipeline.flow)
        }
        stage, used, loop = Stage.TRANSPORT.value, set(), False
        while True:
            hop = hops.get((stage, STAGE_IO[stage][1]))
            if hop is None or hop[0] in used:
                break
            used.add(hop[0])
            stage = hop[1]
            if stage == Stage.TRANSPORT:
                loop = True
                break
        if not loop:
            yield issue(
                ("pipeline", "flow"),
                f"the flow must lead from transport back to transport (it stops at {stage!r})",
            )
        for i in sorted(set(range(len(cfg.pipeline.flow))) - used):
            yield issue(
                ("pipeline", "flow", i), "edge is not on the path from transport to transport"
            )

    # Tools: egress allow-list for http URLs, declared header credentials, allowed NATS subjects.
    if cfg.tools:
        for where, msg in tool_issues(cfg.tools, policy):
            yield issue(("tools", *where), msg)

    in_flow = {s for e in cfg.pipeline.flow for s in (e.source, e.target) if s in STAGES}
    for stage in sorted(in_flow - {Stage.TRANSPORT} - set(cfg.connectors)):
        yield issue(("connectors", stage), f"stage {stage!r} is in the flow but has no connectors")


def agent_config_schema() -> dict[str, Any]:
    """JSON Schema of agent-config.json, with each connector's options under $defs and indexed by
    stage and name in "x-connector-options" (the `config` field itself is keyed by connector)."""
    schema = AgentConfig.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    index: dict[str, dict[str, Any]] = {}
    for stage, connectors in CONNECTOR_OPTIONS.items():
        for name, model in connectors.items():
            key = model.__name__
            defs[key] = model.model_json_schema()
            index.setdefault(stage, {})[name] = {"$ref": f"#/$defs/{key}"}
    schema["x-connector-options"] = index
    return schema


def format_errors(exc: ValidationError, *, drop: int = 0) -> list[ConfigIssue]:
    """Flatten a pydantic error into path-named issues (our semantic issues carry their own paths).

    `drop` strips leading loc parts (FastAPI's "body").
    """
    out: list[ConfigIssue] = []
    for err in exc.errors():
        loc = [p for p in err["loc"]][drop:]
        ctx = err.get("ctx") or {}
        if err["type"] == "agent_config" and "issues" in ctx:
            for item in ctx["issues"]:
                out.append(ConfigIssue(loc=[*loc, *item["loc"]], msg=item["msg"]))
        else:
            out.append(ConfigIssue(loc=loc, msg=err["msg"]))
    return out


def parse_agent_config(data: Any) -> AgentConfig:
    """Raw JSON (bytes, str or parsed) to an AgentConfig, or ConfigValidationError."""
    if isinstance(data, bytes | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ConfigValidationError(
                [ConfigIssue(loc=[], msg=f"not valid JSON: {exc}")]
            ) from None
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigValidationError(format_errors(exc)) from None
