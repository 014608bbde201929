"""Every JSON event of voicemesh, typed: one pydantic model per `type`, one union and one parse
function per channel. docs/wire-protocol.md describes the same events, and tests/test_events.py
fails when the two drift.

Channels:

- **caller** (`CallerEvent`, `parse_caller_event`): what the transport sends a caller, as WebSocket
  text frames, WebRTC data-channel messages or Daily app messages: `session`, `turn`,
  `user_stopped`, `transcript`, `hop`, `bot_started`, `turn_metrics`, `bot_done`, `interrupted`,
  `error`, `warning`, `tool_call`, `tool_result`, `hang_up`.
- **caller control** (`CallerControl`, `parse_caller_control`): what a caller sends the transport
  (`end`: hang up).
- **side** (`SideEvent`, `parse_side_event`): EVENT frames from the stages straight to
  `vm.transport.<sid>`, beside the flow: `transcript`, `hop`, `error`, `warning`, `tool_call`,
  `tool_result`, `hang_up`. The transport
  forwards each one to the caller.
- **ctl** (`CtlEvent`, `parse_ctl_event`): EVENT frames on `vm.ctl.<sid>`: `turn`, `interrupt`,
  `turn_ended`, `end`, `call_end`.

On the wire an event is a JSON object whose `type` names the model. Field names and order are
those of the JSON. An optional field (default None) is left out of the JSON when it is None, as
the dicts built inline before these models did; a field typed `float | None` with no default
(turn_metrics' phases, bot_started's latency) is always sent, as `null` when unknown. `wire()`
gives the JSON object as a dict, `wire_json()` its bytes (orjson, as before).

Receivers are lenient where they always were: unknown fields are ignored (a newer peer may add
one), and a stage may leave out what no receiver needs (a transcript's epoch and connector; the
frame header carries the turn's epoch). An unknown `type`, a missing required field or a value
of the wrong type is refused with `EventError`, which names the channel, the type and the field.
The transport and the stages drop such events with a warning; the call goes on.

Why pydantic models and not TypedDicts: the point is matching on the type (`case Transcript(role=
"user")`), which a TypedDict cannot do (it is a plain dict at run time), and validation on
receipt, which a TypedDict would need a TypeAdapter for anyway, at the same cost. The cost is
small where it matters: events are not audio. A transcript event built and dumped as a model
takes ~3.4 µs against ~0.4 µs as a dict literal with orjson, and the transport's forwarding of a
stage's event (parse, then dump) ~3.7 µs against ~0.6 µs for `orjson.loads` + `orjson.dumps`
(CPython 3.11, pydantic 2.14): a turn has some fifteen events, so under 0.1 ms a turn, against the
20 ms of every audio frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from voicemesh.config.stages import Stage
from voicemesh.errors import VoicemeshError


class EventError(VoicemeshError, ValueError):
    """A JSON event that is not one of its channel's: unknown type, missing or bad field."""


def _absent(value: object) -> bool:
    return value is None


def _optional() -> Any:
    """An optional field: None by default, and then not in the JSON at all."""
    return Field(default=None, exclude_if=_absent)


