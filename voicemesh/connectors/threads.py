"""A blocking generator run in a worker thread, read as an async iterator.

Local engines (llama.cpp, Piper) produce their output in blocking calls that must not run on the
event loop, yet the stage wants each piece as soon as it exists. `iterate_in_thread` runs the
generator in a thread and hands its items over one by one. A consumer that stops early (a barge-in
cancels the turn) makes the thread stop at its next item instead of finishing the whole reply,
which would keep the engine's lock, and the CPU, from the next turn.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows),
    not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def clamp_threads(requested: int) -> int:
    """A config's engine thread count, at most the cores this process has: more threads than
    cores only make a tenant's engine crowd out every other session's."""
    return max(1, min(requested, usable_cores()))


_DONE = object()


class _Raised:
    """An exception from the thread, wrapped so an item that is itself an exception passes."""

    def __init__(self, exc: Exception):
        self.exc = exc


async def iterate_in_thread(produce: Callable[[], Iterable[T]]) -> AsyncGenerator[T, None]:
    """The items of `produce()`, which is called and iterated in a worker thread.

    `produce` is called in the thread, so a generator function's whole body (taking the engine's
    lock, loading the model) runs there. An exception it raises is raised here; when the consumer
    stops early, the generator is closed in its thread (its `finally` and `with` blocks run there)
    and this waits for the thread to end, so the engine is free once the iteration is over.
    """
    loop = asyncio.get_running_loop()
    # unbounded: the thread never blocks on a slow consumer, it only checks `stop` between items
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            items = iter(produce())
            try:
                for item in items:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            finally:
                close = getattr(items, "close", None)
                if close is not None:  # a generator left mid-way: release what it holds here
                    close()
        except Exception as exc:
            loop.call_soon_threadsafe(queue.put_nowait, _Raised(exc))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        # shielded: a cancelled consumer still waits for the thread, which may hold the engine
        await asyncio.shield(worker)
