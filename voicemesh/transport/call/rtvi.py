"""RTVI, the protocol pipecat's client SDKs speak (`@pipecat-ai/client-js` and its transports, the
React, iOS and Android clients, the prebuilt UI), on any carrier with a message channel: the WebRTC
data channel and Daily app messages. The message models are pipecat's own
(`pipecat.processors.frameworks.rtvi.models`), so what goes out is what pipecat's server sends.

A call speaks RTVI once its client has sent `client-ready` (answered with `bot-ready`); from then
on its caller events (voicemesh/bus/events.py) go out as RTVI messages (`to_rtvi`): turns as
user/bot speaking, transcripts as `user-transcription`, each reply sentence as `bot-llm-text`,
`bot-tts-text` and `bot-output`, turn metrics as `metrics`, errors as `error`, and our events with
no RTVI type (session, hop, interrupted, warning) as `server-message` carrying the event itself.
A client that never sends `client-ready` (the page at /, a headless caller) keeps getting our own
JSON events and never sees an RTVI message.

From the client: `disconnect-bot` hangs up, `send-text` is a typed user turn through the same LLM
and TTS path as a spoken one, `append-to-context` stores messages in the session's context in
Valkey (and with `run_immediately` runs a turn on a user message), `client-message` is answered
with a `server-response` for the types we know (`session`) and an `error-response` for the rest.
Every client message is untrusted: labelled messages are validated with pydantic, sizes and rate
are capped (VOICEMESH_RTVI_MAX_TEXT_CHARS, VOICEMESH_RTVI_MESSAGE_RATE), and anything we cannot
take is answered with an RTVI `error-response` (or `error` when it has no id) while the call goes
on. Messages without the `rtvi-ai` label are not RTVI and are left to the carrier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson
import pipecat.processors.frameworks.rtvi.models as RTVI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voicemesh import __version__
from voicemesh.bus.events import (
    BotDone,
    BotStarted,
    CallerEvent,
    ErrorEvent,
    Interrupted,
    Session,
    ToolCallEvent,
    ToolResultEvent,
    Transcript,
    TurnMetrics,
    TurnStarted,
    UserStopped,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = RTVI.PROTOCOL_VERSION
LABEL = RTVI.MESSAGE_LABEL
#: client-message types we answer (`t`); any other is refused with an error-response
CLIENT_MESSAGES = ("session",)

Send = Callable[[dict[str, Any]], Awaitable[None]]


class CallActions(Protocol):
    """What RTVI asks of the call it runs beside (voicemesh.transport.call.call.Call)."""

    async def text_turn(self, text: str) -> int:
        """Run a typed user turn; returns its epoch."""
        ...

    async def append_context(self, messages: list[dict[str, Any]]) -> None:
        """Store messages in the session's conversation context."""
        ...


class ClientMessage(RTVI.Message):
    """A labelled message from the client: pipecat's envelope, with bounds on what we keep."""

    model_config = ConfigDict(extra="ignore")
    type: str = Field(..., max_length=64)
    id: str = Field(..., max_length=128)
    data: dict[str, Any] | None = None


class ContextMessage(BaseModel):
    """One message of `append-to-context` (client-js' `appendToContext`)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str


class AppendToContextData(BaseModel):
    """`append-to-context` data: one message (client-js), or `messages`, and whether to reply."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"] | None = None
    content: str | None = None
    messages: list[ContextMessage] | None = Field(None, max_length=20)
    run_immediately: bool = False

    def all(self) -> list[ContextMessage]:
        found = list(self.messages or [])
        if self.role is not None and self.content is not None:
            found.insert(0, ContextMessage(role=self.role, content=self.content))
        return found


class Refused(Exception):
    """A client message we do not carry out; its text goes back as an RTVI error."""


def _dump(message: BaseModel) -> dict[str, Any]:
    return message.model_dump(mode="json", exclude_none=True)


