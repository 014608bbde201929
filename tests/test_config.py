"""agent-config.json: the default agent validates; every problem is reported with its JSON path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from voicemesh.cli import main
from voicemesh.config.connectors import (
    EchoOptions,
    ScriptedOptions,
    SmolLM2Options,
    TwilioTransportOptions,
    WebRTCTransportOptions,
    WebSocketTransportOptions,
)
from voicemesh.config.models import (
    AgentConfig,
    ConfigValidationError,
    dotted,
    parse_agent_config,
)
from voicemesh.config.secrets import is_secret_key, is_secret_ref

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILE = ROOT / "config" / "agent-config.json"


def issues_of(data: Any) -> dict[str, str]:
    """path -> message (messages of one path joined) of a config that must be invalid."""
    with pytest.raises(ConfigValidationError) as info:
        parse_agent_config(data)
    out: dict[str, str] = {}
    for issue in info.value.issues:
        out[issue.path] = f"{out[issue.path]} | {issue.msg}" if issue.path in out else issue.msg
    # The exception's own message names every path too (it is what a log line shows).
    for path in out:
        assert path in str(info.value)
    return out


def mutated(agent_json: dict, fn: Any) -> dict:
    data = copy.deepcopy(agent_json)
    fn(data)
    return data


# --- the default agent -----------------------------------------------------------------------


def test_default_agent_config_validates(agent_json: dict) -> None:
    cfg = parse_agent_config(AGENT_FILE.read_bytes())
    assert isinstance(cfg, AgentConfig)
    assert cfg.system_prompt == agent_json["system_prompt"]
    assert cfg.pipeline.name == agent_json["pipeline"]["name"]
    assert [(e.source, e.target, e.stream) for e in cfg.pipeline.flow] == [
        ("transport", "stt", "audio"),
        ("stt", "llm", "text"),
        ("llm", "tts", "text"),
        ("tts", "transport", "audio"),
    ]
    llm = agent_json["connectors"]["llm"]
    assert cfg.stage("llm").chain == [llm["primary"], *llm.get("fallback", [])]
    # Every connector of every chain gets typed options: the file's values over the defaults.
    for stage, sc in agent_json["connectors"].items():
        for name in [sc["primary"], *sc.get("fallback", [])]:
            opts = cfg.options(stage, name)
            given = sc.get("config", {}).get(name, {})
            assert opts.model_dump(include=set(given)) == given, (stage, name)
    opts = cfg.options("llm", "smollm2")
    assert isinstance(opts, SmolLM2Options)
    assert opts.top_p == SmolLM2Options().top_p  # a default where the file gives none
    assert isinstance(cfg.options("llm", "scripted"), ScriptedOptions)
    # a call takes the options of the endpoint it came in on, listed in the chain or not
    web = cfg.transport_options("websocket")
    assert isinstance(web, WebSocketTransportOptions) and web.turn == "smart_turn"
    assert web.end_of_turn_silence_ms == 200  # smart-turn's short pause, by default
    rtc = cfg.transport_options("webrtc")
    assert isinstance(rtc, WebRTCTransportOptions) and rtc.vad == "silero"
    assert cfg.transport_options("twilio") == TwilioTransportOptions()
    # The same result from bytes, str and parsed JSON.
    assert parse_agent_config(AGENT_FILE.read_text()) == cfg
    assert parse_agent_config(agent_json) == cfg


def test_next_hop_follows_the_flow(agent_json: dict) -> None:
    cfg = parse_agent_config(agent_json)
    assert cfg.next_hop("transport", "audio") == "stt"
    assert cfg.next_hop("stt", "text") == "llm"
    assert cfg.next_hop("llm", "text") == "tts"
    assert cfg.next_hop("tts", "audio") == "transport"
    assert cfg.next_hop("llm", "audio") is None


def test_to_json_roundtrips_with_aliases(agent_json: dict) -> None:
    cfg = parse_agent_config(agent_json)
    data = orjson.loads(cfg.to_json())
    assert data["pipeline"]["flow"][0] == {"from": "transport", "to": "stt", "stream": "audio"}
    assert parse_agent_config(cfg.to_json()) == cfg


def test_transport_connectors_may_be_omitted(agent_json: dict) -> None:
    cfg = parse_agent_config(mutated(agent_json, lambda d: d["connectors"].pop("transport")))
    assert cfg.stage("transport").primary == "websocket"
    assert cfg.options("transport", "websocket") == WebSocketTransportOptions()


def test_dotted_paths() -> None:
    assert dotted(["connectors", "llm", "fallback", 1]) == "connectors.llm.fallback[1]"
    assert dotted(["pipeline", "flow", 0, "from"]) == "pipeline.flow[0].from"
    assert dotted([]) == "<root>"


# --- semantic errors, each named by path -----------------------------------------------------


def test_unknown_stage_in_connectors(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["connectors"].__setitem__("vision", {"primary": "x"}))
    issues = issues_of(data)
    assert list(issues) == ["connectors.vision"]
    assert "unknown stage 'vision'" in issues["connectors.vision"]


def test_unknown_stage_in_flow(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["pipeline"]["flow"][0].__setitem__("from", "camera"))
    issues = issues_of(data)
    assert "pipeline.flow[0].from" in issues
    assert "camera" in issues["pipeline.flow[0].from"]


def test_unknown_primary_connector(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["connectors"]["tts"].__setitem__("primary", "nope"))
    issues = issues_of(data)
    assert "connectors.tts.primary" in issues
    assert not any(p.startswith("connectors.tts.config.nope") for p in issues)
    msg = issues["connectors.tts.primary"]
    assert "'nope'" in msg and "piper" in msg and "tone" in msg


def test_unknown_fallback_connector(agent_json: dict) -> None:
    data = mutated(
        agent_json, lambda d: d["connectors"]["llm"].__setitem__("fallback", ["scripted", "nope"])
    )
    issues = issues_of(data)
    assert list(issues) == ["connectors.llm.fallback[1]"]
    assert "'nope'" in issues["connectors.llm.fallback[1]"]


def test_connector_of_another_stage_is_unknown(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["connectors"]["stt"].__setitem__("primary", "piper"))
    issues = issues_of(data)
    assert "connectors.stt.primary" in issues
    assert "unknown stt connector 'piper'" in issues["connectors.stt.primary"]


def test_connector_twice_in_chain(agent_json: dict) -> None:
    data = mutated(
        agent_json, lambda d: d["connectors"]["llm"].__setitem__("fallback", ["smollm2"])
    )
    issues = issues_of(data)
    assert "connectors.llm.fallback" in issues
    assert "twice" in issues["connectors.llm.fallback"]


def test_stream_that_does_not_fit_edge(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["pipeline"]["flow"][1].__setitem__("stream", "audio"))
    issues = issues_of(data)
    assert list(issues) == ["pipeline.flow[1].stream"]
    assert "does not fit" in issues["pipeline.flow[1].stream"]


def test_text_edge_into_transport_does_not_fit(agent_json: dict) -> None:
    # llm -> transport carries text, but transport consumes audio.
    def fn(d: dict) -> None:
        d["pipeline"]["flow"] = [
            {"from": "transport", "to": "stt", "stream": "audio"},
            {"from": "stt", "to": "llm", "stream": "text"},
            {"from": "llm", "to": "transport", "stream": "text"},
        ]

    issues = issues_of(mutated(agent_json, fn))
    assert "pipeline.flow[2].stream" in issues


def test_flow_that_does_not_return_to_transport(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["pipeline"]["flow"].pop())
    issues = issues_of(data)
    assert list(issues) == ["pipeline.flow"]
    assert "transport back to transport" in issues["pipeline.flow"]
    assert "'tts'" in issues["pipeline.flow"]


def test_flow_that_does_not_start_at_transport(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["pipeline"]["flow"].pop(0))
    issues = issues_of(data)
    assert "pipeline.flow" in issues
    # The edges that are not on the transport -> transport path are named one by one.
    assert {"pipeline.flow[0]", "pipeline.flow[1]", "pipeline.flow[2]"} <= set(issues)


def test_edge_off_the_path_is_named(agent_json: dict) -> None:
    # A valid loop transport -> stt -> llm -> tts -> transport plus an llm text edge would be a
    # second text edge out of llm; a stray stt edge is caught as a duplicate too.
    data = mutated(
        agent_json,
        lambda d: d["pipeline"]["flow"].append({"from": "stt", "to": "tts", "stream": "text"}),
    )
    issues = issues_of(data)
    assert "pipeline.flow[4]" in issues
    assert "second text edge out of stt" in issues["pipeline.flow[4]"]


def test_stage_in_flow_without_connectors(agent_json: dict) -> None:
    data = mutated(agent_json, lambda d: d["connectors"].pop("tts"))
    issues = issues_of(data)
    assert list(issues) == ["connectors.tts"]
    assert "no connectors" in issues["connectors.tts"]


def test_empty_connectors(agent_json: dict) -> None:
    issues = issues_of(mutated(agent_json, lambda d: d.__setitem__("connectors", {})))
    assert "connectors" in issues


def test_secret_in_clear_under_connector_config(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"]["config"].__setitem__(
            "openai", {"model": "m", "api_key": "sk-abc123"}
        ),
    )
    issues = issues_of(data)
    path = "connectors.llm.config.openai.api_key"
    assert path in issues
    assert "secret written in clear" in issues[path]
    assert "${ENV}" in issues[path]
    # The secret's value itself is never echoed back in the error.
    assert all("sk-abc123" not in m for m in issues.values())


def test_secret_reference_is_not_reported_as_clear(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"]["config"].__setitem__(
            "openai", {"model": "m", "api_key": "${OPENAI_API_KEY}"}
        ),
    )
    parse_agent_config(data)  # a reference to the conventional variable is what a key should be


def test_secret_in_clear_in_seed_form(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"].update(
            {"primary": "openai", "config": {"model": "m", "api_key": "sk-live-1"}}
        ),
    )
    issues = issues_of(data)
    assert "secret written in clear" in issues["connectors.llm.config.openai.api_key"]


@pytest.mark.parametrize(
    ("stage", "name", "key", "value"),
    [
        ("llm", "smollm2", "max_tokens", 0),
        ("llm", "smollm2", "temperature", 3.5),
        ("llm", "smollm2", "max_tokens", "many"),
        ("llm", "scripted", "replies", []),
        ("tts", "piper", "voice", "alice"),
        ("stt", "whisper", "model", "large-v3"),
        ("transport", "websocket", "vad", "silero-xl"),
        ("transport", "websocket", "end_of_turn_silence_ms", 10),
    ],
)
def test_bad_connector_option_values(
    agent_json: dict, stage: str, name: str, key: str, value: Any
) -> None:
    data = mutated(
        agent_json, lambda d: d["connectors"][stage]["config"][name].__setitem__(key, value)
    )
    issues = issues_of(data)
    assert list(issues) == [f"connectors.{stage}.config.{name}.{key}"]


def test_unknown_connector_option(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"]["config"]["smollm2"].__setitem__("max_token", 5),
    )
    issues = issues_of(data)
    assert list(issues) == ["connectors.llm.config.smollm2.max_token"]


def test_every_problem_is_reported_at_once(agent_json: dict) -> None:
    def fn(d: dict) -> None:
        d["connectors"]["tts"]["primary"] = "nope"
        d["connectors"]["llm"]["config"]["smollm2"]["max_tokens"] = -1
        d["connectors"]["stt"]["config"]["whisper"]["token"] = "abc"

    issues = issues_of(mutated(agent_json, fn))
    assert {
        "connectors.tts.primary",
        "connectors.llm.config.smollm2.max_tokens",
        "connectors.stt.config.whisper.token",
    } <= set(issues)


def test_structural_errors_name_paths(agent_json: dict) -> None:
    assert "pipeline" in issues_of(mutated(agent_json, lambda d: d.pop("pipeline")))
    issues = issues_of(mutated(agent_json, lambda d: d["pipeline"]["flow"][2].pop("stream")))
    assert "pipeline.flow[2].stream" in issues
    issues = issues_of(mutated(agent_json, lambda d: d.__setitem__("extra_field", 1)))
    assert "extra_field" in issues
    issues = issues_of(
        mutated(agent_json, lambda d: d["pipeline"]["flow"][0].__setitem__("stream", "video"))
    )
    assert "pipeline.flow[0].stream" in issues


def test_not_json() -> None:
    issues = issues_of(b"{not json")
    assert list(issues) == ["<root>"]
    assert "not valid JSON" in issues["<root>"]


# --- the seed form: one stage-level `config` for the primary ---------------------------------


def test_seed_form_maps_to_primary(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"].update(
            primary="smollm2", fallback=["echo"], config={"max_tokens": 42, "temperature": 0.1}
        ),
    )
    cfg = parse_agent_config(data)
    opts = cfg.options("llm", "smollm2")
    assert isinstance(opts, SmolLM2Options)
    assert (opts.max_tokens, opts.temperature) == (42, 0.1)
    assert cfg.stage("llm").config == {"smollm2": {"max_tokens": 42, "temperature": 0.1}}
    # The fallback gets its defaults.
    assert cfg.options("llm", "echo") == EchoOptions()


def test_seed_form_bad_value_is_named_under_primary(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"].update(
            primary="smollm2", fallback=[], config={"max_tokens": 0}
        ),
    )
    assert list(issues_of(data)) == ["connectors.llm.config.smollm2.max_tokens"]


def test_seed_form_for_options_that_are_objects(agent_json: dict) -> None:
    # echo's only option is a string: the seed form is still read as the primary's options.
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"].update(
            primary="echo", fallback=[], config={"prefix": "Q"}
        ),
    )
    assert parse_agent_config(data).options("llm", "echo") == EchoOptions(prefix="Q")


def test_options_for_a_known_connector_outside_the_chain_are_kept(agent_json: dict) -> None:
    """Options of a known connector that is not (or no longer) in the chain are kept and still
    validated, so a live swap back to it needs no re-typing."""
    data = mutated(
        agent_json, lambda d: d["connectors"]["llm"]["config"].__setitem__("echo", {"prefix": "x"})
    )
    cfg = parse_agent_config(data)
    assert cfg.connectors["llm"].config["echo"] == {"prefix": "x"}
    bad = mutated(
        agent_json, lambda d: d["connectors"]["llm"]["config"].__setitem__("echo", {"prefx": "x"})
    )
    assert list(issues_of(bad)) == ["connectors.llm.config.echo.prefx"]


def test_options_for_an_unknown_connector_name_the_path(agent_json: dict) -> None:
    data = mutated(
        agent_json,
        lambda d: d["connectors"]["llm"]["config"].__setitem__("gpt9", {"model": "x"}),
    )
    issues = issues_of(data)
    assert list(issues) == ["connectors.llm.config.gpt9"]
    assert "unknown llm connector" in issues["connectors.llm.config.gpt9"]


def test_dropping_a_fallback_keeps_its_options(agent_json: dict) -> None:
    """Replacing fallback ["scripted"] by ["echo"] is valid: scripted's options stay, unused, and
    smollm2's options are not misread as the seed's single-object form."""
    data = mutated(agent_json, lambda d: d["connectors"]["llm"].__setitem__("fallback", ["echo"]))
    cfg = parse_agent_config(data)
    assert cfg.stage("llm").chain == ["smollm2", "echo"]
    assert (
        cfg.options("llm", "smollm2").max_tokens
        == agent_json["connectors"]["llm"]["config"]["smollm2"]["max_tokens"]
    )


# --- CLI ------------------------------------------------------------------------------------


def test_cli_config_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = orjson.loads(capsys.readouterr().out)
    assert schema["type"] == "object"
    assert {"pipeline", "connectors", "system_prompt"} <= set(schema["properties"])
    assert set(schema["required"]) >= {"pipeline", "connectors"}
    edge = schema["$defs"]["FlowEdge"]
    assert {"from", "to", "stream"} <= set(edge["properties"])
    assert edge["properties"]["stream"]["enum"] == ["audio", "text"]


def test_cli_config_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(AGENT_FILE)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out


def test_cli_config_validate_invalid(
    tmp_path: Path, agent_json: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    def fn(d: dict) -> None:
        d["connectors"]["tts"]["primary"] = "nope"
        d["connectors"]["llm"]["config"]["smollm2"]["max_tokens"] = 0

    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps(mutated(agent_json, fn)))
    assert main(["config", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "invalid" in err
    assert "connectors.tts.primary:" in err
    assert "connectors.llm.config.smollm2.max_tokens:" in err


def test_cli_config_validate_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["config", "validate", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_config_validate_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "validate", str(tmp_path / "nope.json")]) == 1
    assert "nope.json" in capsys.readouterr().err


# --- secrets --------------------------------------------------------------------------------


def test_secret_ref_and_key_detection() -> None:
    assert is_secret_ref("${OPENAI_API_KEY}")
    assert not is_secret_ref("$OPENAI_API_KEY")
    assert not is_secret_ref("prefix ${X}")
    assert not is_secret_ref("${1BAD}")
    assert not is_secret_ref(5)
    for key in ("api_key", "API-KEY", "apikey", "openai_api_key", "password", "auth_token"):
        assert is_secret_key(key), key
    for key in ("max_tokens", "model", "voice", "keyword", "token_budget"):
        assert not is_secret_key(key), key


@pytest.mark.parametrize("key", ["secret_key", "aws_secret_access_key", "subscription_key"])
def test_common_credential_names_are_secret_keys(key: str) -> None:
    """AWS's secret_key / secret_access_key and Azure's subscription_key are credentials too."""
    assert is_secret_key(key)
