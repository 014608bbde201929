"""`voicemesh up`'s supervision of its roles (voicemesh/launcher.py) and its port check (cli.py):
a role that exits is restarted with backoff, one that keeps exiting (or whose engine cannot run)
stops the stack with its last words, and a port that only holds TIME_WAIT sockets is free."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from voicemesh.cli import _check_port_free
from voicemesh.launcher import ENGINE_FAILED, CrashLoop, Stack, describe_exit


class ScriptedStack(Stack):
    """Roles that run a line of Python instead of `voicemesh serve`."""

    def __init__(self, code: str, tmp: Path):
        super().__init__({"PYTHONUNBUFFERED": "1"})
        self.code, self.tmp = code, tmp

    def command(self, role: str) -> list[str]:
        return [sys.executable, "-c", self.code, str(self.tmp / role)]


async def supervise_until(stack: Stack, done: asyncio.Event, said: list[str]) -> None:
    await stack.supervise(done.is_set, said.append, first_backoff_s=0.05, max_backoff_s=0.2)


async def test_a_role_that_exits_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    # exits (status 3) the first time, then runs until stopped
    code = (
        "import os, sys, time\n"
        "if not os.path.exists(sys.argv[1]):\n"
        "    open(sys.argv[1], 'w').close(); print('first run, exiting'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    stack = ScriptedStack(code, tmp_path)
    stack.spawn("llm", "llm")
    stack.spawn("tts", "tts")
    (tmp_path / "tts").touch()  # tts stays up from the start
    tts_pid = stack.procs["tts"].pid
    done, said = asyncio.Event(), []
    task = asyncio.create_task(supervise_until(stack, done, said))
    try:
        for _ in range(100):
            if any("llm restarted" in s for s in said):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert stack.procs["llm"].poll() is None, said  # running again
        assert stack.procs["tts"].pid == tts_pid and stack.procs["tts"].poll() is None
        assert said[0].startswith("llm exit status 3; restarting it in 0.1 s"), said
        assert "the rest of the stack keeps running" in said[0]
        assert said[1].startswith("llm restarted (pid "), said
        assert len(said) == 2, said
    finally:
        done.set()
        await task
        await asyncio.to_thread(stack.stop, 5)


async def test_a_role_that_keeps_exiting_stops_the_stack_naming_it(tmp_path: Path) -> None:
    code = "import sys; print('cannot open the model: no such file'); sys.exit(3)"
    stack = ScriptedStack(code, tmp_path)
    stack.spawn("stt", "stt")
    done, said = asyncio.Event(), []
    try:
        with pytest.raises(CrashLoop) as caught:
            await asyncio.wait_for(supervise_until(stack, done, said), 30)
    finally:
        await asyncio.to_thread(stack.stop, 5)
    message = str(caught.value)
    assert message.startswith("stt exited 5 times within 60 s: stopping the stack."), message
    assert "stt exit status 3; its last lines:" in message
    assert "cannot open the model: no such file" in message
    assert sum("restarting it in" in s for s in said) == 4, said


async def test_a_role_whose_engine_cannot_run_is_not_restarted(tmp_path: Path) -> None:
    code = (
        "import sys; print('voicemesh serve llm: llama.cpp died with an illegal instruction "
        f"(SIGILL)', file=sys.stderr); sys.exit({ENGINE_FAILED})"
    )
    stack = ScriptedStack(code, tmp_path)
    stack.spawn("llm", "llm")
    said: list[str] = []
    try:
        with pytest.raises(CrashLoop, match=r"llama.cpp died with an illegal instruction"):
            await asyncio.wait_for(supervise_until(stack, asyncio.Event(), said), 30)
    finally:
        await asyncio.to_thread(stack.stop, 5)
    assert said == []  # no restart: it would only die the same way


def test_exit_statuses_read_as_words() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-4) == "killed by SIGILL"
    assert describe_exit(2) == "exit status 2"


def test_a_port_left_in_time_wait_by_a_stopped_stack_is_free_but_a_listening_one_is_not() -> None:
    """Ctrl-C, then `make run` at once: the stopped server's accepted connections sit in
    TIME_WAIT, which uvicorn (SO_REUSEADDR) binds over; the check must agree with it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    with pytest.raises(ValueError, match=rf"cannot serve on 127.0.0.1:{port} \(Address already"):
        _check_port_free("127.0.0.1", port)
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    listener.close()
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    ours = {row[3] for row in rows if row[1].endswith(f":{port:04X}")}
    assert ours == {"06"}, ours  # only TIME_WAIT (06) is left on the port
    _check_port_free("127.0.0.1", port)  # no error