def _negotiate(version: object) -> tuple[str, str | None]:
    """(the version bot-ready names, a compatibility warning or None), as pipecat's server does
    it: a 2.x client gets our protocol, a 1.x client its own version echoed back."""
    if not isinstance(version, str):
        return PROTOCOL_VERSION, "Client version unknown."
    try:
        parts = [int(v) for v in version.split(".")]
        if len(parts) != 3:
            raise ValueError
    except ValueError:
        return PROTOCOL_VERSION, f"Invalid client version format ({version[:32]})."
    major = parts[0]
    if major == int(PROTOCOL_VERSION.split(".")[0]):
        return PROTOCOL_VERSION, None
    if major == RTVI.LEGACY_SUPPORTED_MAJOR:
        return version, None
    return PROTOCOL_VERSION, f"RTVI version {version} is not compatible with {PROTOCOL_VERSION}."


class RateBucket:
    """A token bucket: `rate` messages a second, bursts of up to `rate` (at least 1)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Rtvi:
    """One call's RTVI side. `send` carries a JSON object to the client the carrier's way;
    `hang_up` ends the call; `bind` gives it the call (typed turns, the context)."""

    def __init__(
        self,
        send: Send,
        hang_up: Callable[[], None],
        *,
        max_text_chars: int = 2000,
        message_rate: float = 20.0,
    ):
        self._send, self._hang_up = send, hang_up
        self.max_text_chars = max_text_chars
        self.bucket = RateBucket(message_rate)
        self.ready = False  # client-ready seen: events go out as RTVI
        self.version = PROTOCOL_VERSION
        self.call: CallActions | None = None
        self.session: Session | None = None
        self._speaking = False  # bot-started-speaking sent, its stop not yet
        self._unspoken: list[tuple[int | None, str]] = []  # bot-output segments not yet played

    def bind(self, call: CallActions) -> None:
        self.call = call

    @property
    def legacy(self) -> bool:
        return not self.version.startswith(PROTOCOL_VERSION.split(".")[0] + ".")

    # --- client → server ---------------------------------------------------------------------

    @staticmethod
    def is_rtvi(message: object) -> bool:
        return isinstance(message, Mapping) and message.get("label") == LABEL

    async def on_message(self, message: Mapping[str, Any]) -> None:
        """One labelled message from the client (is_rtvi). Never raises for the client's
        mistakes: each is answered with an RTVI error, and the call goes on."""
        raw_id = message.get("id")
        msg_id = raw_id[:128] if isinstance(raw_id, str) else None
        if not self.bucket.take():
            await self.error_response(msg_id, "too many RTVI messages: slow down")
            return
        try:
            parsed = ClientMessage.model_validate(message)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
                for e in exc.errors(include_url=False)[:3]
            )
            await self.error_response(msg_id, f"Invalid RTVI message: {problems}")
            return
        try:
            await self._handle(parsed)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "data"
            await self.error_response(
                parsed.id, f"Invalid {parsed.type} data: {where}: {first['msg']}"
            )
        except Refused as exc:
            await self.error_response(parsed.id, str(exc))
        except Exception as exc:  # the call's own failure (Valkey, NATS): said generically
            log.warning("RTVI %s failed: %s", parsed.type, exc)
            await self.error_response(parsed.id, f"{parsed.type} failed ({type(exc).__name__})")

    async def malformed(self, what: str) -> None:
        """A message on the channel that is not JSON or not an object, once RTVI is on."""
        if self.ready:
            await self.error(f"malformed message: {what}")

    async def _handle(self, msg: ClientMessage) -> None:
        match msg.type:
            case "client-ready":
                await self._client_ready(msg)
            case "disconnect-bot":
                log.info("RTVI disconnect-bot: hanging up")
                self._hang_up()
            case "send-text":
                text = RTVI.SendTextData.model_validate(msg.data)
                await self._typed(text.content, run=(text.options or RTVI.SendTextOptions()))
            case "append-to-context":
                await self._append(AppendToContextData.model_validate(msg.data or {}))
            case "client-message":
                raw = RTVI.RawClientMessageData.model_validate(msg.data)
                await self._client_message(msg.id, raw)
            case _:
                raise Refused(f"Unsupported type {msg.type}")

    async def _client_ready(self, msg: ClientMessage) -> None:
        version, warning = _negotiate((msg.data or {}).get("version"))
        if warning:
            await self.error_response(msg.id, warning + " Compatibility issues may occur.")
        self.version, self.ready = version, True
        about: dict[str, Any] = {"library": "voicemesh", "library_version": __version__}
        if self.session is not None:
            about.update(session_id=self.session.session_id, version=self.session.version)
        ready = RTVI.BotReady(id=msg.id, data=RTVI.BotReadyData(version=version, about=about))
        await self._send(_dump(ready))
        log.info("RTVI client ready (protocol %s)", version)

    def _text(self, content: str) -> str:
        text = content.strip()
        if not text:
            raise Refused("the text is empty")
        if len(text) > self.max_text_chars:
            raise Refused(
                f"the text has {len(text)} characters; at most {self.max_text_chars} "
                "(VOICEMESH_RTVI_MAX_TEXT_CHARS)"
            )
        return text

    async def _typed(self, content: str, run: RTVI.SendTextOptions) -> None:
        text = self._text(content)
        if self.call is None:
            raise Refused("the call has not started")
        if not run.run_immediately:
            await self.call.append_context([{"role": "user", "content": text}])
            return
        if not run.audio_response:
            raise Refused("audio_response false is not supported: replies are spoken")
        await self.call.text_turn(text)

    async def _append(self, data: AppendToContextData) -> None:
        messages = data.all()
        if not messages:
            raise Refused("append-to-context needs role and content, or messages")
        texts = [(m.role, self._text(m.content)) for m in messages]
        if self.call is None:
            raise Refused("the call has not started")
        run = data.run_immediately and texts[-1][0] == "user"
        stored = texts[:-1] if run else texts  # the turn stores its own user message
        if stored:
            await self.call.append_context([{"role": r, "content": c} for r, c in stored])
        if run:
            await self.call.text_turn(texts[-1][1])

    async def _client_message(self, msg_id: str, data: RTVI.RawClientMessageData) -> None:
        if data.t == "session" and self.session is not None:
            answer = {"session_id": self.session.session_id, "version": self.session.version}
            response = RTVI.ServerResponse(
                id=msg_id, data=RTVI.RawServerResponseData(t=data.t, d=answer)
            )
            await self._send(_dump(response))
            return
        known = ", ".join(CLIENT_MESSAGES)
        raise Refused(f"unknown client-message type {data.t[:64]!r} (known: {known})")

    async def error_response(self, msg_id: str | None, error: str) -> None:
        if msg_id is None:
            await self.error(error)
            return
        out = RTVI.ErrorResponse(id=msg_id, data=RTVI.ErrorResponseData(error=error))
        await self._send(_dump(out))

    async def error(self, error: str, *, fatal: bool = False) -> None:
        await self._send(_dump(RTVI.Error(data=RTVI.ErrorData(error=error, fatal=fatal))))

    # --- server → client ---------------------------------------------------------------------

    async def deliver(self, event: CallerEvent) -> bool:
        """Send one caller event as RTVI once the client is ready (see the module doc); False
        before that, when the carrier sends our own JSON event instead."""
        if isinstance(event, Session):
            self.session = event  # bot-ready names it: it went out before client-ready
        if not self.ready:
            return False
        for message in self.to_rtvi(event):
            await self._send(message)
        return True

    def to_rtvi(self, event: CallerEvent) -> list[dict[str, Any]]:
        """The RTVI messages that say `event` (tracks whether the bot is speaking)."""
        out: list[BaseModel] = []
        match event:
            case TurnStarted():
                out.append(RTVI.UserStartedSpeakingMessage())
            case UserStopped():
                out.append(RTVI.UserStoppedSpeakingMessage())
            case Transcript(role="user", text=text, final=final):
                if text:
                    data = RTVI.UserTranscriptionMessageData(
                        text=text,
                        user_id="",
                        timestamp=datetime.now(UTC).isoformat(),
                        final=final is not False,
                    )
                    out.append(RTVI.UserTranscriptionMessage(data=data))
            case Transcript(role="assistant", text=text, index=index):
                if text:
                    out.append(RTVI.BotLLMTextMessage(data=RTVI.TextMessageData(text=text)))
                    out.append(RTVI.BotTTSTextMessage(data=RTVI.TextMessageData(text=text)))
                    out.append(RTVI.BotOutputMessage(data=self._output(text, index)))
                    self._unspoken.append((index, text))
            case BotStarted():
                self._speaking = True
                out.append(RTVI.BotStartedSpeakingMessage())
            case BotDone():
                if not self.legacy:  # the reply was played to its end: every sentence spoken
                    out.extend(
                        RTVI.BotOutputMessage(data=self._output(t, i, spoken=True))
                        for i, t in self._unspoken
                    )
                self._unspoken = []
                out.extend(self._stopped())
            case Interrupted():
                self._unspoken = []
                out.append(RTVI.BotInterruptedMessage())
                out.extend(self._stopped())
                out.append(RTVI.ServerMessage(data=event.wire()))
            case TurnMetrics():
                out.append(RTVI.MetricsMessage(data=metrics(event)))
            case ErrorEvent(error=error):
                out.append(RTVI.Error(data=RTVI.ErrorData(error=error, fatal=False)))
            case ToolCallEvent(call_id=call_id, name=name, arguments=arguments):
                args = _arguments(arguments)
                started = RTVI.LLMFunctionCallStartMessageData(function_name=name)
                going = RTVI.LLMFunctionCallInProgressMessageData(
                    tool_call_id=call_id, function_name=name, arguments=args
                )
                out.append(RTVI.LLMFunctionCallStartMessage(data=started))
                out.append(RTVI.LLMFunctionCallInProgressMessage(data=going))
                if self.legacy:  # 1.x clients know the call as llm-function-call
                    legacy = {"function_name": name, "tool_call_id": call_id, "args": args}
                    out.append(RTVI.Message(type="llm-function-call", id=call_id, data=legacy))
            case ToolResultEvent(call_id=call_id, name=name, status=status):
                stopped = RTVI.LLMFunctionCallStoppedMessageData(
                    tool_call_id=call_id, function_name=name, cancelled=status == "cancelled"
                )  # no result: a tool's output goes to the LLM only
                out.append(RTVI.LLMFunctionCallStoppedMessage(data=stopped))
                out.append(RTVI.ServerMessage(data=event.wire()))  # status, duration, error
            case _:  # session, hop, warning: no RTVI type of their own
                out.append(RTVI.ServerMessage(data=event.wire()))
        return [_dump(m) for m in out]

    def _stopped(self) -> list[BaseModel]:
        if not self._speaking:
            return []
        self._speaking = False
        return [RTVI.BotStoppedSpeakingMessage()]

    def _output(
        self, text: str, index: int | None, *, spoken: bool = False
    ) -> RTVI.BotOutputMessageData:
        if self.legacy:
            return RTVI.BotOutputMessageData(
                text=text, output_type="sentence", segment_id=index, spoken=True
            )
        return RTVI.BotOutputMessageData(
            text=text,
            output_type="sentence",
            segment_id=index,
            will_be_spoken=True,
            spoken_status="completed" if spoken else "new",
        )


def _arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments as RTVI carries them (an object): the model's JSON when it is
    one, else the text as written (it may be cut, or not JSON at all)."""
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"arguments": text}
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}


#: our turn_metrics fields → (RTVI metric kind, processor name)
METRICS: dict[str, tuple[str, str]] = {
    "eou_ms": ("processing", "turn"),
    "stt_ms": ("processing", "stt"),
    "llm_ttft_ms": ("ttfb", "llm"),
    "tts_ttfb_ms": ("ttfb", "tts"),
    "first_audio_ms": ("ttfb", "first-audio"),
    "v2v_ms": ("processing", "voice-to-voice"),
}


def metrics(event: TurnMetrics) -> dict[str, Any]:
    """A turn's phases in RTVI's metrics shape: {ttfb: [...], processing: [...]}, each entry
    {processor, value} in seconds, as pipecat reports them; phases not observed are left out."""
    found: dict[str, list[dict[str, Any]]] = {"ttfb": [], "processing": []}
    wire = event.wire()
    for field, (kind, processor) in METRICS.items():
        value = wire.get(field)
        if value is not None:
            found[kind].append({"processor": processor, "value": round(value / 1000, 4)})
    return found
