"""The names of the pipeline's roles, as one enum.

A `Stage` is a `StrEnum`: `Stage.STT == "stt"`, f-strings and `str.join` give the bare name, and a
member serializes to JSON as its value, so subjects (`vm.stt.<sid>`), Valkey keys, metrics labels
and config JSON keep the names they always had. The transport is a role (it receives on
`vm.transport.<sid>` and has its own options in a config) but not a processing stage:
`PROCESSING` lists the three that are.

Two differences from a bare string remain, so mind them: `repr(Stage.STT)` is
`<Stage.STT: 'stt'>` (format a member with `{stage}`, or use `.value` where `!r` is wanted), and
orjson refuses a `str` subclass as a dict key, so a dict that may become JSON is keyed by bare
names (CONNECTOR_OPTIONS is). As values, members serialize as their names.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    TRANSPORT = "transport"
    STT = "stt"
    LLM = "llm"
    TTS = "tts"


#: every role a flow may name, in flow order
STAGES: tuple[Stage, ...] = tuple(Stage)
#: the stage services (stt, llm, tts): everything but the transport
PROCESSING: tuple[Stage, ...] = (Stage.STT, Stage.LLM, Stage.TTS)
