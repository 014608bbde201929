"""Tools in agent-config.json: what an LLM may call, and where each call goes.

A config is untrusted (docs/security.md), and a tool is a config naming a place for a stage
process to send requests to, so every string in it is checked against what the operator allowed:

- an `http` tool's URL is an egress endpoint like a connector's `base_url`: it must name a host on
  the allow-list of the pseudo-connector `tool_http` (VOICEMESH_EGRESS_HOSTS=tool_http:HOST), with
  the same URL rules (https, no userinfo, query or fragment, no metadata address);
- its header values may carry a credential only as a "${NAME}" reference (optionally after
  "Bearer ", "Basic " or "Token "), NAME allowed for `tool_http` by VOICEMESH_SECRET_ENV (no name
  is allowed by default); a header named like a credential (Authorization, X-Api-Key...) must be
  such a reference, never a secret in clear;
- a `nats` tool's subject is plain tokens (no wildcards) under one of the prefixes the operator
  allows (VOICEMESH_TOOL_SUBJECTS, default `tools`), so a config cannot aim requests at
  voicemesh's own subjects (`vm.config.*`, `vm.ctl.*`), another service's, `$SYS` or `_INBOX`;
- `parameters` is a JSON Schema (checked as one), capped in size;
- "${...}" anywhere else in a tool is refused, as in connector options;
- an `mcp` tool's URL and headers follow the http rules under their own pseudo-connector
  `tool_mcp` (VOICEMESH_EGRESS_HOSTS=tool_mcp:HOST, VOICEMESH_SECRET_ENV=tool_mcp:NAME); the
  tools the server lists are offered only if their names are on the tool's optional `tools`
  allow-list, and each listed schema passes the same checks as a config's `parameters`;
- the built-in `set_config` may switch a stage's primary connector only to the names, and the
  prompt only to the named prompts, that its own config lists; the changed config is validated
  whole, as a pushed one.

This module is the config layer: it validates and describes; voicemesh/tools/ runs the calls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from voicemesh.config.hosts import EgressPolicy, current_policy, endpoint, url_problem
from voicemesh.config.limits import NAME_MAX_CHARS, PROMPT_MAX_CHARS
from voicemesh.config.secrets import (
    CREDENTIAL_KEY,
    SECRET_REF,
    CredentialSpec,
    allowed_env,
    is_secret_key,
    not_allowed,
    resolve_credential,
)

#: the pseudo-connector (stage llm) that VOICEMESH_EGRESS_HOSTS and VOICEMESH_SECRET_ENV name
#: for http tools: `tool_http:api.example.com`, `tool_http:WEATHER_API_KEY`
HTTP_TOOL = "tool_http"
#: the same for mcp tools: `tool_mcp:mcp.example.com`, `tool_mcp:MCP_TOKEN`
MCP_TOOL = "tool_mcp"
TOOL_STAGE = "llm"
SUBJECTS_SETTING = "VOICEMESH_TOOL_SUBJECTS"
DEFAULT_TOOL_SUBJECTS = "tools"

#: tools per agent, headers per http tool, the size of one tool's `parameters` schema as JSON
TOOLS_MAX = 32
HEADERS_MAX = 16
SCHEMA_MAX_BYTES = 16_384
DESCRIPTION_MAX_CHARS = 1_024
SUBJECT_MAX_CHARS = 200
FILLER_MAX_CHARS = 200

#: OpenAI's and Anthropic's rule for function names (so a name works with every provider)
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_TOKEN = r"[A-Za-z0-9_-]+"
SUBJECT = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$"
#: a header value that carries a credential: "${NAME}", or a scheme word and "${NAME}"
HEADER_REF = re.compile(r"(?:(Bearer|Basic|Token) )?(\$\{[A-Za-z_][A-Za-z0-9_]*\})")
_HEADER_BAD = re.compile(r"[\x00-\x1f\x7f]")
#: headers voicemesh sets itself; a config may not override them
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "idempotency-key"})
#: the spec for header credentials: no default names, the operator lists them
HEADER_CREDENTIAL = CredentialSpec(env=())


class HttpHandler(BaseModel):
    """The call is an HTTP request: POST/PUT/PATCH send the arguments as a JSON body, GET and
    DELETE as query parameters; the answer (2xx, JSON) is the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["http"]
    url: str = endpoint(..., description="https URL on the tool_http egress allow-list")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[Annotated[str, Field(pattern=HEADER_NAME)], str] = Field(
        default_factory=dict,
        max_length=HEADERS_MAX,
        description='header values; credentials only as "${NAME}" or "Bearer ${NAME}", NAME '
        "allowed for tool_http by VOICEMESH_SECRET_ENV",
        json_schema_extra={CREDENTIAL_KEY: {"env": [], "clear": True}},
    )


