"""Local engines proven on real input before a role says it is ready.

Why: a llama.cpp built for another CPU loaded its model and answered a one-token prompt, so the
LLM role reported ready; it then died with SIGILL on the first real question, and the call waited
for it forever. So each engine runs real work at startup (a multi-token reply, a spoken
utterance, a sentence of speech), first in a child process: native code that crashes kills the
process it runs in, and only a parent can then say which engine died and why. The same work then
runs in the role's own process, which also warms the engine's caches before the first caller.

`python -m voicemesh.connectors.proof STAGE NAME` (options as JSON on stdin) is that child.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys
import time
from collections import deque
from importlib import resources

import numpy as np
import orjson

from voicemesh.config.connectors import CONNECTOR_OPTIONS, ConnectorOptions
from voicemesh.connectors.base import Connector, LLMConnector, STTConnector, TTSConnector
from voicemesh.errors import VoicemeshError

#: Long enough to need several tokens of prompt processing (the SIGILL above struck there).
LLM_PROMPT = [
    {"role": "system", "content": "You are a helpful voice assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France, and what is it famous for?"},
]
LLM_MIN_PIECES = 4  # a multi-token reply, not a first token only
LLM_MAX_PIECES = 24  # enough to prove generation; more only slows startup
TTS_SENTENCE = "Hello, this is a test of the voice before the first caller."
#: A real utterance, 16 kHz mono PCM16: "What is the weather like today?" (spoken by Piper).
STT_WAV = "proof-utterance.wav"


class EngineError(VoicemeshError, RuntimeError):
    """A local engine cannot run on this machine; the message names the engine and the cause."""


def utterance() -> tuple[bytes, int]:
    """The packaged proof utterance as (PCM16 mono, sample rate)."""
    import soundfile

    with resources.files("voicemesh.connectors").joinpath(STT_WAV).open("rb") as f:
        audio, rate = soundfile.read(f, dtype="int16")
    return np.ascontiguousarray(audio).tobytes(), int(rate)


async def prove(conn: Connector) -> str:
    """Run real input through a loaded connector; raise EngineError if the result is not real
    work. Returns a one-line summary for the log."""
    t0 = time.perf_counter()
    if isinstance(conn, LLMConnector):
        pieces: list[str] = []
        gen = conn.stream(list(LLM_PROMPT))
        try:
            async for piece in gen:
                pieces.append(piece)
                if len(pieces) >= LLM_MAX_PIECES:
                    break
        finally:  # every LLM connector's stream is an async generator, typed an AsyncIterator
            if hasattr(gen, "aclose"):
                await gen.aclose()
        if len(pieces) < LLM_MIN_PIECES:
            raise EngineError(
                f"{conn.engine or conn.name} gave {len(pieces)} tokens for a real question "
                f"(at least {LLM_MIN_PIECES} expected): {''.join(pieces)!r}"
            )
        done = f"{len(pieces)} tokens"
    elif isinstance(conn, STTConnector):
        pcm, rate = utterance()
        text = await conn.transcribe(pcm, rate)
        if not text.strip():
            raise EngineError(f"{conn.engine or conn.name} heard nothing in a real utterance")
        done = f"heard {text!r}"
    elif isinstance(conn, TTSConnector):
        chunks = [c async for c in conn.synthesize(TTS_SENTENCE)]
        audio = np.frombuffer(b"".join(chunks), dtype=np.int16)
        seconds = audio.size / conn.sample_rate
        if seconds < 0.5 or not np.abs(audio).max(initial=0) > 300:
            raise EngineError(
                f"{conn.engine or conn.name} spoke {seconds:.2f} s of near silence for a sentence"
            )
        done = f"{seconds:.1f} s of speech"
    else:  # pragma: no cover - every stage is one of the three
        raise TypeError(f"cannot prove {type(conn).__name__}")
    return f"{conn.engine or conn.name}: {done} in {time.perf_counter() - t0:.2f} s"


def explain(engine: str, stage: str, name: str, returncode: int, tail: list[str]) -> str:
    """What a dead proof process means, in words an operator can act on."""
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        if -returncode == signal.SIGILL:
            return (
                f"{engine} died with an illegal instruction (SIGILL): the installed build targets "
                "a CPU this machine does not have; run make clean && make run"
            )
        return f"{engine} ({stage} connector {name!r}) crashed on real input ({sig or returncode})"
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    return f"{engine} ({stage} connector {name!r}) failed on real input: {last.strip()}"


async def prove_isolated(
    stage: str, name: str, options: ConnectorOptions, engine: str, *, timeout_s: float = 180.0
) -> str:
    """Prove the engine in a child process (see the module docstring); EngineError if it dies."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voicemesh.connectors.proof",
        stage,
        name,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(options.model_dump_json().encode()), timeout_s
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EngineError(
            f"{engine} ({stage} connector {name!r}) did not finish real work in {timeout_s:.0f} s"
        ) from None
    assert proc.returncode is not None
    if proc.returncode != 0:
        tail = list(deque(err.decode(errors="replace").splitlines(), maxlen=20))
        raise EngineError(explain(engine, stage, name, proc.returncode, tail))
    return out.decode().strip()


async def _child(stage: str, name: str) -> str:
    from voicemesh.connectors.registry import ConnectorPool

    options = CONNECTOR_OPTIONS[stage][name].model_validate(orjson.loads(sys.stdin.buffer.read()))
    pool = ConnectorPool()
    try:
        return await prove(await pool.get(stage, name, options))
    finally:
        await pool.aclose()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m voicemesh.connectors.proof STAGE NAME < options.json")
        return 2
    # A crash is reported by the parent from our exit status; a core file would only fill disks.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        print(asyncio.run(_child(*argv)), flush=True)
    except EngineError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
