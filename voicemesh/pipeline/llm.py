"""LLM stage: stateless. Any instance takes a turn from the `llm` queue group, reads the session's
context from Valkey, streams the reply and sends each sentence to the next hop as soon as it is
complete (numbered, so parallel TTS results can be put back in order downstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from voicemesh.bus import Flag, Frame
from voicemesh.bus.events import ErrorEvent, Transcript, WarningEvent
from voicemesh.config.models import AgentConfig
from voicemesh.config.stages import Stage
from voicemesh.connectors import metrics
from voicemesh.connectors.base import Connector, LLMConnector, Message
from voicemesh.connectors.fallback import caller_error
from voicemesh.pipeline.base import QueuedStage
from voicemesh.pipeline.text import SentenceSplitter
from voicemesh.state.claims import DONE
from voicemesh.state.store import best_effort

log = logging.getLogger(__name__)

CONTEXT_MESSAGES = 50
REPLY_TRUNCATED = "reply_truncated"
#: how long a speculative reply waits for its turn's end before it is dropped unstored: beyond
#: the longest silence a transport waits (smart_turn_max_silence_ms, at most 10 s)
SPECULATION_WAIT_S = 15.0


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
    conn: Connector, messages: list[Message], delivered: list[str]
) -> AsyncIterator[str]:
    """The reply from `conn`; after a fallback mid-reply, only what follows the text already
    delivered. The partial reply goes in as an assistant prefill (native for Anthropic and most
    OpenAI-compatible servers); if a model starts over anyway, the repeated prefix is dropped."""
    assert isinstance(conn, LLMConnector)
    partial = "".join(delivered)
    if not partial:
        async for piece in conn.stream(messages):
            yield piece
        return
    pending = ""
    matching = True
    async for piece in conn.stream([*messages, {"role": "assistant", "content": partial}]):
        if not matching:
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
        if not any(m["role"] == "user" and m.get("epoch") == epoch for m in history[-2:]):
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
        epoch = frame.epoch
        # a reply cut off before the caller heard a word is stored empty: nothing was said
        messages = [{"role": m["role"], "content": m["content"]} for m in history if m["content"]]
        if config.system_prompt:
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        chain = self.chain(config)
        # hop: -> voicemesh.pipeline.tts.TTSService._on_text (vm.tts.<sid>, default flow)
        next_subject = self.router.next_subject_of(config, session)
        # the reply's first unit is cut short (a clause, a few words) for an early first audio; a
        # resumed reply's first unit was heard long ago, so it stays a sentence
        splitter = SentenceSplitter(
            first_words=self.settings.first_unit_words, early_first=not sent_before
        )
        parts: list[str] = []
        index, used = len(sent_before), ""
        prior = [" ".join(sent_before)] if sent_before else []
        if sent_before:
            log.info("turn %d resumes after %d sentences sent before", epoch, index)
        t0 = time.perf_counter()
        ttft_ms: float | None = None
        # A reply is bounded however long the model (or a config's scripted reply) runs on: its
        # text goes to TTS, the caller and the stored context, all of which it would otherwise grow.
        limit = self.settings.max_reply_chars
        length = sum(len(s) + 1 for s in sent_before)
        truncated = False

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

        failed: str | None = None
        try:
            stream = chain.stream(lambda c, done: continue_reply(c, messages, [*prior, *done]))
            # closed on the way out, a break included: the connector's stream ends with it
            async with contextlib.aclosing(stream):
                async for conn, piece in stream:
                    if ttft_ms is None:
                        ttft_ms = (time.perf_counter() - t0) * 1000
                    used = conn.name
                    if length + len(piece) > limit:
                        piece = within(piece, limit - length)
                        truncated = True
                    length += len(piece)
                    parts.append(piece)
                    for sentence in splitter.push(piece):
                        await emit(sentence)
                    if truncated:
                        break  # closes the connector's stream: the engine stops generating
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
        reply = " ".join([*sent_before, "".join(parts).strip()]).strip()
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
        # The reply is over (even a failed one): the transport must not wait for more.
        await self.bus.publish(
            next_subject,
            Frame.text(
                "", epoch=epoch, index=index, flags=Flag.END | Flag.LAST, origin_ns=frame.origin_ns
            ),
        )
        log.info(
            "turn %d: %d sentences from %s, first token %.0f ms", epoch, index, used, ttft_ms or -1
        )
        return index