class NatsHandler(BaseModel):
    """The call is a NATS request to `subject` (a queue group of tool services answers it); the
    reply is the result. docs/wire-protocol.md, "Tools", has the request and reply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["nats"]
    subject: str = Field(
        max_length=SUBJECT_MAX_CHARS,
        description="tokens of A-Z a-z 0-9 _ - joined by dots, under a prefix the operator "
        "allows (VOICEMESH_TOOL_SUBJECTS, default tools)",
    )


#: names on an mcp tool's allow-list; set_config's connector names per stage, and its prompts
MCP_NAMES_MAX = 64
SWITCH_NAMES_MAX = 16
PROMPTS_MAX = 16
#: the stages whose primary connector set_config may switch
SWITCHABLE_STAGES = ("stt", "llm", "tts")


class McpHandler(BaseModel):
    """The tools of a Model Context Protocol server (streamable HTTP): listed by the LLM stage
    and offered to the LLM under their own names, those on `tools` only when it is set. The
    entry's own `name`, `description` and `parameters` describe the group, not a function."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mcp"]
    url: str = endpoint(..., description="https URL on the tool_mcp egress allow-list")
    headers: dict[Annotated[str, Field(pattern=HEADER_NAME)], str] = Field(
        default_factory=dict,
        max_length=HEADERS_MAX,
        description='header values; credentials only as "${NAME}" or "Bearer ${NAME}", NAME '
        "allowed for tool_mcp by VOICEMESH_SECRET_ENV",
        json_schema_extra={CREDENTIAL_KEY: {"env": [], "clear": True}},
    )
    tools: list[Annotated[str, Field(pattern=TOOL_NAME)]] | None = Field(
        None,
        max_length=MCP_NAMES_MAX,
        description="the server's tools the LLM may call, by name; null: every tool it lists",
    )


class EndCallHandler(BaseModel):
    """Built-in: the bot says the rest of its reply, then the call hangs up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["end_call"]


class SetConfigHandler(BaseModel):
    """Built-in: the LLM switches this session's config within what this lists: a stage's
    primary connector to one of `connectors[stage]`, the system prompt to one of `prompts`
    (by name: the LLM never writes a prompt). The offered schema is made from these lists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["set_config"]
    connectors: dict[
        Literal["stt", "llm", "tts"],
        Annotated[
            list[Annotated[str, Field(max_length=NAME_MAX_CHARS)]],
            Field(min_length=1, max_length=SWITCH_NAMES_MAX),
        ],
    ] = Field(
        default_factory=dict,
        description="stage -> connector names its primary may be switched to",
    )
    prompts: dict[
        Annotated[str, Field(pattern=TOOL_NAME)],
        Annotated[str, Field(max_length=PROMPT_MAX_CHARS)],
    ] = Field(
        default_factory=dict,
        max_length=PROMPTS_MAX,
        description="name -> system prompt the LLM may switch to by name",
    )


Handler = Annotated[
    HttpHandler | NatsHandler | McpHandler | EndCallHandler | SetConfigHandler,
    Field(discriminator="type"),
]


