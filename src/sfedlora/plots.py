"""Figures from run directories: a metric against rounds or against the cumulative
bytes that crossed the wire (up plus down), one line per run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

X_AXES = {"round": "round", "bytes": "bytes_total"}
X_LABELS = {"round": "round", "bytes": "cumulative bytes sent (up + down, all clients)"}


def load_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: Sequence[Path], out: Path, x: str = "round",
              y: str = "personalized_accuracy", labels: Sequence[str] | None = None,
              log_x: bool | None = None, title: str | None = None) -> Path:
    """Draw ``y`` against ``x`` (``round`` or ``bytes``) for every run; rounds without
    an evaluation are skipped. Bytes use a log axis by default (arms differ by decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"x={x!r}: choose one of {sorted(X_AXES)}")
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir, label in zip(run_dirs, labels, strict=True):
        points = [(m[X_AXES[x]], m[y]) for m in load_metrics(run_dir)
                  if m.get(y) is not None and m.get(X_AXES[x]) is not None]
        if not points:
            raise ValueError(f"{run_dir}: no round has both {X_AXES[x]!r} and {y!r}")
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if log_x if log_x is not None else x == "bytes":
        ax.set_xscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
