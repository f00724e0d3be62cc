"""How studies print numbers: mean ± 95% interval cells and markdown tables, one
spelling for every study's table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from sfedlora.studies.stats import ci95


def mean_pm(mean: float | None, half: float, fmt: str = ".3f", half_fmt: str | None = None
            ) -> str:
    """``mean ± half``, the mean in format ``fmt`` and the half-width in ``half_fmt``
    (default ``fmt``); ``mean`` alone where one seed gives no interval (``half`` is
    nan); ``-`` where there is no mean."""
    if mean is None or math.isnan(mean):
        return "-"
    text = format(mean, fmt)
    return text if math.isnan(half) else f"{text} ± {format(half, half_fmt or fmt)}"


def values_pm(values: Sequence[float], digits: int = 3) -> str:
    """:func:`mean_pm` of ``values`` (one per seed), or, where some are infinite (a
    target never reached), how many of them are."""
    missed = sum(not math.isfinite(v) for v in values)
    if missed:
        return f"not reached in {missed} of {len(values)}"
    return mean_pm(statistics.fmean(values), ci95(list(values)), f".{digits}f")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (cells as given, ``str`` of anything else)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
