"""LLM stage: stateless. Any instance takes a turn from the `llm` queue group, reads the session's
context from Valkey, streams the reply and sends each sentence to the next hop as soon as it is
complete (numbered, so parallel TTS results can be put back in order downstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from voicemesh.bus import Flag, Frame, tracing
from voicemesh.bus.events import (
    ErrorEvent,
    HangUp,
    ToolCallEvent,
    ToolResultEvent,
    Transcript,
    WarningEvent,
)
from voicemesh.config.models import AgentConfig
from voicemesh.config.stages import Stage
from voicemesh.config.tools import EndCallHandler, SetConfigHandler, ToolSpec
from voicemesh.connectors import metrics
from voicemesh.connectors.base import Connector, LLMConnector, Message, ToolCall
from voicemesh.connectors.fallback import caller_error
from voicemesh.pipeline.base import QueuedStage
from voicemesh.pipeline.text import SentenceSplitter
from voicemesh.state.claims import DONE
from voicemesh.state.store import best_effort
from voicemesh.tools.builtins import set_config
from voicemesh.tools.runner import MCP_LIST_FAILED, Outcome, ToolRunner, cap

log = logging.getLogger(__name__)

CONTEXT_MESSAGES = 50
REPLY_TRUNCATED = "reply_truncated"
#: how long a speculative reply waits for its turn's end before it is dropped unstored: beyond
#: the longest silence a transport waits (smart_turn_max_silence_ms, at most 10 s)
SPECULATION_WAIT_S = 15.0
TOOL_ROUND_LIMIT = "tool_round_limit"
#: context entries of a tool exchange (beside "user" and "assistant")
TOOL_CALLS, TOOL_RESULT = "tool_calls", "tool_result"


def within(piece: str, budget: int) -> str:
    """`piece` cut to at most `budget` characters, at its last word boundary when it has one."""
    if len(piece) <= budget:
        return piece
    head = piece[:budget]
    if not piece[budget].isspace():
        space = max(head.rfind(" "), head.rfind("\n"))
        if space > 0:
            head = head[:space]
    return head


async def continue_reply(
    conn: Connector,
    messages: list[Message],
    delivered: Sequence[str | ToolCall],
    tools: Sequence[ToolSpec] | None = None,
    *,
    choose: bool = True,
) -> AsyncIterator[Any]:
    """The reply from `conn`; after a fallback mid-reply, only what follows the text already
    delivered. The partial reply goes in as an assistant prefill (native for Anthropic and most
    OpenAI-compatible servers); if a model starts over anyway, the repeated prefix is dropped.
    With `tools` the connector may also end the round with tool calls; once one was delivered,
    the round is over (a fallback must not make the calls again)."""
    assert isinstance(conn, LLMConnector)
    if any(isinstance(d, ToolCall) for d in delivered):
        return
    partial = "".join(d for d in delivered if isinstance(d, str))

    def start(msgs: list[Message]) -> AsyncIterator[Any]:
        if tools is None:
            return conn.stream(msgs)
        return conn.stream_tools(msgs, tools, choose=choose)

    if not partial:
        async for piece in start(messages):
            yield piece
        return
    pending = ""
    matching = True
    async for piece in start([*messages, {"role": "assistant", "content": partial}]):
        if not matching or isinstance(piece, ToolCall):
            matching = False  # what matched so far restated the partial text: dropped
            yield piece
            continue
        pending += piece
        if partial.startswith(pending) or pending.startswith(partial):
            if len(pending) > len(partial):  # restated the partial text, then went on
                matching = False
                yield pending[len(partial) :]
            continue
        matching = False  # a true continuation
        yield pending
    if matching and pending and not pending.startswith(partial):
        yield pending


class LLMService(QueuedStage):
    role = Stage.LLM

    async def work(self, session: str, frame: Frame) -> str:
        # with the sentence count, the call supervisor knows which TTS sentences a reply has
        return f"{DONE}:{await self._reply(session, frame)}"

    _runner: ToolRunner | None = None

    def runner(self) -> ToolRunner:
        """The process's tool runner, made with the first turn that has tools."""
        if self._runner is None:

            async def setter(session: str, handler: SetConfigHandler, args: dict[str, Any]) -> Any:
                return await set_config(self.store, self.bus, self.subjects, session, handler, args)

            self._runner = ToolRunner(self.bus.nc, self.settings, setter)
        return self._runner

    async def release(self) -> None:
        await super().release()
        if self._runner is not None:
            await self._runner.aclose()

    async def _reply(self, session: str, frame: Frame) -> int:
        """Generate and send the reply; returns how many sentences the turn has in all."""
        epoch, user = frame.epoch, frame.as_text
        cached = await self.router.load(session)
        config = cached.config
        # A redelivered turn (its first instance died) resumes after what was already sent.
        sent_before = await best_effort("progress", self.claims.progress(session, epoch), [])
        history = await best_effort(
            "reading the context", self.store.get_context(session, last=CONTEXT_MESSAGES), []
        )
        # A speculative transcript (made at the caller's pause) may not be the turn's: nothing
        # of its turn is stored until the transport confirms the turn ended in that pause.
        speculative = frame.has(Flag.SPECULATE)
        confirmed: asyncio.Task[bool] | None = None
        if not has_user_turn(history, epoch):
            entry = {"role": "user", "content": user, "epoch": epoch}
            if speculative:
                # stored the moment the turn ends, not after the reply: a barge-in once it
                # plays stores what was heard of the reply, after this
                confirmed = asyncio.ensure_future(self._store_when_ended(session, epoch, entry))
            else:
                stored = self.store.append_context(session, entry)
                await best_effort("storing the user's turn", stored, 0)
            history.append(entry)
        if speculative:
            metrics.SPECULATIONS.labels(Stage.LLM, "started").inc()
        used = False
        try:
            count = await self._generate(session, frame, config, history, sent_before, confirmed)
            used = confirmed is None or (confirmed.done() and confirmed.result())
            return count
        finally:
            if confirmed is not None:
                confirmed.cancel()
            if speculative:
                metrics.SPECULATIONS.labels(Stage.LLM, "used" if used else "discarded").inc()

    async def _store_when_ended(self, session: str, epoch: int, entry: dict[str, Any]) -> bool:
        """True once turn `epoch` is confirmed ended and its user entry stored; False if the
        confirmation never came (the caller went on: the turn was cancelled anyway)."""
        try:
            async with asyncio.timeout(SPECULATION_WAIT_S):
                await self.turn_ends(session, epoch)
        except TimeoutError:
            log.warning("turn %d: never confirmed ended; its speculative reply is dropped", epoch)
            return False
        stored = self.store.append_context(session, entry)
        await best_effort("storing the user's turn", stored, 0)
        return True

    async def _generate(
        self,
        session: str,
        frame: Frame,
        config: AgentConfig,
        history: list[dict[str, Any]],
        sent_before: list[str],
        confirmed: asyncio.Task[bool] | None,
    ) -> int:
        epoch, tools = frame.epoch, config.tools
        if tools:
            tools, unlisted = await self.runner().offered(tools)
            for name in unlisted:
                warn = WarningEvent(
                    code=MCP_LIST_FAILED,
                    message=f"the tools of {name} could not be listed; they are not offered",
                    stage=Stage.LLM,
                    epoch=epoch,
                )
                await self.notify(session, warn, epoch=epoch)
        if config.tools:
            messages, pending, rounds = tool_messages(history, epoch)
        else:
            # a reply cut off before the caller heard a word is stored empty: nothing was said
            messages = [
                {"role": m["role"], "content": m["content"]}
                for m in history
                if m["content"] and m["role"] in ("user", "assistant")
            ]
            pending, rounds = [], 0
        if config.system_prompt:
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        chain = self.chain(config, session=session, epoch=epoch)
        # hop: -> voicemesh.pipeline.tts.TTSService._on_text (vm.tts.<sid>, default flow)
        next_subject = self.router.next_subject_of(config, session)
        # the reply's first unit is cut short (a clause, a few words) for an early first audio; a
        # resumed reply's first unit was heard long ago, so it stays a sentence
        splitter = SentenceSplitter(
            first_words=self.settings.first_unit_words, early_first=not sent_before
        )
        parts: list[str] = []
        index, used = len(sent_before), ""
        # a resumed tool turn goes on after its last completed call, not after its last words
        prior = [" ".join(sent_before)] if sent_before and not rounds else []
        if sent_before:
            log.info("turn %d resumes after %d sentences sent before", epoch, index)
        t0 = time.perf_counter()
        ttft_ms: float | None = None
        # A reply is bounded however long the model (or a config's scripted reply) runs on: its
        # text goes to TTS, the caller and the stored context, all of which it would otherwise grow.
        limit = self.settings.max_reply_chars
        length = sum(len(s) + 1 for s in sent_before)
        truncated = False
        tool_s = 0.0
        filler_said = False
        #: the LLM called end_call (a redelivered turn: before): the transport hangs up once
        #: this reply has been played
        hang_up = any(
            m.get("role") == TOOL_RESULT
            and m.get("epoch") == epoch
            and m.get("status") == "ok"
            and ends_call(tools, ToolCall(id="", name=str(m.get("name")), arguments=""))
            for m in history
        )

        async def emit(sentence: str) -> None:
            nonlocal index
            out = Frame.text(
                sentence,
                epoch=epoch,
                index=index,
                flags=Flag.START | Flag.END,
                origin_ns=frame.origin_ns,
            )
            # recorded before it can be heard; shielded, because a Valkey command cut off by a
            # cancellation (a barge-in) can leave its connection waiting forever
            await best_effort("progress", self.claims.add_progress(session, epoch, sentence), None)
            await self.bus.publish(next_subject, out)
            said = Transcript(
                role="assistant",
                text=sentence,
                epoch=epoch,
                index=index,
                connector=used,
                # the first sentence carries this hop's timing for the turn's trace
                ttft_ms=round(ttft_ms or 0, 1) if index == 0 else None,
            )
            await self.notify(session, said, epoch=epoch)
            index += 1

        async def run_calls(calls: list[ToolCall], quiet: bool) -> None:
            """Run a round's calls at once, each result stored as it comes; the bot says the
            filler if they are slow and the round said nothing."""
            nonlocal filler_said, tool_s, hang_up
            started = time.perf_counter()
            filler = config.tool_filler
            due = filler is not None and quiet and not filler_said
            batch = asyncio.ensure_future(
                asyncio.gather(*(self._call(session, epoch, tools, c) for c in calls))
            )
            try:
                if due and filler is not None:
                    after_ms = filler.after_ms
                    if after_ms is None:
                        after_ms = self.settings.tool_filler_after_ms
                    done, _ = await asyncio.wait({batch}, timeout=after_ms / 1000)
                    if not done:
                        filler_said = True
                        parts.append(f" {filler.text} ")
                        await emit(filler.text)
                outcomes = await batch
            except asyncio.CancelledError:
                batch.cancel()  # a barge-in: the calls are abandoned (docs/wire-protocol.md)
                raise
            finally:
                tool_s += time.perf_counter() - started
            for call, outcome in zip(calls, outcomes, strict=True):
                if outcome.status == "ok" and ends_call(tools, call):
                    hang_up = True
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.id,
                        "name": call.name,
                        "content": outcome.content,
                    }
                )

        failed: str | None = None
        try:
            if pending:  # calls a redelivered turn had made and not seen answered
                await run_calls(pending, quiet=False)
            while True:
                calls: list[ToolCall] = []
                offer = tools if tools else None
                choose = rounds < self.settings.tool_max_rounds
                start = len(parts)
                stream = chain.stream(round_of(messages, prior, offer, choose))
                # closed on the way out, a break included: the connector's stream ends with it
                async with contextlib.aclosing(stream):
                    async for conn, piece in stream:
                        if ttft_ms is None:
                            ttft_ms = (time.perf_counter() - t0) * 1000
                        used = conn.name
                        if isinstance(piece, ToolCall):
                            calls.append(piece)
                            continue
                        if length + len(piece) > limit:
                            piece = within(piece, limit - length)
                            truncated = True
                        length += len(piece)
                        parts.append(piece)
                        for sentence in splitter.push(piece):
                            await emit(sentence)
                        if truncated:
                            break  # closes the connector's stream: the engine stops generating
                if not calls or truncated:
                    break
                if not choose:
                    log.warning("turn %d: tool calls past %d rounds dropped", epoch, rounds)
                    over = WarningEvent(
                        code=TOOL_ROUND_LIMIT,
                        message=f"the LLM asked for tools after {rounds} rounds; "
                        "the calls were not made",
                        stage=Stage.LLM,
                        epoch=epoch,
                    )
                    await self.notify(session, over, epoch=epoch)
                    break
                rounds += 1
                prior = []
                # text the LLM streamed before its calls is spoken now, not after the tools
                for sentence in splitter.flush():
                    await emit(sentence)
                if confirmed is not None and not await asyncio.shield(confirmed):
                    # a speculative reply calls no tool (tools act) before its turn has ended
                    break
                said = "".join(parts[start:]).strip()
                parts.append(" ")  # the next round's words start a new sentence
                record = {
                    "role": TOOL_CALLS,
                    "epoch": epoch,
                    "content": said,
                    "calls": [
                        {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls
                    ],
                }
                stored = self.store.append_context(session, record)
                await best_effort("storing the tool calls", stored, 0)
                messages.append(
                    {
                        "role": "assistant",
                        "content": said,
                        "tool_calls": record["calls"],
                    }
                )
                await run_calls(calls, quiet=not said)
            for sentence in splitter.flush():
                await emit(sentence)
        except Exception as exc:  # not CancelledError: a newer turn needs no marker for this one
            log.error("turn %d failed after %d sentences: %s", epoch, index, exc)
            failed, code = caller_error(Stage.LLM, exc)  # the provider's words stay in the log
            event = ErrorEvent(error=failed, code=code, stage=Stage.LLM, epoch=epoch)
            await self.notify(session, event, epoch=epoch)
        if truncated:
            log.warning("turn %d: the reply reached %d characters and was cut", epoch, limit)
            cut = WarningEvent(
                code=REPLY_TRUNCATED,
                message=f"the reply reached the limit of {limit} characters and was cut there",
                stage=Stage.LLM,
                epoch=epoch,
            )
            await self.notify(session, cut, epoch=epoch)
        text = "".join(parts).strip()
        if rounds:  # rounds of words (and a filler) joined: one space between them
            text = " ".join(text.split())
        reply = " ".join([*sent_before, text]).strip()
        if confirmed is not None and not await asyncio.shield(confirmed):
            reply = ""  # a speculative reply whose turn never ended there: never stored
        if reply:
            entry = {"role": "assistant", "content": reply, "epoch": epoch, "connector": used}
            if failed:
                entry["error"] = failed
            if truncated:
                entry["truncated"] = True
            stored = self.store.put_reply(session, epoch, entry)
            await best_effort("storing the reply", stored, False)
        if hang_up:
            # before the reply's last unit: the transport holds it until that unit has played
            await self.notify(session, HangUp(epoch=epoch), epoch=epoch)
        # The reply is over (even a failed one): the transport must not wait for more.
        await self.bus.publish(
            next_subject,
            Frame.text(
                "", epoch=epoch, index=index, flags=Flag.END | Flag.LAST, origin_ns=frame.origin_ns
            ),
        )
        log.info(
            "turn %d: %d sentences from %s, first token %.0f ms%s",
            epoch,
            index,
            used,
            ttft_ms or -1,
            f", {rounds} tool rounds in {tool_s * 1000:.0f} ms" if rounds else "",
        )
        return index

    async def _call(
        self, session: str, epoch: int, tools: list[ToolSpec], call: ToolCall
    ) -> Outcome:
        """One tool call: its event to the caller, the call, its result stored in the context
        and sent to the caller. A barge-in abandons it: the context says it was cancelled."""
        cap = self.settings.tool_result_max_chars
        shown = ToolCallEvent(
            epoch=epoch, call_id=call.id, name=call.name, arguments=cap_text(call.arguments, cap)
        )
        await self.notify(session, shown, epoch=epoch)
        t0 = time.perf_counter()
        try:
            outcome = await self.runner().run(tools, call, session=session, epoch=epoch)
        except asyncio.CancelledError:
            ms = round((time.perf_counter() - t0) * 1000, 2)
            entry = result_entry(epoch, call, "cancelled", '{"error": "cancelled"}', ms)
            # not awaited: this task is being cancelled; the write is shielded and quick
            self.bus.spawn(
                best_effort(
                    "storing a cancelled call", self.store.append_context(session, entry), 0
                ),
                what="storing a cancelled tool call",
            )
            raise
        if tracing.enabled():  # a span per call, child of the turn's (no arguments: they may
            # carry what the caller said)
            tracing.span(
                f"tool.{call.name}",
                session,
                epoch,
                tracing.perf_to_unix_ns(t0),
                time.time_ns(),
                attrs={"voicemesh.tool.status": outcome.status},
                error=outcome.error,
            )
        entry = result_entry(epoch, call, outcome.status, outcome.content, outcome.ms)
        await best_effort("storing a tool result", self.store.append_context(session, entry), 0)
        result = ToolResultEvent(
            epoch=epoch,
            call_id=call.id,
            name=call.name,
            status=outcome.status,
            duration_ms=outcome.ms,
            error=outcome.error,
        )
        await self.notify(session, result, epoch=epoch)
        return outcome


def ends_call(tools: Sequence[ToolSpec], call: ToolCall) -> bool:
    spec = next((t for t in tools if t.name == call.name), None)
    return spec is not None and isinstance(spec.handler, EndCallHandler)


def round_of(
    messages: list[Message], prior: list[str], tools: list[ToolSpec] | None, choose: bool
) -> Callable[[Connector, list[Any]], AsyncIterator[Any]]:
    """The work of one round for the chain: each connector continues after what the ones
    before it delivered."""

    def work(conn: Connector, done: list[Any]) -> AsyncIterator[Any]:
        return continue_reply(conn, messages, [*prior, *done], tools, choose=choose)

    return work


def result_entry(
    epoch: int, call: ToolCall, status: str, content: str, ms: float
) -> dict[str, Any]:
    return {
        "role": TOOL_RESULT,
        "epoch": epoch,
        "call_id": call.id,
        "name": call.name,
        "status": status,
        "content": content,
        "ms": ms,
    }


def has_user_turn(history: list[dict[str, Any]], epoch: int) -> bool:
    """Whether turn `epoch`'s user message is stored (a redelivered turn stored it already):
    it is before that turn's tool exchange, if any."""
    for m in reversed(history):
        e = m.get("epoch")
        if m.get("role") == "user" and e == epoch:
            return True
        if isinstance(e, int) and e < epoch:
            return False
    return False


def tool_messages(
    history: list[dict[str, Any]], epoch: int
) -> tuple[list[Message], list[ToolCall], int]:
    """The context as messages with the tool exchange; the calls of turn `epoch` that have no
    result yet (a redelivered turn makes them again, under the same idempotency keys); and how
    many rounds of calls turn `epoch` has made.

    Calls of earlier turns without a result (the context was cut to its last messages, or a
    crash) are left out, since a provider refuses a call with no answer; results whose call is
    not in view are left out too. An earlier turn's words before its calls are in its stored
    reply already, so they are not repeated in its call messages."""
    answered: dict[str, dict[str, Any]] = {}
    for m in history:
        if m.get("role") == TOOL_RESULT:
            answered[f"{m.get('epoch')}:{m.get('call_id')}"] = m
    messages: list[Message] = []
    pending: list[ToolCall] = []
    rounds = 0
    for m in history:
        role, e = m.get("role"), m.get("epoch")
        if role in ("user", "assistant"):
            if m.get("content"):
                messages.append({"role": role, "content": m["content"]})
        elif role == TOOL_CALLS:
            current = e == epoch
            rounds += current
            calls = [c for c in m.get("calls", []) if isinstance(c, dict)]
            kept = [c for c in calls if current or f"{e}:{c.get('id')}" in answered]
            pending += [
                ToolCall(id=str(c["id"]), name=str(c["name"]), arguments=str(c["arguments"]))
                for c in kept
                if f"{e}:{c.get('id')}" not in answered
            ]
            said = m.get("content", "") if current else ""
            if kept:
                messages.append({"role": "assistant", "content": said, "tool_calls": kept})
                for c in kept:
                    if (r := answered.get(f"{e}:{c.get('id')}")) is not None:
                        messages.append(
                            {
                                "role": "tool",
                                "tool_call_id": c["id"],
                                "name": c["name"],
                                "content": r["content"],
                            }
                        )
            elif said:
                messages.append({"role": "assistant", "content": said})
    return messages, pending, rounds


def cap_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else cap(text, limit)