class ToolSpec(BaseModel):
    """One function the LLM may call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TOOL_NAME, description="the function name the LLM sees")
    description: str = Field("", max_length=DESCRIPTION_MAX_CHARS)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of the arguments (an object); a call whose arguments do not "
        "match is answered with an error result",
    )
    handler: Handler
    timeout_ms: int = Field(
        5000,
        ge=50,
        le=120_000,
        description="a call with no result by then is answered with an error result (capped "
        "by VOICEMESH_TOOL_TIMEOUT_MAX_MS)",
    )


class ToolFiller(BaseModel):
    """What the bot says while a slow tool runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("One moment.", min_length=1, max_length=FILLER_MAX_CHARS)
    after_ms: int | None = Field(
        None,
        ge=0,
        le=60_000,
        description="said once per turn when tools have run this long with nothing said "
        "(default VOICEMESH_TOOL_FILLER_AFTER_MS)",
    )


# --- the operator's NATS subject prefixes ------------------------------------------------------


def parse_tool_subjects(value: str) -> tuple[str, ...]:
    """'tools, acme.tools' to ('tools', 'acme.tools'): subject prefixes of whole tokens."""
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if not SUBJECT.fullmatch(part):
            raise ValueError(
                f"{SUBJECTS_SETTING}: {part[:60]!r} is not a subject prefix (tokens of "
                "A-Z a-z 0-9 _ - joined by dots; no wildcards)"
            )
        out.append(part)
    if not out:
        raise ValueError(f"{SUBJECTS_SETTING} names no prefix")
    return tuple(dict.fromkeys(out))


def current_tool_subjects() -> tuple[str, ...]:
    return _tool_subjects(os.environ.get(SUBJECTS_SETTING))


@lru_cache(maxsize=8)
def _tool_subjects(value: str | None) -> tuple[str, ...]:
    return parse_tool_subjects(value if value is not None else DEFAULT_TOOL_SUBJECTS)


def subject_problem(
    subject: str, prefixes: Iterable[str], vm_prefix: str | None = None
) -> str | None:
    """Why a config may not send tool requests to `subject`, or None."""
    if not SUBJECT.fullmatch(subject):
        return (
            "must be tokens of A-Z a-z 0-9 _ - joined by dots (no wildcards, spaces or empty "
            "tokens)"
        )
    allowed = tuple(prefixes)
    if not any(subject.startswith(p + ".") for p in allowed):
        return (
            f"must be under an allowed prefix ({', '.join(p + '.' for p in allowed)}); an "
            f"operator allows others with {SUBJECTS_SETTING}"
        )
    # an operator prefix that overlaps voicemesh's own subjects must still not reach them
    if vm_prefix and (subject == vm_prefix or subject.startswith(vm_prefix + ".")):
        return f"voicemesh's own subjects ({vm_prefix}.*) are never tool subjects"
    return None


# --- header credentials ------------------------------------------------------------------------


def header_problem(name: str, value: str, connector: str = HTTP_TOOL) -> str | None:
    """Push-time check of one http (or mcp) tool header."""
    if name.lower() in RESERVED_HEADERS:
        return f"header {name} is set by voicemesh"
    if _HEADER_BAD.search(value):
        return "control characters are not allowed in a header value"
    m = HEADER_REF.fullmatch(value)
    if m is None:
        if "${" in value:
            return 'a credential is "${NAME}" or "Bearer ${NAME}", the whole value'
        if is_secret_key(name.replace("-", "_")) or name.lower() in ("authorization", "cookie"):
            return 'secret written in clear; use an environment reference "${ENV}"'
        return None
    ref = SECRET_REF.fullmatch(m.group(2))
    assert ref is not None
    allowed = allowed_env(TOOL_STAGE, connector, HEADER_CREDENTIAL)
    if ref.group(1) not in allowed:
        return not_allowed(ref.group(1), TOOL_STAGE, connector, allowed)
    return None


def resolve_header(
    value: str, env: dict[str, str] | None = None, connector: str = HTTP_TOOL
) -> str:
    """A header value with its reference resolved (in the stage process, at call time)."""
    m = HEADER_REF.fullmatch(value)
    if m is None:
        return value
    secret = resolve_credential(TOOL_STAGE, connector, HEADER_CREDENTIAL, m.group(2), env)
    return f"{m.group(1)} {secret}" if m.group(1) else secret


