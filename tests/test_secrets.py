"""voicemesh.config.secrets: "${ENV}" is resolved only in the credential fields a connector's
options declare, and only for the names allowed for that connector. Each attack below read a
stage's environment back to the caller before (a prefix or a reply of "${OPENAI_API_KEY}")."""

from __future__ import annotations

import copy
import os
import types
import typing
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from voicemesh.config.connectors import (
    CONNECTOR_OPTIONS,
    DailyTransportOptions,
    EchoOptions,
    OpenAILLMOptions,
    ScriptedOptions,
)
from voicemesh.config.models import AgentConfig, ConfigValidationError, parse_agent_config
from voicemesh.config.secrets import (
    CREDENTIAL_KEY,
    SecretResolutionError,
    credential_fields,
    is_secret_key,
    is_secret_ref,
    resolve_credential,
    resolve_credentials,
)
from voicemesh.config.settings import SecretEnvSettings, get_settings, parse_secret_env
from voicemesh.connectors.registry import ConnectorPool

# configs here point connectors at loopback fake providers
pytestmark = pytest.mark.usefixtures("private_egress")

CANARY = "VM_CANARY_SECRET"
CANARY_VALUE = "canary-8d1f03a9b2"
OPENAI_VALUE = "sk-openai-canary-77c1"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CANARY, CANARY_VALUE)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_VALUE)
    monkeypatch.delenv("VOICEMESH_SECRET_ENV", raising=False)


def issues_of(data: Any) -> dict[str, str]:
    with pytest.raises(ConfigValidationError) as info:
        parse_agent_config(data)
    return {i.path: i.msg for i in info.value.issues}


def with_llm(agent_json: dict, name: str, options: dict[str, Any]) -> dict:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"]["config"][name] = options
    return data


async def spoken(pool: ConnectorPool, name: str, options: BaseModel) -> str:
    conn: Any = await pool.get("llm", name, options)  # type: ignore[arg-type]
    messages = [{"role": "user", "content": "hello"}]
    return "".join([piece async for piece in conn.stream(messages)])


# --- declaration -----------------------------------------------------------------------------


def test_credentials_are_declared_and_shown_in_the_json_schema() -> None:
    declared = {
        (stage, name, field)
        for stage, models in CONNECTOR_OPTIONS.items()
        for name, model in models.items()
        for field in credential_fields(model)
    }
    assert declared == {
        ("transport", "webrtc", "ice_credential"),
        ("transport", "daily", "room_url"),
        ("transport", "daily", "token"),
        ("stt", "openai", "api_key"),
        ("stt", "deepgram", "api_key"),
        ("llm", "openai", "api_key"),
        ("llm", "anthropic", "api_key"),
        ("tts", "elevenlabs", "api_key"),
        ("tts", "azure", "api_key"),
        ("tts", "openai", "api_key"),
    }
    schema = OpenAILLMOptions.model_json_schema()
    assert schema["properties"]["api_key"][CREDENTIAL_KEY] == {
        "env": ["OPENAI_API_KEY"],
        "clear": False,
    }
    assert CREDENTIAL_KEY not in schema["properties"]["base_url"]
    assert credential_fields(DailyTransportOptions)["room_url"].clear  # a URL in clear is fine


def test_every_field_named_like_a_credential_is_declared_one() -> None:
    """A new connector's `password` or `token` field cannot be forgotten."""
    for models in CONNECTOR_OPTIONS.values():
        for model in models.values():
            for field in model.model_fields:
                if is_secret_key(field):
                    assert field in credential_fields(model), f"{model.__name__}.{field}"


# --- push time -------------------------------------------------------------------------------


def test_echo_prefix_reference_is_refused_at_push_time(agent_json: dict) -> None:
    issues = issues_of(with_llm(agent_json, "echo", {"prefix": "${OPENAI_API_KEY}"}))
    msg = issues["connectors.llm.config.echo.prefix"]
    assert '"${OPENAI_API_KEY}" is only allowed in credential fields' in msg
    assert OPENAI_VALUE not in str(issues)


