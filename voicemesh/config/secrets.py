"""Secret references: a connector's options model declares its credential fields, a config writes
a credential as "${ENV_NAME}", and each stage resolves it from its own environment.

Only declared credential fields are ever resolved, and only for names on the connector's
allow-list: the conventional variables each field declares (`credential(env=...)`), plus the names
an operator adds with VOICEMESH_SECRET_ENV. Anything else that looks like a reference is refused at
push time (`reference_issues`) and left as plain text at run time (`resolve_credentials`), so a
tenant's config cannot read a stage's environment back through a prompt, a reply or a prefix.

Resolved values only ever live in a connector's memory; the stored and broadcast config keeps the
reference, so Valkey, NATS and logs never see the secret itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, Field

from voicemesh.config.limits import CREDENTIAL_MAX_CHARS
from voicemesh.errors import VoicemeshError

SECRET_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Key names that look like credentials. Not used to decide anything at run time (fields declare
# that); a test checks that every options field named like this is declared a credential.
SECRET_KEY = re.compile(
    r"(api[_-]?keys?|apikeys?|secrets?|passwords?|passwd|token|credentials?|private[_-]?key"
    r"|secret[_-]?(access[_-]?)?key|subscription[_-]?key|access[_-]?key)$",
    re.IGNORECASE,
)
#: the JSON Schema key that marks a credential field: {"env": [default names], "clear": bool}
CREDENTIAL_KEY = "x-credential"
SECRET_ENV_SETTING = "VOICEMESH_SECRET_ENV"
CLEAR_SECRET = 'secret written in clear; use an environment reference "${ENV}"'


class SecretResolutionError(VoicemeshError, LookupError):
    """A config names an environment variable that is not allowed for the field, or not set."""


@dataclass(frozen=True)
class CredentialSpec:
    """What an options field declares: the variables it may name by default, and whether a
    value in clear is accepted too (a room URL is not secret in itself; an API key must be a
    reference)."""

    env: tuple[str, ...]
    clear: bool = False


def credential(
    default: Any = ...,
    *,
    env: tuple[str, ...],
    clear: bool = False,
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A pydantic Field declared as a credential: "${NAME}" in it is resolved (NAME on the
    allow-list), and the JSON Schema shows `"x-credential": {"env": [...], "clear": ...}`
    (plus `extra`, e.g. an egress declaration)."""
    extra = {**(extra or {}), CREDENTIAL_KEY: {"env": list(env), "clear": clear}}
    kwargs.setdefault("max_length", CREDENTIAL_MAX_CHARS)  # a key, a token or a reference to one
    return Field(default, json_schema_extra=extra, **kwargs)


@cache
def credential_fields(model: type[BaseModel]) -> dict[str, CredentialSpec]:
    """The credential fields an options model declares, by field name."""
    out: dict[str, CredentialSpec] = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        spec = extra.get(CREDENTIAL_KEY) if isinstance(extra, dict) else None
        if isinstance(spec, dict):
            env = spec.get("env") or []
            out[name] = CredentialSpec(
                env=tuple(str(e) for e in env) if isinstance(env, list) else (),
                clear=bool(spec.get("clear")),
            )
    return out


def connectors_declaring(
    fields: Callable[[type[BaseModel]], Mapping[str, Any]],
) -> dict[str, set[str]]:
    """Connector name -> the stages where its options model declares any of `fields` (credential
    or egress fields): what an operator setting keyed by [stage.]connector may name."""
    from voicemesh.config.connectors import CONNECTOR_OPTIONS  # it imports this module
    from voicemesh.config.tools import HTTP_TOOL, MCP_TOOL, TOOL_STAGE, HttpHandler, McpHandler

    out: dict[str, set[str]] = {}
    # http and mcp tools are pseudo-connectors of the llm stage: their hosts and header
    # credentials are allowed by the same settings, keyed `tool_http` and `tool_mcp`
    declared: dict[str, dict[str, type[BaseModel]]] = {
        stage: dict(models) for stage, models in CONNECTOR_OPTIONS.items()
    }
    declared[TOOL_STAGE][HTTP_TOOL] = HttpHandler
    declared[TOOL_STAGE][MCP_TOOL] = McpHandler
    for stage, models in declared.items():
        for name, model in models.items():
            if fields(model):
                out.setdefault(name, set()).add(stage)
    return out


