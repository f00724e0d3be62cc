"""Did a rerun repeat the runs it replaced? Compare committed runs at a git revision
with the runs at the same paths now.

For every ``metrics.jsonl`` under PATH (in the working tree), this reads the same file
at REV and prints, per run, the rounds in each, the metrics whose values differ in any
round (the largest absolute difference of a number, or over a per-client metric's
clients; "differs" where values are not numbers), whether every other metric
repeated exactly, and what differs between the environments that wrote the two
(``environment.jsonl``: library versions, CPU, torch's kernels) where both say. Used
by docs/results/wireless.md to show what a codec change did to runs that were made
again:

    python benchmarks/compare_runs.py 2fabea7 docs/results/wireless/sst2-cpu/tsfa
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from sfedlora.studies.compare import differences, environment_changes


def text_at(rev: str, path: Path) -> str | None:
    """A file's text at git revision ``rev``; None where the revision has no such file."""
    shown = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True,
                           text=True)
    return shown.stdout if shown.returncode == 0 else None


def rows_at(rev: str, path: Path) -> list[dict]:
    text = text_at(rev, path)
    if text is None:
        raise SystemExit(f"{path} is not in git revision {rev}: nothing to compare it with")
    return [json.loads(line) for line in text.splitlines()]


def environment_at(rev: str | None, path: Path) -> list[dict]:
    """A run's ``environment.jsonl`` records, from git revision ``rev`` or (None) the
    working tree; empty where it has none."""
    if rev is not None:
        text = text_at(rev, path)
    elif path.is_file():
        text = path.read_text()
    else:
        text = None
    return [json.loads(line) for line in (text or "").splitlines()]


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
        environment = metrics.parent / "environment.jsonl"
        changes = environment_changes(environment_at(args.rev, environment),
                                      environment_at(None, environment))
        print(f"{metrics.parent.relative_to(args.path)}: rounds {len(old)} -> {len(new)}; "
              f"differ: {shown or 'nothing'}; environment: {changes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
