"""The worker-thread bridge of the local engines (voicemesh/connectors/threads.py): items arrive in
order, a consumer that stops early stops the thread, an exception in the thread is raised on the
loop side, and the thread has ended by the time the iteration is over."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest

from voicemesh.connectors.threads import iterate_in_thread


async def test_items_arrive_in_order_from_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    threads: set[int] = set()

    def count() -> Iterator[int]:
        threads.add(threading.get_ident())
        yield from range(100)

    assert [i async for i in iterate_in_thread(count)] == list(range(100))
    assert threads and loop_thread not in threads


async def test_stopping_early_stops_the_thread_and_releases_what_it_holds() -> None:
    lock = threading.Lock()
    produced: list[int] = []
    closed_in: list[int] = []

    def endless() -> Iterator[int]:
        with lock:  # as an engine's lock: it must be free once the consumer is done
            try:
                i = 0
                while True:
                    produced.append(i)
                    yield i
                    i += 1
            finally:
                closed_in.append(threading.get_ident())

    items = iterate_in_thread(endless)
    got = []
    async with contextlib.aclosing(items):
        async for i in items:
            got.append(i)
            if i == 2:
                break
    assert got == [0, 1, 2]
    assert closed_in and closed_in[0] != threading.get_ident()  # closed in its own thread
    assert not lock.locked()
    stopped_at = len(produced)
    await asyncio.sleep(0.05)
    assert len(produced) == stopped_at  # nothing runs after the iteration is over


async def test_a_cancelled_consumer_stops_the_thread() -> None:
    release = threading.Event()
    finished = threading.Event()

    def slow() -> Iterator[int]:
        try:
            yield 1
            release.wait(5)  # a long engine call under way when the turn is cancelled
            yield 2
            yield 3
        finally:
            finished.set()

    async def consume() -> list[int]:
        return [i async for i in iterate_in_thread(slow)]

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # the cancelled consumer still waits for the thread it started
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


async def test_an_exception_in_the_thread_is_raised_on_the_loop_side_after_its_items() -> None:
    def failing() -> Iterator[str]:
        yield "a"
        yield "b"
        raise OSError("engine died")

    got: list[str] = []
    with pytest.raises(OSError, match="engine died"):
        async for item in iterate_in_thread(failing):
            got.append(item)
    assert got == ["a", "b"]


async def test_an_exception_before_the_first_item_is_raised_too() -> None:
    def no_model() -> Iterator[str]:
        raise RuntimeError("no .gguf model")

    with pytest.raises(RuntimeError, match=r"no \.gguf model"):
        async for _ in iterate_in_thread(no_model):
            pass


async def test_an_exception_object_as_an_item_is_just_an_item() -> None:
    error = ValueError("data, not a failure")
    assert [i async for i in iterate_in_thread(lambda: [error])] == [error]