def credential_connectors() -> dict[str, set[str]]:
    """What VOICEMESH_SECRET_ENV may name."""
    return connectors_declaring(credential_fields)


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def is_secret_ref(value: Any) -> bool:
    return isinstance(value, str) and SECRET_REF.fullmatch(value) is not None


def operator_env() -> Mapping[str, tuple[str, ...]]:
    """VOICEMESH_SECRET_ENV as the environment says now: extra names by "stage.connector" or
    "connector". Parsed once per distinct value (a pydantic-settings read costs ~100 µs, and
    each config validated asks)."""
    return _operator_env(os.environ.get("VOICEMESH_SECRET_ENV"))


@lru_cache(maxsize=8)
def _operator_env(value: str | None) -> Mapping[str, tuple[str, ...]]:
    from voicemesh.config.settings import SecretEnvSettings

    return MappingProxyType(SecretEnvSettings().secret_env)


def allowed_env(stage: str, connector: str, spec: CredentialSpec) -> tuple[str, ...]:
    """The names a credential field of this connector may reference, defaults first."""
    extra = operator_env()
    names = (*spec.env, *extra.get(connector, ()), *extra.get(f"{stage}.{connector}", ()))
    return tuple(dict.fromkeys(names))


def not_allowed(name: str, stage: str, connector: str, allowed: tuple[str, ...]) -> str:
    # The same words whether or not this process has the variable: the answer reveals nothing.
    return (
        f"environment variable {name} is not allowed for the {stage} connector {connector!r}; "
        f"allowed: {', '.join(allowed) or 'none'} (an operator adds names with "
        f"{SECRET_ENV_SETTING})"
    )


def credential_problem(stage: str, connector: str, spec: CredentialSpec, value: Any) -> str | None:
    """Push-time check of one credential field's value (None if fine)."""
    if not isinstance(value, str) or value == "":
        return None  # null, or a type error the options model reports
    match = SECRET_REF.fullmatch(value)
    if match is None:
        return None if spec.clear else CLEAR_SECRET
    allowed = allowed_env(stage, connector, spec)
    if match.group(1) not in allowed:
        return not_allowed(match.group(1), stage, connector, allowed)
    return None


def _refs(obj: Any, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    if isinstance(obj, str):
        return [(path, obj)] if SECRET_REF.fullmatch(obj) else []
    found: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found.extend(_refs(value, (*path, key)))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found.extend(_refs(value, (*path, i)))
    return found


def reference_issues(
    stage: str, connector: str, model: type[BaseModel], options: Mapping[str, Any]
) -> list[tuple[tuple[str | int, ...], str]]:
    """(path within the options, message) for every "${...}" that may not stand where it is: in a
    field that is not a credential, or naming a variable not allowed for the connector; and for a
    credential written in clear."""
    creds = credential_fields(model)
    issues: list[tuple[tuple[str | int, ...], str]] = []
    for key, value in options.items():
        spec = creds.get(key) if isinstance(key, str) else None
        if spec is not None:
            problem = credential_problem(stage, connector, spec, value)
            if problem:
                issues.append(((key,), problem))
            continue
        where = f"{connector}'s: {', '.join(creds)}" if creds else f"{connector} has none"
        for path, ref in _refs(value, (key,)):
            issues.append((path, f'"{ref}" is only allowed in credential fields ({where})'))
    return issues


def resolve_credential(
    stage: str,
    connector: str,
    spec: CredentialSpec,
    value: str,
    env: Mapping[str, str] | None = None,
) -> str:
    """One credential field's value with its "${NAME}" resolved (a value in clear as it is)."""
    match = SECRET_REF.fullmatch(value)
    if match is None:
        return value
    name = match.group(1)
    allowed = allowed_env(stage, connector, spec)
    if name not in allowed:  # checked again here: a config stored before this rule existed
        raise SecretResolutionError(not_allowed(name, stage, connector, allowed))
    env = os.environ if env is None else env
    if name not in env:
        raise SecretResolutionError(
            f"environment variable {name} is referenced by the config but not set"
        )
    return env[name]


def resolve_credentials(
    stage: str,
    connector: str,
    model: type[BaseModel],
    options: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A copy of a connector's options with its declared credential fields resolved; every other
    field is kept as written, "${...}" included."""
    out = dict(options)
    for field, spec in credential_fields(model).items():
        value = out.get(field)
        if isinstance(value, str) and value:
            out[field] = resolve_credential(stage, connector, spec, value, env)
    return out
