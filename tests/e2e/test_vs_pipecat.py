"""benchmarks/bench_vs_pipecat.py. The pipecat side, one turn (slow): the pipecat 1.14 bot on the
offline engines (benchmarks/pipecat_bot.py) must answer the shared WebRTC caller audibly and
report its phases, so the comparison cannot rot unnoticed when pipecat or an engine changes. The
`--before` side (fast, no engines): the old tree's stack must run the old tree's code, go down with
the benchmark however it ends, and leave no checkout behind; and N setups must share the order,
the table and the ratios fairly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_vs_pipecat as bench
from benchmarks.bench_vs_pipecat import pipecat_bot, wait_ready
from tests.conftest import AGENT_FILE
from voicemesh.bench.harness import _speak
from voicemesh.callers.webrtc import AUDIBLE_DBFS, call_over_webrtc
from voicemesh.transport.call.audio import FRAME_BYTES, FRAME_MS
from voicemesh.transport.call.turns import dbfs


@pytest.mark.slow
async def test_pipecat_bot_answers_one_turn_audibly(tmp_path: Path) -> None:
    (wav,) = await asyncio.to_thread(_speak, ["What is the capital of France?"], tmp_path)
    with pipecat_bot(AGENT_FILE, "matched", tmp_path / "bot.log") as (url, proc):
        await wait_ready(url, proc, limit_s=90)
        result = await call_over_webrtc(url, [wav], None, turn_timeout=30)

    (turn,) = result.turns
    assert "france" in turn.user_text.lower(), turn.user_text
    assert turn.bot_text, "no reply text"
    # timed on sound: the caller heard the bot, not just an event about it
    assert turn.latency_ms is not None and 0 < turn.latency_ms < 15_000
    pcm = bytes(turn.bot_audio)
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
    audible_s = sum(dbfs(f) > AUDIBLE_DBFS for f in frames) * FRAME_MS / 1000
    assert audible_s > 0.5, f"only {audible_s:.2f} s of audible bot audio"
    assert np.frombuffer(pcm, np.int16).std() > 100
    # pipecat's own figures reach the report: its observers and service metrics still fire
    for key in ("eou_ms", "llm_ttft_ms", "tts_ttfb_ms", "v2v_ms"):
        assert turn.phases.get(key) is not None, (key, turn.phases)


# --- N setups ---------------------------------------------------------------------------------


def test_order_puts_every_setup_in_every_position_over_n_blocks() -> None:
    three = bench.SETUPS_BEFORE
    orders = [bench.order_of(three, b) for b in range(3)]
    for position in range(3):
        assert sorted(o[position] for o in orders) == sorted(three), orders
    assert all(sorted(o) == sorted(three) for o in orders)  # each block calls every setup once
    # two setups: alternating, as before --before existed
    assert [bench.order_of(bench.SETUPS, b) for b in range(3)] == [
        ("voicemesh", "pipecat"),
        ("pipecat", "voicemesh"),
        ("voicemesh", "pipecat"),
    ]


def _rows(setup: str, caller_ms: list[float]) -> list[dict[str, object]]:
    return [
        {
            "setup": setup,
            "block": 0,
            "wav": f"{i}.wav",
            "caller_ms": ms,
            **{key: ms / 4 for key, _ in bench.PHASES},
            "user_text": "hi",
            "bot_text": "hello",
            "engine": "smollm2",
            "error": None,
        }
        for i, ms in enumerate(caller_ms)
    ]


def _report(setups: tuple[str, ...]) -> dict[str, object]:
    times = {
        "before": [2000.0, 2100.0, 2200.0],
        "voicemesh": [1000.0, 1050.0, 1100.0],
        "pipecat": [1600.0, 1650.0, 1700.0],
    }
    rows = [r for s in setups for r in _rows(s, times[s])]
    cpu = {s: {"active": 8.0, "idle_other": 0.5} for s in setups}
    return {
        "machine": {"cores": 2, "memory_gib": 8, "cpu": "x", "python": "3.11", "date": "now"},
        "command": "python benchmarks/bench_vs_pipecat.py",
        "setups": setups,
        "revisions": {
            "voicemesh": {"commit": "abc1234", "dirty": False},
            "before": {"rev": "4f1e834", "commit": "4f1e834b1957"},
        },
        "load_before": (0.0, 0.0, 0.0),
        "load_after": (0.0, 0.0, 0.0),
        "wavs": "w",
        "turns_planned": 3,
        "block": 3,
        "whisper": "matched",
        "rows": rows,
        "calls": [],
        "cpu": cpu,
        "summary": bench.summarize(rows, cpu, setups),
    }


def test_three_setups_get_a_column_each_and_after_over_pipecat_and_over_before(
    tmp_path: Path,
) -> None:
    report = _report(bench.SETUPS_BEFORE)
    ratios = report["summary"]["ratios"]  # type: ignore[index]
    assert ratios["voicemesh/pipecat"]["caller_ms"] == round(1050 / 1650, 3)
    assert ratios["voicemesh/before"]["caller_ms"] == round(1050 / 2100, 3)
    text = bench.markdown(report, None)
    header = next(line for line in text.splitlines() if line.startswith("| | "))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "",
        "before (voicemesh @ 4f1e834)",
        "after (voicemesh @ abc1234)",
        "pipecat",
        "after ÷ pipecat",
        "after ÷ before",
    ]
    p50 = next(line for line in text.splitlines() if line.startswith("| caller v2v p50 |"))
    assert [c.strip() for c in p50.strip("|").split("|")][1:] == [
        "2100 ms",
        "1050 ms",
        "1650 ms",
        "0.64",
        "0.50",
    ]
    assert "**after p50 ÷ before p50 (at the caller): 0.50**" in text
    # the plot draws every setup
    png = tmp_path / "p.png"
    if bench.plot(report, png):
        assert png.stat().st_size > 0


def test_two_setups_keep_the_old_table_and_ratio() -> None:
    report = _report(bench.SETUPS)
    text = bench.markdown(report, None)
    assert text.startswith("# voicemesh beside pipecat, same engines, same caller\n")
    assert "| | " not in text and "after ÷" not in text and "before (" not in text
    assert "ratios" not in report["summary"]  # type: ignore[operator]
    assert report["summary"]["ratio_p50"] == round(1050 / 1650, 3)  # type: ignore[index]


# --- before: the old tree's stack -------------------------------------------------------------


def test_before_needs_an_environment_the_helper_can_call() -> None:
    here = (Path(bench.ROOT) / "voicemesh" / "bench" / "harness.py").read_text()
    assert bench.harness_compatible(here)
    changed = here.replace(
        "async def environment(agent_file: Path, progress: Callable[[str], None])",
        "async def environment(agent_file: Path, *, progress: Callable[[str], None])",
    )
    assert changed != here and not bench.harness_compatible(changed)
    assert not bench.harness_compatible("async def environment(config, progress): ...")
    with pytest.raises(SystemExit, match="not a commit"):
        bench.resolve_before("no-such-revision-5d1f")


def _worktrees() -> str:
    return bench.git("worktree", "list", "--porcelain")


def test_the_old_checkout_is_removed_when_the_run_fails(tmp_path: Path) -> None:
    where = tmp_path / "tree"
    with pytest.raises(RuntimeError, match="boom"), bench.checkout("HEAD", where):
        assert (where / "voicemesh" / "bench" / "harness.py").is_file()
        assert str(where) in _worktrees()
        raise RuntimeError("boom")
    assert not where.exists()
    assert str(where) not in _worktrees()


#: a stand-in for an old tree's harness: one "role" process and no engines; its teardown leaves a
#: mark, or, with HANG, never returns
FAKE_HARNESS = """
import contextlib, os, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace

