"""Property tests of the config models: whatever JSON comes in, `parse_agent_config` either returns
an AgentConfig that survives `to_json()` and a second parse unchanged, or raises
ConfigValidationError naming every problem by a non-empty path and message. Nothing else escapes:
no TypeError out of a validator, no config that parses but cannot be stored or read back.

Three sources of input: arbitrary JSON-ish values; the default agent (config/agent-config.json)
mutated (keys dropped, types changed, unknown keys, stages and connectors inserted, streams and
edges swapped); and valid configs built from the connector options models themselves.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.config_strategies import (
    AGENT,
    WEBSOCKET,
    config_like,
    json_values,
    keyed_options,
    mutated_agent,
    set_at,
    valid_configs,
)
from voicemesh.config.connectors import STAGES
from voicemesh.config.models import AgentConfig, ConfigValidationError, parse_agent_config

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(data: Any) -> AgentConfig | None:
    """The property: a config that round-trips, or a ConfigValidationError with named issues."""
    try:
        cfg = parse_agent_config(data)
    except ConfigValidationError as exc:
        assert exc.issues, "ConfigValidationError without issues"
        for issue in exc.issues:
            assert isinstance(issue.path, str) and issue.path, issue
            assert isinstance(issue.msg, str) and issue.msg.strip(), issue
        assert str(exc)
        return None
    assert isinstance(cfg, AgentConfig)
    raw = cfg.to_json()  # must not raise: this is what the store writes to Valkey
    assert isinstance(raw, bytes)
    again = parse_agent_config(raw)  # and what every stage reads back
    assert again == cfg, (cfg, again)
    assert again.to_json() == raw
    # The typed options of every connector in every chain are readable.
    for stage in STAGES:
        if stage in cfg.connectors or stage == "transport":
            for name in cfg.stage(stage).chain:
                assert cfg.options(stage, name) == again.options(stage, name)
    return cfg


# --- arbitrary JSON-ish values ---------------------------------------------------------------


@FUZZ
@given(json_values)
def test_arbitrary_json_values(data: Any) -> None:
    check(data)


@FUZZ
@given(config_like)
def test_config_shaped_values(data: Any) -> None:
    check(data)


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_raw_bytes_and_text(data: bytes | str) -> None:
    check(data)


@pytest.mark.parametrize(
    "data",
    [None, 0, 1.5, float("nan"), "", b"", "null", "[]", b"{}", [], {}, "{", "\ud800", [AGENT]],
    ids=repr,
)
def test_degenerate_inputs_are_validation_errors(data: Any) -> None:
    assert check(data) is None


# --- mutations of the default agent ---------------------------------------------------------


@FUZZ
@given(mutated_agent())
# Known findings, kept as fixed examples so they are tried on every run:
@example(set_at(("connectors", "llm", "fallback"), 5))  # TypeError in the seed-form check
@example(set_at(("connectors", "llm", "fallback"), [{}]))  # unhashable in the seed-form check
@example(set_at(("connectors", "llm", "primary"), ["smollm2"]))  # unhashable primary
@example(set_at((*WEBSOCKET, "energy_threshold_db"), float("-inf")))  # stored as null
@example(set_at((*WEBSOCKET, "energy_threshold_db"), -(2**70)))  # orjson cannot write it
# a chain connector whose required options (model, api_key) are nowhere: parses, then
# cfg.options("llm", "anthropic") raises pydantic's ValidationError in the stage
@example(set_at(("connectors", "llm", "fallback"), ["anthropic"]))
def test_mutations_of_the_default_agent(data: dict[str, Any]) -> None:
    check(data)


# --- valid configs from the options models ---------------------------------------------------


@FUZZ
@given(valid_configs())
def test_valid_configs_round_trip(data: dict[str, Any]) -> None:
    cfg = parse_agent_config(data)  # valid by construction: must not raise
    again = parse_agent_config(cfg.to_json())
    assert again == cfg
    assert AgentConfig.model_validate_json(cfg.to_json()) == cfg
    for stage, sc in data["connectors"].items():
        chain = [sc["primary"], *sc.get("fallback", [])]
        assert again.stage(stage).chain == chain
        options = keyed_options(sc)
        for name in chain:
            opts = again.options(stage, name)
            assert opts == cfg.options(stage, name)
            for key, value in options.get(name, {}).items():  # every option given comes back
                got = getattr(opts, key)
                if isinstance(value, float):
                    assert math.isclose(got, value) or got == value, (stage, name, key, got)
                else:
                    assert got == value, (stage, name, key, got)
