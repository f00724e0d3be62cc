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


# what says nothing about the arithmetic: when and how a process was started
NOT_ENVIRONMENT = ("from_round", "started_at", "argv")


def flat(record: dict, prefix: str = "") -> dict:
    """A nested record as dotted keys (``packages.torch``)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def environment_changes(old: list[dict], new: list[dict]) -> str:
    """What differs between the environments that wrote two runs (``environment.jsonl``
    records; every process of a run counts), e.g. ``packages.transformers 5.24.0 ->
    5.25.0``; "same", or which side did not record one."""
    if not old or not new:
        return "not recorded " + ("in either run" if not old and not new
                                  else "in the old run" if not old else "in the new run")
    def values(records):
        found: dict[str, set] = {}
        for record in records:
            for key, value in flat(record).items():
                if key not in NOT_ENVIRONMENT:
                    found.setdefault(key, set()).add(json.dumps(value))
        return found
    before, after = values(old), values(new)
    changed = [f"{k} {'/'.join(sorted(before.get(k, {'-'})))} -> "
               f"{'/'.join(sorted(after.get(k, {'-'})))}"
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return "; ".join(changed) or "same"


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
