"""The micro-benchmarks of this tree against those of an older commit, in one run.

Why: a refactor must not slow the per-frame path, and these machines are too noisy to compare
figures taken at different times. So both trees run their own benchmarks/test_micro.py in
alternating rounds (old, new, new, old, ...), each with its own package first on PYTHONPATH, and
the table gives, per benchmark, the median of the per-round medians and the ratio new ÷ old.

    .venv/bin/python benchmarks/compare_micro.py --against 074b560 [--rounds 4] [--out FILE]

The older commit is checked out into a temporary git worktree (removed afterwards); its
test_micro.py may name modules by their old paths, which is why each tree runs its own file. With
`--this-file`, both run this tree's file instead: for a benchmark the older tree lacks, when both
trees have the modules it imports (the settings it needs only in the newer tree are set only where
they exist, see UNLIMITED in test_micro.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, out: Path, bench: Path | None = None) -> dict[str, float]:
    """Median seconds per benchmark of one pytest-benchmark run of `tree`'s test_micro.py (or of
    `bench`, a file that imports only what both trees have)."""
    subprocess.run(
        [sys.executable, "-m", "pytest", str(bench or tree / "benchmarks/test_micro.py"), "-q",
         "--benchmark-only", f"--benchmark-json={out}", "-p", "no:cacheprovider",
         "--rootdir", str(tree)],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )  # fmt: skip
    data = json.loads(out.read_text())
    return {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="the older commit (any git revision)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/micro-compare.md")
    ap.add_argument(
        "--this-file",
        action="store_true",
        help="run this tree's test_micro.py on both trees (when the older one lacks a benchmark "
        "and has the same module paths)",
    )
    args = ap.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.against], cwd=ROOT, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="voicemesh-old-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for which in order:
                    tree = old if which == "old" else ROOT
                    bench = ROOT / "benchmarks/test_micro.py" if args.this_file else None
                    runs[which].append(run(tree, Path(tmp) / f"{which}{r}.json", bench))
                    print(f"round {r + 1}/{args.rounds}: {which} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip
    names = sorted(set(runs["old"][0]) & set(runs["new"][0]))
    lines = [
        f"# Micro-benchmarks: {head} against {rev}, one run",
        "",
        f"{time.strftime('%Y-%m-%d')}; `benchmarks/compare_micro.py --against {args.against} "
        f"--rounds {args.rounds}{' --this-file' if args.this_file else ''}`; "
        f"medians of {args.rounds} alternating rounds, µs per call.",
        "",
        f"| benchmark | {rev} | {head} | new ÷ old |",
        "|---|---|---|---|",
    ]
    for name in names:
        o = statistics.median(r[name] for r in runs["old"]) * 1e6
        n = statistics.median(r[name] for r in runs["new"]) * 1e6
        lines.append(f"| {name} | {o:.3f} | {n:.3f} | {n / o:.2f} |")
    only = sorted(set(runs["new"][0]) ^ set(runs["old"][0]))
    if only:
        lines += ["", f"In one tree only (not compared): {', '.join(only)}."]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