class Event(BaseModel):
    """One JSON event; subclasses fix `type`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str

    def wire(self) -> dict[str, Any]:
        """The JSON object, as a dict (for carriers that take one: WebRTC, Daily)."""
        return self.model_dump(mode="json")

    def wire_json(self) -> bytes:
        """The JSON object, as bytes."""
        return orjson.dumps(self.model_dump(mode="json"))


# --- to the caller (and, for transcript, hop and error, from the stages) ----------------------


class Session(Event):
    """The first event of a call: which session it is, and its config version."""

    type: Literal["session"] = "session"
    session_id: str
    version: int


class TurnStarted(Event):
    """`turn` to the caller: the VAD opened user turn `epoch`. With `continues`: the caller
    went on speaking after a pause where a speculative reply to turn `continues` may have
    started, so that turn goes on as `epoch` (the same utterance; nothing of its speculative
    reply is heard)."""

    type: Literal["turn"] = "turn"
    epoch: int
    continues: int | None = _optional()


class UserStopped(Event):
    """The caller's turn `epoch` ended: its audio went to STT. `reason` "max_utterance": the
    caller was still speaking when the turn reached VOICEMESH_MAX_UTTERANCE_S, so the turn was
    cut there (and is transcribed and answered); speech that goes on is dropped until the caller
    pauses."""

    type: Literal["user_stopped"] = "user_stopped"
    epoch: int
    reason: Literal["max_utterance"] | None = _optional()


class Transcript(Event):
    """What was said. From STT (role user: `final` false for an interim, true with `stt_ms` for
    the final one, and `speculative` / `discarded` when speculative STT was at work) and from the
    LLM (role assistant: one per sentence, by `index`; the first carries `ttft_ms`). Published to
    `vm.transport.<sid>` and forwarded to the caller."""

    type: Literal["transcript"] = "transcript"
    role: Literal["user", "assistant"]
    text: str
    epoch: int | None = _optional()
    index: int | None = _optional()
    final: bool | None = _optional()
    connector: str | None = _optional()
    ttft_ms: float | None = _optional()
    stt_ms: float | None = _optional()
    #: a final transcript made at the caller's pause, before the turn's end (speculative STT)
    speculative: bool | None = _optional()
    #: speculative transcripts of the turn thrown away because the caller went on
    discarded: int | None = _optional()
    #: a speculative transcript (final false) of the audio up to the pause mark with this seq:
    #: the transport judges from its words whether the turn is over. Empty text: no speculation
    #: was made at that mark (the engine was busy, or it failed).
    pause: int | None = _optional()


class Hop(Event):
    """A stage's timing for the turn's trace (TTS: time to the reply's first audio byte), and
    the connector that served it (the primary, or a fallback after a failover)."""

    type: Literal["hop"] = "hop"
    stage: Stage
    epoch: int | None = _optional()
    ttfb_ms: float
    connector: str | None = _optional()


class BotStarted(Event):
    """The reply's first audio went out; `latency_ms` is the voice-to-voice time."""

    type: Literal["bot_started"] = "bot_started"
    epoch: int
    latency_ms: float | None


class TurnMetrics(Event):
    """The turn's phases as the transport measured them (null: not observed)."""

    type: Literal["turn_metrics"] = "turn_metrics"
    epoch: int
    trace_id: str
    eou_ms: float | None
    stt_ms: float | None
    llm_ttft_ms: float | None
    tts_ttfb_ms: float | None
    first_audio_ms: float | None
    v2v_ms: float | None
    #: the turn's transcript was a speculative one (made at the caller's pause)
    stt_speculative: bool | None = _optional()
    #: speculative transcripts of the turn thrown away because the caller went on
    stt_discarded: int | None = _optional()
    #: time spent in tool calls before the first bot audio (parallel calls counted once);
    #: absent when no tool ran
    tool_ms: float | None = _optional()
    #: stage → the connector that served the turn there (the primary, or a fallback after a
    #: failover), as the stages reported it; a stage that reported none is left out
    connectors: dict[str, str] | None = _optional()


class BotDone(Event):
    """The reply of turn `epoch` has been played to its end."""

    type: Literal["bot_done"] = "bot_done"
    epoch: int


class Interrupted(Event):
    """A barge-in cut the reply of turn `epoch` off: drop the bot audio not yet played.
    `heard` is what was played of it."""

    type: Literal["interrupted"] = "interrupted"
    epoch: int
    heard: str


class ErrorEvent(Event):
    """Something failed. From a stage (with the turn's `epoch`); from the transport when no
    instance of `stage` took the turn's work, when a call fails or its session is gone, when a
    caller's message is refused, or when a WebSocket is refused (`retry_after_s` when rate
    limited). A stage's error carries a `code` and a short generic text (never a provider's
    words: those stay in the stage's logs)."""

    type: Literal["error"] = "error"
    error: str
    code: str | None = _optional()
    stage: Stage | None = _optional()
    epoch: int | None = _optional()
    retry_after_s: int | None = _optional()


class WarningEvent(Event):
    """Something was cut short, but the turn goes on and ends normally: `code` says what, for a
    client to match on; `message` says it in words. From the LLM stage: `reply_truncated` when a
    reply reached VOICEMESH_MAX_REPLY_CHARS and the rest was not generated."""

    type: Literal["warning"] = "warning"
    code: str
    message: str
    stage: Stage | None = _optional()
    epoch: int | None = _optional()


class ToolCallEvent(Event):
    """The LLM stage is calling tool `name` for turn `epoch` (`arguments` as the model wrote
    them, cut to VOICEMESH_TOOL_RESULT_MAX_CHARS)."""

    type: Literal["tool_call"] = "tool_call"
    epoch: int
    call_id: str
    name: str
    arguments: str


class ToolResultEvent(Event):
    """A tool call ended: `status` ok, error, timeout or cancelled (a barge-in), after
    `duration_ms`; `error` is a short reason (unknown tool, bad arguments, handler error,
    non-JSON output, no service, refused, timeout). The result itself goes to the LLM only."""

    type: Literal["tool_result"] = "tool_result"
    epoch: int
    call_id: str
    name: str
    status: Literal["ok", "error", "timeout", "cancelled"]
    duration_ms: float
    error: str | None = _optional()


class HangUp(Event):
    """The LLM called the built-in end_call in turn `epoch`: the call hangs up once that turn's
    reply has been played to its end (at once if it already has; not at all if the caller
    speaks over it: the barge-in cancels the turn, and the call goes on)."""

    type: Literal["hang_up"] = "hang_up"
    epoch: int


# --- vm.ctl.<sid> -------------------------------------------------------------------------------


class Turn(Event):
    """User turn `epoch` started: stages drop work of older turns. Without `epoch`, the frame's
    header epoch is meant."""

    type: Literal["turn"] = "turn"
    epoch: int | None = _optional()


class Interrupt(Event):
    """A barge-in over turn `interrupted`'s reply: stages cancel its work at once; `epoch` is
    the turn that follows (interrupted + 1)."""

    type: Literal["interrupt"] = "interrupt"
    epoch: int | None = _optional()
    interrupted: int | None = _optional()


class TurnEnded(Event):
    """The caller's turn `epoch` ended in the pause where a speculative reply may have started:
    that reply may now be stored in the context (the transport plays it from now on). Sent only
    for a turn that ended in a marked pause; without it, a speculative reply is never stored."""

    type: Literal["turn_ended"] = "turn_ended"
    epoch: int


class End(Event):
    """On vm.ctl: the session was deleted. From a caller: hang up."""

    type: Literal["end"] = "end"


class CallEnd(Event):
    """The session's call ended: stages drop its work, epoch and cached config."""

    type: Literal["call_end"] = "call_end"


# --- channels -----------------------------------------------------------------------------------

CallerEvent = Annotated[
    Session
    | TurnStarted
    | UserStopped
    | Transcript
    | Hop
    | BotStarted
    | TurnMetrics
    | BotDone
    | Interrupted
    | ErrorEvent
    | WarningEvent
    | ToolCallEvent
    | ToolResultEvent
    | HangUp,
    Field(discriminator="type"),
]
SideEvent = Annotated[
    Transcript | Hop | ErrorEvent | WarningEvent | ToolCallEvent | ToolResultEvent | HangUp,
    Field(discriminator="type"),
]
CtlEvent = Annotated[Turn | Interrupt | TurnEnded | End | CallEnd, Field(discriminator="type")]
CallerControl = End

#: channel name -> the models it carries (docs and tests walk these)
CHANNELS: dict[str, tuple[type[Event], ...]] = {
    "caller": (
        Session,
        TurnStarted,
        UserStopped,
        Transcript,
        Hop,
        BotStarted,
        TurnMetrics,
        BotDone,
        Interrupted,
        ErrorEvent,
        WarningEvent,
        ToolCallEvent,
        ToolResultEvent,
        HangUp,
    ),
    "caller control": (End,),
    "side": (Transcript, Hop, ErrorEvent, WarningEvent, ToolCallEvent, ToolResultEvent, HangUp),
    "ctl": (Turn, Interrupt, TurnEnded, End, CallEnd),
}

_CALLER: TypeAdapter[CallerEvent] = TypeAdapter(CallerEvent)
_SIDE: TypeAdapter[SideEvent] = TypeAdapter(SideEvent)
_CTL: TypeAdapter[CtlEvent] = TypeAdapter(CtlEvent)
_CONTROL: TypeAdapter[End] = TypeAdapter(End)

T = TypeVar("T")
Raw = bytes | str | Mapping[str, Any]


def _explain(channel: str, exc: ValidationError) -> str:
    models = CHANNELS[channel]
    problems = []
    for err in exc.errors(include_url=False):
        kind, loc = err["type"], [str(p) for p in err["loc"]]
        if kind == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag", "?")
            known = ", ".join(repr(m.model_fields["type"].default) for m in models)
            problems.append(f"unknown type {tag!r}; {channel} events are {known}")
        elif kind == "union_tag_not_found":
            problems.append("no 'type' field")
        elif kind in ("dict_type", "model_attributes_type", "model_type"):
            problems.append("not a JSON object")
        elif kind == "literal_error" and loc == ["type"]:
            problems.append(f"type must be {models[0].model_fields['type'].default!r}")
        elif kind == "json_invalid":
            problems.append(f"not JSON: {err['msg']}")
        else:
            where = ".".join(loc[1:] if len(models) > 1 and loc else loc) or "body"
            tag = f"{loc[0]} event" if len(models) > 1 and loc else "event"
            problems.append(f"{tag}: {where}: {err['msg']}")
    return f"bad {channel} event: " + "; ".join(problems)


def _parse(adapter: TypeAdapter[T], channel: str, data: Raw) -> T:
    try:
        if isinstance(data, bytes | str):
            return adapter.validate_json(data)
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise EventError(_explain(channel, exc)) from None


def parse_caller_event(data: Raw) -> CallerEvent:
    """An event the transport sends a caller, from its JSON (bytes, str) or a dict."""
    return _parse(_CALLER, "caller", data)


def parse_side_event(data: Raw) -> SideEvent:
    """An event a stage sent the transport on `vm.transport.<sid>`."""
    return _parse(_SIDE, "side", data)


def parse_ctl_event(data: Raw) -> CtlEvent:
    """An event on `vm.ctl.<sid>`."""
    return _parse(_CTL, "ctl", data)


def parse_caller_control(data: Raw) -> CallerControl:
    """A control message a caller sends the transport (`{"type": "end"}`)."""
    if isinstance(data, bytes | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"bad caller control event: not JSON: {exc}") from None
    # one model, no union: its `type` has a default, so a missing one must be refused here
    if isinstance(data, Mapping) and "type" not in data:
        raise EventError("bad caller control event: no 'type' field")
    return _parse(_CONTROL, "caller control", data)


__all__ = [
    "CHANNELS",
    "BotDone",
    "BotStarted",
    "CallEnd",
    "CallerControl",
    "CallerEvent",
    "CtlEvent",
    "End",
    "ErrorEvent",
    "Event",
    "EventError",
    "HangUp",
    "Hop",
    "Interrupt",
    "Interrupted",
    "Session",
    "SideEvent",
    "ToolCallEvent",
    "ToolResultEvent",
    "Transcript",
    "Turn",
    "TurnEnded",
    "TurnMetrics",
    "TurnStarted",
    "UserStopped",
    "WarningEvent",
    "parse_caller_control",
    "parse_caller_event",
    "parse_ctl_event",
    "parse_side_event",
]
