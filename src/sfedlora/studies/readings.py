"""The verdict readings of a study's runs: when a run first reached a line (in
simulated seconds, in bytes) and its final figure, read from ``metrics.jsonl``."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from sfedlora.studies import runs

ACCURACY = "personalized_accuracy"


def curve(run: Path, x: str, metric: str = ACCURACY) -> list[tuple[float, float]]:
    """``(x, metric)`` at every evaluated round that logs both."""
    return [(m[x], m[metric]) for m in runs.metrics(run)
            if m.get(metric) is not None and x in m]


def first_reaching(run: Path, line: float, x: str, metric: str = ACCURACY) -> float:
    """``x`` at the first evaluation whose ``metric`` is at or above ``line``; inf if
    none is."""
    return next((at for at, value in curve(run, x, metric) if value >= line), math.inf)


def time_to(run: Path, line: float, metric: str = ACCURACY) -> float:
    """Simulated seconds to the first evaluation at or above ``line`` (time-to-target)."""
    return first_reaching(run, line, "simulated_seconds", metric)


def bytes_to(run: Path, line: float, metric: str = ACCURACY) -> float:
    """Bytes up and down to the first evaluation at or above ``line`` (bytes-to-target)."""
    return first_reaching(run, line, "bytes_total", metric)


def final(run: Path, metric: str = ACCURACY) -> float:
    """The last evaluation's ``metric``."""
    return [m[metric] for m in runs.metrics(run) if m.get(metric) is not None][-1]


def reached(run: Path, seconds: float, line: float, metric: str = ACCURACY) -> str:
    """When a run reached its line (``seconds`` from :func:`time_to`) and at what
    value, or, if never, its best value and when; at 4 decimals, since a verdict can
    turn on less than a thousandth."""
    points = curve(run, "simulated_seconds", metric)
    if math.isfinite(seconds):
        return f"{seconds:.1f} s ({dict(points)[seconds]:.4f}, line {line:.4f})"
    at, best = max(points, key=lambda point: point[1])
    return f"never (best {best:.4f} at {at:.1f} s, line {line:.4f})"


def mean_latency(run: Path, rounds: int | None = None) -> float:
    """Mean simulated round latency over a run's rounds (its first ``rounds`` if
    given)."""
    return statistics.fmean(m["latency_seconds"] for m in runs.metrics(run)
                            if rounds is None or m["round"] <= rounds)
