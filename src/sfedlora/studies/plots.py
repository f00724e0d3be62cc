"""Figures from run directories: a metric against rounds or against the cumulative
bytes that crossed the wire (up plus down), one line per run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from sfedlora.core.records import Metric
from sfedlora.studies import runs as run_files

X_AXES = {"round": "round", "bytes": Metric.BYTES_TOTAL,
          "simulated_seconds": Metric.SIMULATED_SECONDS}
X_LABELS = {"round": "round", "bytes": "cumulative bytes sent (up + down, all clients)",
            "simulated_seconds": "simulated time (s, network.model=wireless)"}

log = logging.getLogger(__name__)


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
        points = [(m[X_AXES[x]], m[y]) for m in run_files.metrics(run_dir)
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


# --- sweeps: the scaling study's figures -----------------------------------------------


def _rule_label(row, rule_keys: Sequence[str]) -> str:
    return " / ".join(str(row[k]) for k in rule_keys if k in row and str(row[k]) != "nan")


def plot_sweep(sweep_dir: Path, out_dir: Path | None = None, rank_key: str = "lora.rank",
               rule_keys: Sequence[str] = ("lora.scaling", "lora.a_init"),
               panel_key: str = "clients.num", metric: str = "personalized_accuracy"
               ) -> list[Path]:
    """The paper's figures from a sweep directory (see :mod:`sfedlora.studies.sweep`), one set
    per value of every other swept key (e.g. the optimizer):

    * ``curves``: ``metric`` against round, one line per rank, one panel per rule and
      ``panel_key`` value (mean over seeds);
    * ``final_vs_rank``: final ``metric`` against rank per rule, one panel per
      ``panel_key`` value (mean and std over seeds);
    * ``stability``: the mean over logged rounds of the gradient norm of B and of
      ``||gamma B A x||`` against rank per rule (log-log).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir / "figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = pd.read_csv(sweep_dir / "results.csv")
    if rank_key not in results:
        raise ValueError(f"{sweep_dir}: the sweep does not vary {rank_key!r}")
    if panel_key not in results:
        results[panel_key] = "-"
    # Curves and stability need every run's metrics.jsonl; the final values come from
    # results.csv alone, so a sweep committed without its runs still regenerates those.
    per_run = all((sweep_dir / "runs" / n / run_files.METRICS).is_file() for n in results["run"])
    if not per_run:
        log.warning("%s: some runs have no metrics.jsonl under runs/; drawing only the final "
                    "values from results.csv (no curves or stability figures)", sweep_dir)
    for name in results["run"] if per_run else []:
        lines = run_files.metrics(sweep_dir / "runs" / name)
        results.loc[results["run"] == name, "grad_B_mean"] = np.nanmean(
            [m.get("grad_norm_B") or np.nan for m in lines])
        results.loc[results["run"] == name, "output_norm_mean"] = np.nanmean(
            [m.get("adapter_output_norm") or np.nan for m in lines])
    written = []
    for suffix, where, frame in _by_other_keys(results, rule_keys, {rank_key, panel_key}):
        rules = list(dict.fromkeys(frame["rule"]))
        panels = sorted(frame[panel_key].unique(), key=_numeric_first)
        ranks = sorted(frame[rank_key].unique())

        if per_run:
            written.append(_curves(frame, sweep_dir, panels, rules, ranks, panel_key,
                                   rank_key, metric, out_dir / f"curves{suffix}.png", where))

        fig, axes = plt.subplots(1, len(panels), squeeze=False, sharey=True,
                                 figsize=(4.2 * len(panels), 3.4))
        for ax, panel in zip(axes[0], panels, strict=True):
            for rule in rules:
                sel = frame[(frame[panel_key] == panel) & (frame["rule"] == rule)]
                stats = sel.groupby(rank_key)[metric].agg(["mean", "std"]).reset_index()
                ax.errorbar(stats[rank_key], stats["mean"], yerr=stats["std"].fillna(0),
                            marker="o", capsize=3, label=rule)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r")
            ax.set_title(f"{panel_key}={panel}", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel(f"final {metric.replace('_', ' ')}")
        axes[0][-1].legend(fontsize=7)
        written.append(_save(fig, out_dir / f"final_vs_rank{suffix}.png", where))

        if not per_run:
            continue
        fig, axes = plt.subplots(2, len(panels), squeeze=False,
                                 figsize=(4.2 * len(panels), 6.0))
        for col, panel in enumerate(panels):
            for row, (column, label) in enumerate((
                    ("grad_B_mean", "gradient norm of B"),
                    ("output_norm_mean", "||gamma B A x||"))):
                ax = axes[row][col]
                for rule in rules:
                    sel = frame[(frame[panel_key] == panel) & (frame["rule"] == rule)]
                    stats = sel.groupby(rank_key)[column].mean()
                    ax.plot(stats.index, stats.values, marker="o", label=rule)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("rank r")
                ax.set_ylabel(label)
                ax.set_title(f"{panel_key}={panel}", fontsize=9)
                ax.grid(True, alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        written.append(_save(fig, out_dir / f"stability{suffix}.png", where))
    return written


def _curves(frame, sweep_dir: Path, panels, rules, ranks, panel_key: str, rank_key: str,
            metric: str, path: Path, where: str) -> Path:
    """``metric`` against round, one line per rank, one panel per rule and panel value
    (mean over seeds), from each run's metrics.jsonl."""
    import matplotlib.pyplot as plt
    import numpy as np

    colours = plt.cm.viridis(np.linspace(0, 0.9, len(ranks)))
    fig, axes = plt.subplots(len(panels), len(rules), squeeze=False, sharey=True,
                             figsize=(3.6 * len(rules), 2.8 * len(panels)))
    for i, panel in enumerate(panels):
        for j, rule in enumerate(rules):
            ax = axes[i][j]
            for colour, rank in zip(colours, ranks, strict=True):
                runs = frame[(frame[panel_key] == panel) & (frame["rule"] == rule)
                             & (frame[rank_key] == rank)]["run"]
                curves = [[(m["round"], m[metric]) for m in run_files.metrics(
                    sweep_dir / "runs" / r) if m.get(metric) is not None] for r in runs]
                if not curves or not curves[0]:
                    continue
                rounds = [p[0] for p in curves[0]]
                mean = np.mean([[p[1] for p in c] for c in curves], axis=0)
                ax.plot(rounds, mean, color=colour, label=f"r={rank}")
            ax.set_title(f"{rule}, {panel_key}={panel}", fontsize=9)
            ax.set_xlabel("round")
            ax.grid(True, alpha=0.3)
        axes[i][0].set_ylabel(metric.replace("_", " "))
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path, where)


def plot_lr_transfer(sweep_dir: Path, out_dir: Path | None = None,
                     curve_key: str | None = None,
                     rule_keys: Sequence[str] = ("lora.scaling", "lora.a_init"),
                     lr_key: str = "local.lr") -> list[Path]:
    """Learning-rate transfer from a sweep's ``results.csv``: for each rule, the final
    held-out loss against the learning rate (log axis), one curve per value of
    ``curve_key`` (the rank, or else the client count), mean over seeds with 95%
    intervals, each curve's minimum starred. The validation loss is drawn where the
    runs have one (what a learning rate is chosen on), else the test loss, labelled so.
    One figure per value of every other swept key (e.g. the optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from matplotlib.ticker import NullFormatter

    from sfedlora.studies.stats import ci95
    from sfedlora.studies.sweep import SELECT_ON

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir / "figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = pd.read_csv(sweep_dir / "results.csv")
    if lr_key not in results or results[lr_key].nunique() < 2:
        raise ValueError(f"{sweep_dir}: the sweep does not vary {lr_key!r}")
    if curve_key is None:
        curve_key = next((k for k in ("lora.rank", "clients.num")
                          if k in results and results[k].nunique() > 1), None)
    if curve_key is None or curve_key not in results:
        raise ValueError(f"{sweep_dir}: give the key to draw one curve per value of")
    metric = SELECT_ON if SELECT_ON in results and results[SELECT_ON].notna().any() \
        else "personalized_loss"
    written = []
    for suffix, where, frame in _by_other_keys(results, rule_keys, {lr_key, curve_key}):
        rules = list(dict.fromkeys(frame["rule"]))
        values = sorted(frame[curve_key].unique(), key=_numeric_first)
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
        fig, axes = plt.subplots(1, len(rules), squeeze=False, sharey=True,
                                 figsize=(3.8 * len(rules), 3.4))
        for ax, rule in zip(axes[0], rules, strict=True):
            for colour, value in zip(colours, values, strict=True):
                sel = frame[(frame["rule"] == rule) & (frame[curve_key] == value)]
                stats = sel.groupby(lr_key)[metric].agg(["mean", ci95]).reset_index()
                if stats.empty:
                    continue
                ax.errorbar(stats[lr_key], stats["mean"], yerr=stats["ci95"].fillna(0),
                            color=colour, marker="o", ms=3, capsize=2,
                            label=f"{curve_key.split('.')[-1]}={value}")
                best = stats.loc[stats["mean"].idxmin()]
                ax.plot(best[lr_key], best["mean"], marker="*", ms=12, color=colour,
                        markeredgecolor="black")
            ax.set_xscale("log")
            # a ladder spanning under a decade gets labelled minor ticks that overlap
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("learning rate")
            ax.set_title(rule, fontsize=9)
            ax.grid(True, alpha=0.3)
        label = "validation loss" if metric == SELECT_ON else "test loss (no validation part)"
        axes[0][0].set_ylabel(f"final held-out {label}")
        axes[0][-1].legend(fontsize=7)
        written.append(_save(fig, out_dir / f"lr_transfer{suffix}.png", where))
    return written


def _by_other_keys(results, rule_keys: Sequence[str], drawn: set[str]):
    """Label each run with its rule (``rule`` column) and yield ``(file suffix, title,
    runs)`` for each value of every swept key that a figure does not draw itself (the
    optimizer, say): one set of figures each."""
    rule_keys = [k for k in rule_keys if k in results]
    results["rule"] = [_rule_label(r, rule_keys) or "run" for _, r in results.iterrows()]
    fixed = {"run", "seed", "rule", *rule_keys, *drawn}
    split_keys = [k for k in results.columns
                  if k not in fixed and k not in _metric_columns(results)]
    groups = results.groupby(split_keys, sort=False) if split_keys else [((), results)]
    for split, frame in groups:
        split = split if isinstance(split, tuple) else (split,)
        yield ("".join(f"_{k}-{v}" for k, v in zip(split_keys, split, strict=True)),
               ", ".join(f"{k}={v}" for k, v in zip(split_keys, split, strict=True)), frame)


def _numeric_first(value) -> tuple:
    """Sort key: numbers in numeric order (5 before 10), then anything else as text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _metric_columns(results) -> set[str]:
    from sfedlora.studies.sweep import TABLE_METRICS

    return {*TABLE_METRICS, "grad_B_mean", "output_norm_mean"}


def _save(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_figure(fig, path: Path) -> None:
    """A study's figure as a PNG at ``path`` (its folder made), the figure closed."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
