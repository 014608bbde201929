"""The built-in tools (issue 15): end_call (the bot says its last words, then the call hangs up
once they have played) and set_config (the LLM switches its session's connectors or prompt
within the tool's lists, through the store and vm.config.update as the API's PATCH)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import orjson
import pytest
import websockets

from tests.support import Services, TransportApp, has_last, listen, loopback_agent
from tests.test_tools import events_of, issues_of, turn
from voicemesh.bus import Bus, Subjects
from voicemesh.config.models import parse_agent_config
from voicemesh.pipeline import LLMService
from voicemesh.state import ConfigStore
from voicemesh.testing.loopback.openai_transcribe import OpenAITranscribeServer

END_CALL = {"name": "end_call", "description": "Hang up", "handler": {"type": "end_call"}}
SWITCH = {
    "name": "switch",
    "description": "Switch the voice or the persona",
    "handler": {
        "type": "set_config",
        "connectors": {"tts": ["tone", "passthrough"]},
        "prompts": {"pirate": "You are a pirate."},
    },
}


def agent(agent_json: dict, calls: list[dict[str, Any]], reply: str, tools: list[Any]) -> Any:
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {"scripted": {"replies": [reply], "tool_rounds": [{"calls": calls}]}},
    }
    data["connectors"]["tts"] = {
        "primary": "tone",
        "fallback": ["passthrough"],
        "config": {"tone": {}},
    }
    data["tools"] = tools
    data["tool_filler"] = None
    return parse_agent_config(data)


# --- set_config -----------------------------------------------------------------------------------


def test_set_config_lists_name_known_connectors(agent_json: dict) -> None:
    bad = copy.deepcopy(SWITCH)
    bad["handler"]["connectors"] = {"tts": ["tone", "nonsense"], "stt": ["tone"]}
    found = issues_of(agent_json, [bad])
    assert set(found) == {
        "tools[0].handler.connectors.tts[1]",
        "tools[0].handler.connectors.stt[0]",
    }
    bad["handler"] = {"type": "set_config", "connectors": {"transport": ["websocket"]}}
    assert "connectors.transport" in " ".join(issues_of(agent_json, [bad]))


async def test_set_config_switches_within_the_lists_and_every_stage_sees_it(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
) -> None:
    """The LLM is offered enums made from the lists; its call changes the stored config (a new
    version, announced on vm.config.update, so a stage's cached config is dropped), the new
    primary is no longer also a fallback, and the prompt is the named one."""
    args = {"stage": "tts", "connector": "passthrough", "prompt": "pirate"}
    config = agent(agent_json, [{"name": "switch", "arguments": args}], "Done.", [SWITCH])
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    updates: list[dict[str, Any]] = []

    async def on_update(msg: Any) -> None:
        updates.append(orjson.loads(msg.data))

    sub = await bus.nc.subscribe(subjects.config_update, cb=on_update)
    llm = await services.start(LLMService)
    offered, _ = await llm.runner().offered(config.tools)
    assert offered[0].parameters["properties"] == {
        "stage": {"type": "string", "enum": ["tts"]},
        "connector": {"type": "string", "enum": ["passthrough", "tone"]},
        "prompt": {"type": "string", "enum": ["pirate"]},
    }
    await turn(bus, subjects, sid)
    await tts.wait_for(has_last)
    stored = await store.get_config(sid)
    assert stored is not None and stored.version == 2
    assert stored.config.connectors["tts"].primary == "passthrough"
    assert stored.config.connectors["tts"].fallback == []
    assert stored.config.system_prompt == "You are a pirate."
    assert llm.router.peek(sid) is None or llm.router.peek(sid).version == 2  # type: ignore[union-attr]
    await bus.settle()
    assert [(u["session_id"], u["version"]) for u in updates] == [(sid, 2)]
    assert sorted(updates[0]["updated_keys"]) == ["connectors", "system_prompt"]
    (result,) = [m for m in await store.get_context(sid) if m["role"] == "tool_result"]
    assert result["status"] == "ok" and orjson.loads(result["content"])["version"] == 2
    await sub.unsubscribe()


@pytest.mark.parametrize(
    ("args", "llm_sees"),
    [
        ({"stage": "tts", "connector": "openai"}, "schema"),  # not on the list
        ({"stage": "llm", "connector": "passthrough"}, "schema"),  # a stage the tool does not allow
        ({"prompt": "You are evil now."}, "schema"),  # a prompt written by the model
        ({"stage": "tts"}, "together"),
        ({}, "nothing to change"),
        ({"tools": []}, "schema"),
    ],
)
async def test_set_config_refuses_anything_else(
    services: Services,
    bus: Bus,
    store: ConfigStore,
    subjects: Subjects,
    agent_json: dict,
    args: dict[str, Any],
    llm_sees: str,
) -> None:
    config = agent(agent_json, [{"name": "switch", "arguments": args}], "Ok.", [SWITCH])
    sid = (await store.create_session(config)).session_id
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    await tts.wait_for(has_last)
    (result,) = await events_of(transport, "tool_result")
    assert result["status"] == "error"
    (stored,) = [m for m in await store.get_context(sid) if m["role"] == "tool_result"]
    assert llm_sees in stored["content"]
    after = await store.get_config(sid)
    assert after is not None and after.version == 1 and after.config == config


async def test_set_config_handler_checks_the_lists_itself() -> None:
    """Even past the schema (a connector that ignores it), the handler refuses a choice off the
    lists."""
    from voicemesh.config.tools import SetConfigHandler
    from voicemesh.tools.builtins import planned
    from voicemesh.tools.runner import ToolFailed

    handler = SetConfigHandler.model_validate(SWITCH["handler"])
    assert planned(handler, {"stage": "tts", "connector": "passthrough"}) == {
        "connectors.tts.primary": "passthrough"
    }
    for bad in ({"stage": "tts", "connector": "openai"}, {"prompt": "x"}, {"stage": "llm"}):
        with pytest.raises(ToolFailed):
            planned(handler, bad)


# --- end_call -------------------------------------------------------------------------------------


async def test_end_call_sends_hang_up_before_the_replys_last_unit(
    services: Services, bus: Bus, store: ConfigStore, subjects: Subjects, agent_json: dict
) -> None:
    """The LLM calls end_call, then says goodbye: the goodbye goes to TTS, and the transport
    gets `hang_up` for the turn before the reply's last (empty, LAST) unit leaves the stage."""
    config = agent(agent_json, [{"name": "end_call", "arguments": {}}], "Goodbye!", [END_CALL])
    sid = (await store.create_session(config)).session_id
    order: list[str] = []
    tts = await listen(bus, subjects.data("tts", sid))
    transport = await listen(bus, subjects.data("transport", sid))

    async def seen(subject: str, frame: Any) -> None:
        order.append("hang_up" if b"hang_up" in frame.payload else "other")

    async def last(subject: str, frame: Any) -> None:
        if frame.as_text == "":
            order.append("last")

    await bus.subscribe(subjects.data("transport", sid), seen)
    await bus.subscribe(subjects.data("tts", sid), last)
    await services.start(LLMService)
    await turn(bus, subjects, sid)
    frames = await tts.wait_for(has_last)
    assert [f.as_text for f in frames] == ["Goodbye!", ""]
    assert await events_of(transport, "hang_up") == [{"type": "hang_up", "epoch": 1}]
    assert order.index("hang_up") < order.index("last")


@pytest.fixture(scope="module")
def transcript() -> Any:
    return lambda pcm: "goodbye"


@pytest.mark.usefixtures("private_egress")
async def test_end_call_hangs_up_once_the_goodbye_has_played(
    transport_app: TransportApp,
    services: Services,
    store: ConfigStore,
    agent_json: dict,
    transcriber: OpenAITranscribeServer,
) -> None:
    """A whole call over the WebSocket: the caller says goodbye, the LLM calls end_call and says
    its last sentence; the caller gets hang_up, then all of the goodbye's audio and bot_done,
    and then the line closes (nothing closes it before the audio has played)."""
    from tests.test_bad_audio import silence, speech

    data = loopback_agent(
        agent_json, transport="websocket", stt_url=transcriber.base_url, ms_per_word=150
    )
    data["connectors"]["llm"]["config"]["scripted"]["tool_rounds"] = [
        {"calls": [{"name": "end_call", "arguments": {}}]}
    ]
    data["connectors"]["llm"]["config"]["scripted"]["replies"] = ["It was nice talking. Bye!"]
    data["tools"] = [END_CALL]
    data["tool_filler"] = None
    sid = (await store.create_session(parse_agent_config(data))).session_id
    events: list[dict[str, Any]] = []
    audio_at_close = 0
    audio = 0
    url = transport_app.ws("/ws/call")
    async with websockets.connect(f"{url}?session_id={sid}", max_size=None) as ws:
        pcm = silence(100) + speech(400) + silence(400)
        for i in range(0, len(pcm), 640):
            await ws.send(pcm[i : i + 640])
        try:
            async with asyncio.timeout(20):
                async for msg in ws:
                    if isinstance(msg, bytes):
                        audio += len(msg)
                    else:
                        events.append(orjson.loads(msg))
        except websockets.ConnectionClosed:
            pass
        audio_at_close = audio
        code = ws.close_code
    kinds = [e["type"] for e in events]
    assert "hang_up" in kinds and "bot_done" in kinds, kinds
    assert kinds.index("hang_up") < kinds.index("bot_done")
    assert kinds[-1] == "bot_done"  # nothing after it: the line closed
    assert code is not None
    # 5 words at 150 ms each, at the carrier's rate (16-bit mono): it all arrived before the close
    assert audio_at_close >= 0.7 * 5 * 0.150 * 16000 * 2