def test_scripted_reply_reference_is_refused_at_push_time(agent_json: dict) -> None:
    data = with_llm(agent_json, "scripted", {"replies": ["fine", "${VM_CANARY_SECRET}"]})
    issues = issues_of(data)
    assert (
        "only allowed in credential fields" in issues["connectors.llm.config.scripted.replies[1]"]
    )
    assert CANARY_VALUE not in str(issues)


def test_reference_in_a_non_credential_field_of_a_credentialed_connector(agent_json: dict) -> None:
    opts = {"model": "${OPENAI_API_KEY}", "api_key": "${OPENAI_API_KEY}"}
    issues = issues_of(with_llm(agent_json, "openai", opts))
    assert list(issues) == ["connectors.llm.config.openai.model"]
    assert "openai's: api_key" in issues["connectors.llm.config.openai.model"]


def test_text_around_a_reference_is_plain_text(agent_json: dict) -> None:
    """Only a whole-value "${NAME}" was ever a reference; prose with "${" in it is kept as is."""
    cfg = parse_agent_config(with_llm(agent_json, "echo", {"prefix": "costs ${PRICE} today"}))
    assert cfg.stage("llm").config["echo"] == {"prefix": "costs ${PRICE} today"}


def test_the_system_prompt_is_plain_text_never_resolved(agent_json: dict) -> None:
    data = copy.deepcopy(agent_json)
    data["system_prompt"] = "${OPENAI_API_KEY}"
    cfg = parse_agent_config(data)
    assert cfg.system_prompt == "${OPENAI_API_KEY}"


def test_credential_naming_a_non_allowed_variable_is_refused(agent_json: dict) -> None:
    opts = {"model": "m", "api_key": "${VM_CANARY_SECRET}"}
    issues = issues_of(with_llm(agent_json, "openai", opts))
    msg = issues["connectors.llm.config.openai.api_key"]
    assert "VM_CANARY_SECRET is not allowed for the llm connector 'openai'" in msg
    assert "allowed: OPENAI_API_KEY" in msg and "VOICEMESH_SECRET_ENV" in msg
    assert CANARY_VALUE not in msg


def test_a_conventional_variable_of_another_provider_is_not_allowed(agent_json: dict) -> None:
    opts = {"model": "m", "api_key": "${OPENAI_API_KEY}"}
    issues = issues_of(with_llm(agent_json, "anthropic", opts))
    assert "allowed: ANTHROPIC_API_KEY" in issues["connectors.llm.config.anthropic.api_key"]


def test_allowed_credential_is_accepted_and_kept_as_a_reference(agent_json: dict) -> None:
    cfg = parse_agent_config(
        with_llm(agent_json, "openai", {"model": "m", "api_key": "${OPENAI_API_KEY}"})
    )
    assert b"${OPENAI_API_KEY}" in cfg.to_json() and OPENAI_VALUE.encode() not in cfg.to_json()


def test_operator_setting_extends_the_list(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = {"model": "m", "api_key": "${VM_CANARY_SECRET}"}
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "llm.openai:VM_CANARY_SECRET")
    parse_agent_config(with_llm(agent_json, "openai", opts))
    # for that connector only: anthropic still may not name it
    anthropic = {"model": "m", "api_key": "${VM_CANARY_SECRET}"}
    assert "connectors.llm.config.anthropic.api_key" in issues_of(
        with_llm(agent_json, "anthropic", anthropic)
    )
    spec = credential_fields(OpenAILLMOptions)["api_key"]
    assert resolve_credential("llm", "openai", spec, "${VM_CANARY_SECRET}") == CANARY_VALUE
    with pytest.raises(SecretResolutionError):
        resolve_credential("stt", "openai", spec, "${VM_CANARY_SECRET}")  # llm.openai, not stt
    # a bare connector name extends it on every stage
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "openai:VM_CANARY_SECRET")
    for stage in ("stt", "llm", "tts"):
        assert resolve_credential(stage, "openai", spec, "${VM_CANARY_SECRET}") == CANARY_VALUE