@contextlib.asynccontextmanager
async def environment(agent_file, progress):
    role = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    server = SimpleNamespace(proc=role)
    env = SimpleNamespace(
        http_url="http://127.0.0.1:9", stack=SimpleNamespace(procs={"llm": role}),
        relay_pids=lambda: [], nats=server, valkey=server,
    )
    try:
        yield env
    finally:
        if os.environ.get("HANG"):
            time.sleep(600)
        role.terminate()
        role.wait()
        Path("torn-down").write_text(str(agent_file))
"""


def _fake_tree(root: Path, package: bool = True) -> Path:
    if package:
        (root / "voicemesh" / "bench").mkdir(parents=True)
        (root / "voicemesh" / "__init__.py").write_text("")
        (root / "voicemesh" / "bench" / "__init__.py").write_text("")
        (root / "voicemesh" / "bench" / "harness.py").write_text(textwrap.dedent(FAKE_HARNESS))
    (root / "config").mkdir(parents=True)
    (root / "config" / "agent-config.json").write_text("{}")
    return root.resolve()


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


async def test_the_old_stack_runs_the_old_tree_and_stops_when_our_pipe_closes(
    tmp_path: Path,
) -> None:
    tree = _fake_tree(tmp_path / "old")
    log = tmp_path / "helper.log"
    with log.open("wb") as logfile:
        old = bench.start_helper(tree, log, logfile)
        try:
            await old.ready(limit_s=60)
            assert old.url == "http://127.0.0.1:9"
            (role,) = old.roles.values()
            assert bench.cwd_of(role) == tree  # so `python -m voicemesh` there imports the old tree
        finally:
            old.stop()
    assert old.proc.returncode == 0, log.read_text()
    assert (tree / "torn-down").read_text() == str(tree / "config" / "agent-config.json")
    assert _gone(role)


async def test_the_old_stack_refuses_a_voicemesh_that_is_not_the_old_trees(
    tmp_path: Path,
) -> None:
    # no voicemesh package in the tree: the import falls through to this checkout's voicemesh,
    # which would make "before" measure today's code
    tree = _fake_tree(tmp_path / "old", package=False)
    log = tmp_path / "helper.log"
    with log.open("wb") as logfile:
        old = bench.start_helper(tree, log, logfile)
        try:
            with pytest.raises(RuntimeError, match="not the old tree's"):
                await old.ready(limit_s=60)
        finally:
            old.stop()


async def test_a_stuck_old_stack_is_killed_with_everything_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "BEFORE_STOP_S", 0.5)
    monkeypatch.setattr(bench, "BEFORE_TERM_S", 0.5)
    monkeypatch.setenv("HANG", "1")
    tree = _fake_tree(tmp_path / "old")
    log = tmp_path / "helper.log"
    with log.open("wb") as logfile:
        old = bench.start_helper(tree, log, logfile)
        try:
            await old.ready(limit_s=60)
            (role,) = old.roles.values()
        finally:
            t0 = time.monotonic()
            old.stop()
    assert time.monotonic() - t0 < 10
    assert old.proc.returncode == -signal.SIGKILL
    assert _gone(role)
    assert not (tree / "torn-down").exists()


def test_sigterm_stops_the_benchmark_and_what_it_started(tmp_path: Path) -> None:
    """SIGTERM unwinds like Ctrl-C (the helper's `finally` runs), instead of killing the script
    and leaving its stacks running."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(bench.ROOT)!r})
            from benchmarks import bench_vs_pipecat as bench

            async def run(args, command):
                print("running", flush=True)
                try:
                    await asyncio.sleep(60)
                finally:
                    print("unwound", flush=True)

            bench.run = run
            sys.argv = ["bench_vs_pipecat.py"]
            bench.main()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "unwound"
    assert proc.returncode == 143