# --- the whole check, for AgentConfig's validator ------------------------------------------------

Loc = tuple[str | int, ...]


def _refs(obj: Any, path: Loc) -> Iterable[Loc]:
    if isinstance(obj, str):
        if SECRET_REF.search(obj):
            yield path
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _refs(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _refs(value, (*path, i))


def schema_problem(schema: dict[str, Any]) -> str | None:
    try:
        size = len(orjson.dumps(schema))
    except orjson.JSONEncodeError as exc:
        return f"cannot be written as JSON: {exc}"
    if size > SCHEMA_MAX_BYTES:
        return f"the schema is {size} bytes as JSON; at most {SCHEMA_MAX_BYTES}"
    if schema.get("type") != "object":
        return 'must be a JSON Schema of an object ("type": "object")'
    import jsonschema_rs

    try:
        jsonschema_rs.validator_for(schema)
    except Exception as exc:  # ValidationError of the meta-schema, or a bad $ref
        return f"not a valid JSON Schema: {str(exc).splitlines()[0][:200]}"
    return None


def tool_issues(
    tools: list[ToolSpec], policy: EgressPolicy | None = None
) -> Iterable[tuple[Loc, str]]:
    """(path under `tools`, message) for everything the operator's rules refuse."""
    names: dict[str, int] = {}
    prefixes: tuple[str, ...] | None = None
    for i, tool in enumerate(tools):
        loc: Loc = (i,)
        if tool.name in names:
            yield (
                (*loc, "name"),
                f"a second tool named {tool.name!r} (first at tools[{names[tool.name]}])",
            )
        names.setdefault(tool.name, i)
        for at in _refs(tool.description, ("description",)):
            yield (*loc, *at), '"${...}" is only allowed in http tool headers'
        for at in _refs(tool.parameters, ("parameters",)):
            yield (*loc, *at), '"${...}" is only allowed in http tool headers'
        if problem := schema_problem(tool.parameters):
            yield (*loc, "parameters"), problem
        handler = tool.handler
        if isinstance(handler, HttpHandler | McpHandler):
            connector = HTTP_TOOL if isinstance(handler, HttpHandler) else MCP_TOOL
            if SECRET_REF.search(handler.url):
                yield (*loc, "handler", "url"), '"${...}" is only allowed in http tool headers'
            else:
                policy = policy if policy is not None else current_policy()
                if problem := url_problem(handler.url, TOOL_STAGE, connector, ("https",), policy):
                    yield (*loc, "handler", "url"), problem
            for name, value in handler.headers.items():
                if problem := header_problem(name, value, connector):
                    yield (*loc, "handler", "headers", name), problem
        elif isinstance(handler, SetConfigHandler):
            from voicemesh.config.connectors import CONNECTOR_OPTIONS

            for stage, allowed in handler.connectors.items():
                known = CONNECTOR_OPTIONS.get(stage, {})
                for j, name in enumerate(allowed):
                    if name not in known:
                        yield (
                            (*loc, "handler", "connectors", stage, j),
                            f"{name[:64]!r} is not a {stage} connector; known: "
                            f"{', '.join(sorted(known))}",
                        )
            for name, text in handler.prompts.items():
                for at in _refs(text, ("handler", "prompts", name)):
                    yield (*loc, *at), '"${...}" is only allowed in http tool headers'
        elif isinstance(handler, NatsHandler):
            if prefixes is None:
                prefixes = current_tool_subjects()
            vm = os.environ.get("VOICEMESH_SUBJECT_PREFIX", "vm")
            if problem := subject_problem(handler.subject, prefixes, vm):
                yield (*loc, "handler", "subject"), problem


__all__ = [
    "DEFAULT_TOOL_SUBJECTS",
    "HTTP_TOOL",
    "MCP_TOOL",
    "EndCallHandler",
    "HttpHandler",
    "McpHandler",
    "NatsHandler",
    "SetConfigHandler",
    "ToolFiller",
    "ToolSpec",
    "current_tool_subjects",
    "header_problem",
    "parse_tool_subjects",
    "resolve_header",
    "subject_problem",
    "tool_issues",
]