def test_secret_env_setting_format(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_secret_env(" llm.openai: A , B ;deepgram:C;;llm.openai:A,D") == {
        "llm.openai": ("A", "B", "D"),
        "deepgram": ("C",),
    }
    for bad in ("openai", "openai:", "vision.x:A", "openai:1A", "llm.openai:A-B"):
        with pytest.raises(ValueError, match="VOICEMESH_SECRET_ENV"):
            parse_secret_env(bad)
    # a misspelt connector, or one at a stage where it has no credential, would allow nothing
    # without a word: it stops the process at start, naming what is known
    for bad in ("opnai:A", "stt.anthropic:A", "llm.echo:A", "whisper:A"):
        with pytest.raises(ValueError, match="not a connector with credentials; known: anthropic"):
            parse_secret_env(bad)
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "tts.azure:AZ_KEY")
    assert get_settings().secret_env == {"tts.azure": ("AZ_KEY",)}
    monkeypatch.setenv("VOICEMESH_SECRET_ENV", "nope")
    with pytest.raises(ValidationError, match="VOICEMESH_SECRET_ENV"):
        SecretEnvSettings()


# --- run time (configs stored before the rule) -------------------------------------------------


async def test_stored_echo_prefix_is_not_resolved_at_run_time() -> None:
    pool = ConnectorPool()
    try:
        said = await spoken(pool, "echo", EchoOptions(prefix="${OPENAI_API_KEY}"))
    finally:
        await pool.aclose()
    assert said == "${OPENAI_API_KEY} hello."
    assert OPENAI_VALUE not in said


async def test_stored_scripted_reply_is_not_resolved_at_run_time() -> None:
    pool = ConnectorPool()
    try:
        said = await spoken(pool, "scripted", ScriptedOptions(replies=["${VM_CANARY_SECRET}"]))
    finally:
        await pool.aclose()
    assert said == "${VM_CANARY_SECRET}"


async def test_stored_credential_with_a_non_allowed_name_is_not_resolved() -> None:
    pool = ConnectorPool()
    options = OpenAILLMOptions(model="m", base_url="http://127.0.0.1:9/v1", api_key="${HOME}")
    try:
        with pytest.raises(SecretResolutionError, match="HOME is not allowed") as info:
            await pool.get("llm", "openai", options)
    finally:
        await pool.aclose()
    assert os.environ["HOME"] not in str(info.value)


async def test_allowed_credential_resolves_in_the_connector_only() -> None:
    pool = ConnectorPool()
    options = OpenAILLMOptions(
        model="m", base_url="http://127.0.0.1:9/v1", api_key="${OPENAI_API_KEY}"
    )
    try:
        conn: Any = await pool.get("llm", "openai", options)
        assert conn.options.api_key == OPENAI_VALUE
        assert options.api_key == "${OPENAI_API_KEY}"  # the config keeps the reference
    finally:
        await pool.aclose()


