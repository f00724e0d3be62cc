"""Did a rerun repeat the runs it replaced? Compare committed runs at a git revision
with the runs at the same paths now.

For every ``metrics.jsonl`` under PATH (in the working tree), this reads the same file
at REV and prints, per run, the rounds in each, the metrics whose values differ in any
round (the largest absolute difference of a number, or over a per-client metric's
clients; "differs" where values are not numbers), and whether every other metric
repeated exactly. Used by docs/results/wireless.md to show what a codec change
did to runs that were made again:

    python benchmarks/compare_runs.py 2fabea7 docs/results/wireless/sst2-cpu/tsfa
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def rows_at(rev: str, path: Path) -> list[dict]:
    shown = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True,
                           text=True, check=True)
    return [json.loads(line) for line in shown.stdout.splitlines()]


def gap(x: object, y: object) -> float | None:
    """The largest absolute difference of two numbers, or of two dicts of numbers with
    the same keys (a per-client metric: the largest over its clients); None where the
    two cannot be compared as numbers (a missing value, a string, other keys)."""
    numbers = (int, float)
    if isinstance(x, numbers) and isinstance(y, numbers):
        return abs(x - y)
    if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
        gaps = [gap(x[k], y[k]) for k in x]
        return None if None in gaps else max(gaps, default=0.0)
    return None


def differences(old: list[dict], new: list[dict]) -> dict[str, float | str]:
    """Per metric that differs in any round: the largest absolute difference (of a
    number, or over a per-client dict's clients), or "differs" where the values cannot
    be compared as numbers."""
    found: dict[str, float | str] = {}
    for a, b in zip(old, new, strict=False):
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if x == y:
                continue
            size, previous = gap(x, y), found.get(key, 0.0)
            if size is None or isinstance(previous, str):
                found[key] = "differs"
            else:
                found[key] = max(size, previous)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision that holds the old runs")
    parser.add_argument("path", type=Path, help="a folder of runs (searched recursively)")
    args = parser.parse_args(argv)
    for metrics in sorted(args.path.rglob("metrics.jsonl")):
        new = [json.loads(line) for line in metrics.read_text().splitlines()]
        old = rows_at(args.rev, metrics)
        shown = ", ".join(f"{k} ({v if isinstance(v, str) else f'{v:.3g}'})"
                          for k, v in differences(old, new).items())
        print(f"{metrics.parent.relative_to(args.path)}: rounds {len(old)} -> {len(new)}; "
              f"differ: {shown or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
