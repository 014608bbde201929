"""Helpers shared by the tests that run stage services in-process on the real servers."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import uvicorn

from voicemesh.bus import Bus, Flag, Frame, Kind
from voicemesh.config.models import AgentConfig, parse_agent_config
from voicemesh.config.settings import Settings
from voicemesh.pipeline import LLMService, StageService, STTService, TTSService
from voicemesh.servers import free_port
from voicemesh.transport.call.audio import FRAME_BYTES, RATE

if TYPE_CHECKING:
    from voicemesh.transport.api.service import TransportService


async def until(cond: Callable[[], Any], limit_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class Inbox:
    """Collects the frames published on a subject."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Frame]] = []
        self._changed = asyncio.Event()

    async def __call__(self, subject: str, frame: Frame) -> None:
        self.items.append((subject, frame))
        self._changed.set()

    @property
    def frames(self) -> list[Frame]:
        return [f for _, f in self.items]

    def of(self, kind: Kind) -> list[Frame]:
        return [f for f in self.frames if f.kind is kind]

    async def wait_for(
        self, pred: Callable[[list[Frame]], bool], limit_s: float = 5.0
    ) -> list[Frame]:
        deadline = time.monotonic() + limit_s
        while not pred(self.frames):
            left = deadline - time.monotonic()
            if left <= 0:
                summary = [(f.kind.name, f.epoch, f.index, f.seq, f.flags) for f in self.frames]
                raise AssertionError(f"timed out; received {summary[:20]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return self.frames


async def listen(bus: Bus, subject: str) -> Inbox:
    inbox = Inbox()
    await bus.subscribe(subject, inbox)
    await bus.settle()
    return inbox


def has_last(frames: list[Frame], epoch: int | None = None) -> bool:
    return any(f.has(Flag.LAST) and (epoch is None or f.epoch == epoch) for f in frames)


class Services:
    """Starts stage services on the test's settings; stops whatever is left at teardown."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.running: list[StageService] = []

    async def start(self, cls: type[StageService], **overrides: Any) -> Any:
        overrides.setdefault("instance_id", f"{cls.role}-{len(self.running) + 1}")
        svc = cls(self.settings.model_copy(update=overrides))
        await svc.start()  # ends with bus.settle(): its subscriptions are on the server
        self.running.append(svc)
        return svc

    async def stop(self, svc: StageService) -> None:
        self.running.remove(svc)
        await svc.stop()


@contextlib.asynccontextmanager
async def serving(service: TransportService) -> AsyncIterator[str]:
    """The transport's app on a real uvicorn on a free loopback port, in the test's event loop
    (for WebSockets and WebRTC), logging through the root logger (caplog sees it); yields its
    http:// base URL. The service must be started already (lifespan off)."""
    from voicemesh.transport.api.app import create_app
    from voicemesh.transport.api.limits import uvicorn_config

    port = free_port()
    config = uvicorn_config(  # the transport's own limits (WebSocket message size...)
        create_app(service),
        service.settings,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="info",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@dataclass
class TransportApp:
    """A started TransportService and the http:// base URL its app is served on."""

    service: TransportService
    url: str

    def ws(self, path: str) -> str:
        """The ws:// URL of `path` on the app."""
        return f"ws{self.url[4:]}{path}"


@contextlib.asynccontextmanager
async def running_transport(
    settings: Settings, services: Services, **overrides: Any
) -> AsyncIterator[TransportApp]:
    """The stt, llm and tts stages in `services` (unless some run already), then a started
    TransportService on `settings` with `overrides`, its app on uvicorn (`serving`); the
    transport stops on exit (the stages are `services`'s to stop)."""
    from voicemesh.transport.api.service import TransportService

    if not services.running:
        for cls in (STTService, LLMService, TTSService):
            await services.start(cls)
    service = TransportService(settings.model_copy(update=overrides))
    await service.start()
    try:
        async with serving(service) as url:
            yield TransportApp(service, url)
    finally:
        await service.stop()


def tone_frames(n: int, *, freq: float = 220.0, amp: float = 8000.0) -> list[bytes]:
    """n 20 ms frames of a sine at 16 kHz, PCM16 mono."""
    t = np.arange(n * FRAME_BYTES // 2) / RATE
    pcm = (amp * np.sin(2 * np.pi * freq * t)).astype(np.int16).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def dominant_hz(pcm: bytes | np.ndarray, rate: int, *, window: bool = False) -> float:
    """The strongest frequency of PCM16 mono (bytes or samples). `window`: through a Hann window
    and with the DC bin ignored, for audio that does not hold a whole number of periods."""
    x = (pcm if isinstance(pcm, np.ndarray) else np.frombuffer(pcm, "<i2")).astype(np.float64)
    if window:
        x = x * np.hanning(x.size)
    spectrum = np.abs(np.fft.rfft(x))
    if window:
        spectrum[0] = 0
    return float(np.argmax(spectrum) * rate / x.size)


def heard(
    pcm: bytes,
    *,
    min_samples: int = 1600,
    words: dict[float, str] | None = None,
    window: bool = True,
    rate: int = 16000,
) -> str:
    """What a loopback STT hears in a caller's tone (16 kHz PCM16): "tone <Hz, to 10 Hz>", or
    with `words` the word whose pitch is nearest (within 40 Hz, else "noise"); "" for audio
    shorter than `min_samples`."""
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2")
    if samples.size < min_samples:
        return ""
    peak = dominant_hz(samples, rate, window=window)
    if words is None:
        return f"tone {round(peak / 10) * 10}"
    hz = min(words, key=lambda f: abs(f - peak))
    return words[hz] if abs(hz - peak) < 40 else "noise"


def scripted(
    agent_json: dict,
    replies: list[str],
    *,
    chunk_words: int = 1,
    tone: dict[str, Any] | None = None,
) -> AgentConfig:
    """The default agent with the scripted LLM and the tone TTS (whisper stays the STT)."""
    data = copy.deepcopy(agent_json)
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {"scripted": {"replies": replies, "chunk_words": chunk_words}},
    }
    data["connectors"]["tts"] = {"primary": "tone", "config": {"tone": tone or {}}}
    return parse_agent_config(data)


def loopback_agent(
    agent_json: dict,
    *,
    transport: str,
    stt_url: str,
    replies: list[str] | None = None,
    ms_per_word: int = 100,
    **transport_options: Any,
) -> dict:
    """An agent that needs no engine: energy VAD with short turns on `transport`, the OpenAI STT
    protocol against a loopback transcriber, scripted replies, a tone for a voice."""
    data = copy.deepcopy(agent_json)
    options = {
        "vad": "energy",
        "start_speech_ms": 60,
        "end_of_turn_silence_ms": 200,
        "preroll_ms": 100,
        **transport_options,
    }
    data["connectors"]["transport"] = {"primary": transport, "config": {transport: options}}
    data["connectors"]["stt"] = {"primary": "openai", "config": {"openai": {"base_url": stt_url}}}
    data["connectors"]["llm"] = {
        "primary": "scripted",
        "config": {"scripted": {"replies": replies or ["You said {user}."]}},
    }
    data["connectors"]["tts"] = {
        "primary": "tone",
        "config": {"tone": {"ms_per_word": ms_per_word}},
    }
    return data
