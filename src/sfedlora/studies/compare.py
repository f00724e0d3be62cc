"""What differs between two runs' metrics and environments: the pieces of
``benchmarks/compare_runs.py`` (did a rerun repeat the runs it replaced?)."""

from __future__ import annotations

import json


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