def test_daily_room_url_gives_the_same_error_whether_or_not_the_variable_exists(
    agent_json: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = credential_fields(DailyTransportOptions)["room_url"]
    errors = []
    for present in (True, False):
        if not present:
            monkeypatch.delenv(CANARY)
        with pytest.raises(SecretResolutionError) as info:
            resolve_credential("transport", "daily", spec, "${VM_CANARY_SECRET}")
        errors.append(str(info.value))
        data = copy.deepcopy(agent_json)
        data["connectors"]["transport"]["config"]["daily"] = {"room_url": "${VM_CANARY_SECRET}"}
        errors.append(issues_of(data)["connectors.transport.config.daily.room_url"])
    assert errors[0] == errors[2] and errors[1] == errors[3]
    assert "allowed: DAILY_ROOM_URL" in errors[0]
    # an allowed name that is not set says so (it is the operator's own variable)
    monkeypatch.delenv("DAILY_ROOM_URL", raising=False)
    with pytest.raises(SecretResolutionError, match="not set"):
        resolve_credential("transport", "daily", spec, "${DAILY_ROOM_URL}")
    # a room URL in clear is still fine
    assert resolve_credential("transport", "daily", spec, "https://x.daily.co/r").startswith(
        "https"
    )


# --- fuzz: hostile references in every string field of every connector -----------------------


def _string_fields(model: type[BaseModel]) -> dict[str, bool]:
    """field -> is a list of strings, for every str / list[str] field (optional or not)."""
    out: dict[str, bool] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if len(args) == 1 else ann
        if ann is str:
            out[name] = False
        elif typing.get_origin(ann) is list and typing.get_args(ann) == (str,):
            out[name] = True
    return out


CONNECTORS = [
    (stage, name, model)
    for stage, models in CONNECTOR_OPTIONS.items()
    for name, model in models.items()
    if _string_fields(model)
]
NAMES = st.sampled_from(
    [CANARY, "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DAILY_ROOM_URL", "DAILY_TOKEN", "HOME"]
) | st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,10}\Z")
HOSTILE = NAMES.map(lambda n: f"${{{n}}}") | st.text(max_size=8)


@st.composite
def hostile_options(draw: st.DrawFn) -> tuple[str, str, type[BaseModel], dict[str, Any]]:
    stage, name, model = draw(st.sampled_from(CONNECTORS))
    options: dict[str, Any] = {}
    for field, is_list in _string_fields(model).items():
        if is_list:
            options[field] = draw(st.lists(HOSTILE, min_size=1, max_size=3))
        else:
            options[field] = draw(HOSTILE)
    return stage, name, model, options


def _config(agent_json: dict, stage: str, name: str, options: dict[str, Any]) -> dict:
    data = copy.deepcopy(agent_json)
    data["connectors"][stage]["config"][name] = options  # kept aside: options need no chain
    return data


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in _strings(v)]
    return []


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=hostile_options())
def test_fuzz_no_env_var_leaks_outside_allowed_credential_fields(
    agent_json: dict, case: tuple[str, str, type[BaseModel], dict[str, Any]]
) -> None:
    stage, name, model, options = case
    env = {
        CANARY: CANARY_VALUE,
        "OPENAI_API_KEY": OPENAI_VALUE,
        "ANTHROPIC_API_KEY": "sk-ant-canary",
        "DAILY_ROOM_URL": "https://canary.daily.co/room",
        "DAILY_TOKEN": "daily-token-canary",
        "HOME": "/home/canary",
    }
    creds = credential_fields(model)
    with mock.patch.dict(os.environ, env):
        # push time: accepted only if every reference sits in a credential field, allowed
        try:
            cfg: AgentConfig | None = parse_agent_config(_config(agent_json, stage, name, options))
        except ConfigValidationError:
            cfg = None
        if cfg is not None:
            for field, value in options.items():
                if field not in creds:
                    assert not any(is_secret_ref(t) for t in _strings(value)), (field, value)
            assert f"${{{CANARY}}}" not in cfg.to_json().decode()  # the canary: never allowed
        # run time, whether or not it was accepted (a config stored before the rule)
        try:
            resolved = resolve_credentials(stage, name, model, options)
        except SecretResolutionError as exc:
            assert CANARY_VALUE not in str(exc)
            return
    for field, value in options.items():
        if field not in creds:
            assert resolved[field] == value  # never touched
    for text in _strings(resolved):
        assert CANARY_VALUE not in text and "/home/canary" not in text
    for field, spec in creds.items():
        if resolved.get(field) != options.get(field):  # resolved: an allowed name, by default
            assert options[field][2:-1] in spec.env
