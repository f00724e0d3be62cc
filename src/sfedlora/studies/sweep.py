"""Sweeps: the cross product of grid values over one base config, each run in its own
directory, resumable, summarised in one table (mean and spread over seeds).

Keys joined by ``+`` vary together instead of crossing: ``lora.scaling+lora.a_init=
lora+shared,sfed+independent`` gives two runs, not four.

A sweep directory holds ``runs/<name>/`` (ordinary run directories, named after their
grid values), ``results.csv`` (one row per run) and ``table.csv`` / ``table.md`` (rows
grouped by every grid key except ``seed``). Rerunning the same command skips finished
runs and resumes interrupted ones from their checkpoint, so a long sweep can be spread
over several sessions. ``shard=(k, m)`` runs only every m-th run starting at k, so m
processes (one per GPU, node or core) share one sweep directory; the tables are written
once every run is finished.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sfedlora.config import ConfigError, load_config, parse_value
from sfedlora.core.records import Metric
from sfedlora.data.catalog import WHERE_KEYS, same_files
from sfedlora.studies import runs as run_files
from sfedlora.studies.preflight import ClientData
from sfedlora.studies.stats import ci95
from sfedlora.studies.tables import mean_pm

log = logging.getLogger(__name__)

TABLE_METRICS = tuple(str(m) for m in (
    Metric.PERSONALIZED_VAL_LOSS, Metric.PERSONALIZED_VAL_ACCURACY,
    Metric.PERSONALIZED_ACCURACY, Metric.PERSONALIZED_BALANCED_ACCURACY,
    Metric.MAJORITY_BASELINE_ACCURACY, Metric.GLOBAL_ACCURACY, Metric.PERSONALIZED_LOSS,
    Metric.PERSONALIZED_LOSS_STD, Metric.TRAIN_LOSS, Metric.GRAD_NORM_A, Metric.GRAD_NORM_B,
    Metric.NORM_A_MEAN, Metric.ADAPTER_OUTPUT_NORM, Metric.BYTES_TOTAL,
    Metric.PERSONALIZED_PERPLEXITY, Metric.GLOBAL_PERPLEXITY,
))


@dataclass(frozen=True)
class SweepRun:
    values: dict[str, object]  # grid key -> value

    @property
    def name(self) -> str:
        return "__".join(f"{k}-{v}" for k, v in self.values.items()).replace("/", "_")

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                for k, v in self.values.items()]


Grid = dict[str, list]  # "key" or "key1+key2" -> values (tuples for joint keys)


def parse_grid(items: Sequence[str]) -> Grid:
    """``["lora.rank=4,16", "seed=0,1"]`` -> ``{"lora.rank": [4, 16], "seed": [0, 1]}``;
    a joint key ``a+b=x+y,z+w`` -> ``{"a+b": [(x, y), (z, w)]}``."""
    if not items:
        raise ConfigError("a sweep needs at least one --grid dotted.key=v1,v2,...")
    grid: Grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r} is not of the form dotted.key=v1,v2,...")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values once")
        width = len(key.split("+"))
        parsed = []
        for value in values.split(","):
            parts = [parse_value(v) for v in value.split("+")] if width > 1 else [value]
            if len(parts) != width:
                raise ConfigError(f"--grid {key}: value {value!r} needs {width} parts "
                                  "joined by '+'")
            parsed.append(tuple(parts) if width > 1 else parse_value(value))
        grid[key] = parsed
    return grid


def grid_keys(grid: Grid) -> list[str]:
    """The config keys a grid sets, joint keys split."""
    return [k for key in grid for k in key.split("+")]


def expand(grid: Grid) -> list[SweepRun]:
    runs = []
    for combo in itertools.product(*grid.values()):
        values: dict[str, object] = {}
        for key, value in zip(grid, combo, strict=True):
            keys = key.split("+")
            values.update(zip(keys, value if len(keys) > 1 else (value,), strict=True))
        runs.append(SweepRun(values))
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: this process runs runs 2, 10, 18, ... of the grid."""
    index, sep, count = text.partition("/")
    try:
        k, m = int(index), int(count)
    except ValueError:
        k, m = -1, 0
    if not sep or m < 1 or not 0 <= k < m:
        raise ConfigError(f"--shard {text!r} must be K/M with 0 <= K < M, e.g. --shard 0/4")
    return k, m


def run_sweep(config: str | None, grid: dict[str, list], out: Path,
              overrides: Sequence[str] = (), on_start: Callable[[str], None] | None = None,
              shard: tuple[int, int] = (0, 1),
              load: Callable[[list[str]], object] | None = None,
              batched: int = 1, tune_on: str = "loss") -> bool:
    """Run (or finish) this shard's runs of the grid; once every run of the grid is
    finished, write the tables and return True. Every config is validated, and every
    unfinished run's clients built, before the first run starts, so a bad value or a
    partition that one seed cannot fill fails in seconds. ``load`` builds a run's config
    from its overrides (default: ``config`` read as a YAML path; the Python API passes
    one that also takes a dict or a config object). ``batched``: how many runs share
    one process at a time, their clients trained in shared passes
    (:mod:`sfedlora.runtime.batched.lockstep`; 1: one run after another). ``tune_on``:
    what the best_lr tables choose on, ``"loss"`` or ``"accuracy"`` (:data:`TUNE_ON`)."""
    if tune_on not in TUNE_ON:
        raise ConfigError(f"tune_on={tune_on!r}: choose one of {sorted(TUNE_ON)}")
    load = load or (lambda items: load_config(config, items))
    runs = expand(grid)
    out = Path(out)
    configs = {}
    for run in runs:
        run_dir = out / "runs" / run.name
        configs[run.name] = load([*overrides, *run.overrides, f"output_dir={run_dir}",
                                  "progress=false"])
    for run in runs:
        same_experiment(Path(configs[run.name].output_dir), configs[run.name])
    index, count = shard
    todo = [run for run in runs[index::count]
            if not run_files.is_finished(Path(configs[run.name].output_dir))]
    _refuse_unbuildable({run.name: configs[run.name] for run in todo})
    if batched > 1:
        for start in range(0, len(todo), batched):
            _run_batched(todo[start:start + batched], configs, on_start)
    else:
        _run_one_by_one(todo, configs, on_start)
    if not all(run_files.is_finished(out / "runs" / run.name) for run in runs):
        return False  # other shards are still running; the last one writes the tables
    write_tables(out, runs, grid_keys(grid), tune_on)
    return True


def _refuse_unbuildable(configs: dict) -> None:
    """Before any run starts: every run's clients can be built (a partition that one
    seed cannot fill would otherwise fail that run, after the runs before it)."""
    clients = ClientData()
    stopped = [f"- {name}: {cause}" for name, cfg in configs.items()
               if (cause := clients.problem(cfg))]
    if stopped:
        raise ConfigError(f"the clients of {len(stopped)} run(s) cannot be built, so no run "
                          "was started:\n" + "\n".join(stopped[:10]) +
                          (f"\n- and {len(stopped) - 10} more" if len(stopped) > 10 else ""))


def _run_batched(runs: list[SweepRun], configs: dict, on_start) -> None:
    """``runs`` in one process, their clients trained in shared passes; the first
    failure is raised once every other run has ended."""
    from sfedlora.runtime.batched.lockstep import run_together

    for run in runs:
        if on_start:
            on_start(run.name)
    outcomes = run_together([(run.name, configs[run.name]) for run in runs])
    failed = {name: out for name, out in outcomes.items() if isinstance(out, BaseException)}
    for name, exc in failed.items():
        log.error("run %s failed: %s", name, exc)
    if failed:
        raise next(iter(failed.values()))


def _run_one_by_one(runs: list[SweepRun], configs: dict, on_start) -> None:
    from sfedlora.runtime.simulation import Simulation

    for run in runs:
        run_dir = Path(configs[run.name].output_dir)
        if on_start:
            on_start(run.name)
        if (run_dir / "checkpoint.safetensors").is_file():
            Simulation.resume(run_dir, ["progress=false"]).run()
        else:  # this sweep's own run (same experiment, checked above), cut short
            Simulation(configs[run.name]).run(overwrite=True)


def same_experiment(run_dir: Path, cfg) -> None:
    """Refuse to reuse a run directory that holds a different experiment (a base config
    or override changed since the sweep started)."""
    from sfedlora.runtime.simulation import RESUME_MAY_CHANGE, config_differences

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old, new = load_config(saved).model_dump(mode="json"), cfg.model_dump(mode="json")
    ignore = RESUME_MAY_CHANGE
    if same_files(old["data"], new["data"]):  # data.dataset: sst2 reads what the paths did
        ignore = ignore | {f"data.{key}" for key in WHERE_KEYS}
    diffs = config_differences(old, new, ignore=ignore)
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(diffs[:3])}); give "
            "this sweep another --out, or delete that run"
        )


def write_tables(out: Path, runs: Sequence[SweepRun], keys: list[str],
                 tune_on: str = "loss") -> None:
    import pandas as pd

    rows = []
    for run in runs:
        summary = run_files.summary(out / "runs" / run.name)
        rows.append({"run": run.name, **run.values,
                     **{m: summary.get(m) for m in TABLE_METRICS}})
    results = pd.DataFrame(rows)
    metrics = [m for m in TABLE_METRICS if results[m].notna().any()]
    results = results[["run", *keys, *metrics]]
    results.to_csv(out / "results.csv", index=False)
    group = [k for k in keys if k != "seed"]
    if group:
        table = results.groupby(group, sort=False)[metrics].agg(["mean", "std", "count"])
        table.columns = [f"{m}_{stat}" for m, stat in table.columns]
        table = table.reset_index()
    else:
        table = results[metrics].agg(["mean", "std", "count"]).T.reset_index()
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(_markdown(results, group, metrics))
    if LR_KEY in keys:
        write_best_lr_tables(out, results, keys, metrics, tune_on)


LR_KEY = "local.lr"
SELECT_ON = str(Metric.PERSONALIZED_VAL_LOSS)
# what a best_lr table may choose on (``--tune-on``): the validation figure, and whether
# higher is better. Loss by default; accuracy where each client keeps its own head,
# whose overconfidence can make the loss favour a rate that learns little (regime.md)
TUNE_ON = {"loss": (SELECT_ON, False),
           "accuracy": (str(Metric.PERSONALIZED_VAL_ACCURACY), True)}


def best_learning_rates(results, keys: list[str], metrics: list[str],
                        tune_on: str = "loss"):
    """Per cell (every grid key but the learning rate and the seed): the learning rate
    whose mean validation loss over seeds is lowest (``tune_on="accuracy"``: whose mean
    validation accuracy is highest; among exact ties the lowest rate), whether it sits
    at an end of the ladder (then the ladder should be extended), and every metric at
    that learning rate as mean and 95% interval over seeds. Chosen on the validation
    part only."""
    import pandas as pd

    select_on, higher_is_better = TUNE_ON[tune_on]
    sign = -1.0 if higher_is_better else 1.0

    cell = [k for k in keys if k not in ("seed", LR_KEY)]
    ladder = sorted(results[LR_KEY].unique())
    rows = []
    groups = results.groupby(cell, sort=False) if cell else [((), results)]
    for key, frame in groups:
        key = key if isinstance(key, tuple) else (key,)
        curve = frame.groupby(LR_KEY)[select_on].mean()
        best = min(curve.index, key=lambda lr: (sign * curve[lr], lr))
        chosen = frame[frame[LR_KEY] == best]
        row = dict(zip(cell, key, strict=True))
        row.update({"best_lr": best, "lr_at_ladder_end": best in (ladder[0], ladder[-1]),
                    "lr_fit": fitted_best_lr(sign * curve), "seeds": len(chosen)})
        for m in metrics:
            col = chosen[m].dropna()
            row[f"{m}_mean"] = col.mean() if len(col) else None
            row[f"{m}_ci95"] = ci95(col) if len(col) else None
        rows.append(row)
    return pd.DataFrame(rows), cell


def fitted_best_lr(curve) -> float:
    """The minimum of the parabola through the lowest point of a loss-vs-learning-rate
    curve and its two neighbours, in log learning rate: where the optimum sits between
    rungs, so a shift smaller than one rung (sqrt(8) from N=2 to N=16, say) can still be
    read. nan where the lowest point is a ladder end or the three points are not convex."""
    import math

    import numpy as np

    curve = curve.sort_index()
    i = int(np.argmin(curve.to_numpy()))
    if i == 0 or i == len(curve) - 1:
        return math.nan
    x = np.log(curve.index.to_numpy(dtype=float)[i - 1:i + 2])
    y = curve.to_numpy(dtype=float)[i - 1:i + 2]
    a, b, _ = np.polyfit(x, y, 2)
    return float(math.exp(-b / (2 * a))) if a > 0 else math.nan


def write_best_lr_tables(out: Path, results, keys: list[str], metrics: list[str],
                         tune_on: str = "loss") -> None:
    """``best_lr.csv`` / ``best_lr.md`` for a grid with a learning-rate ladder, chosen on
    ``tune_on`` (:data:`TUNE_ON`); skipped, with a warning, when the runs have no
    validation part to choose on."""
    select_on, higher_is_better = TUNE_ON[tune_on]
    if select_on not in results or results[select_on].isna().all():
        log.warning("%s: the sweep varies %s but its runs have no %s; set "
                    "data.validation_fraction to choose learning rates (never on the test "
                    "part); best_lr tables not written", out, LR_KEY, select_on)
        return
    table, cell = best_learning_rates(results, keys, metrics, tune_on)
    table.to_csv(out / "best_lr.csv", index=False)
    shown = [m for m in metrics if m != select_on]
    lines = ["| " + " | ".join([*cell, "best lr", select_on, *shown, "seeds"]) + " |",
             "|" + "---|" * (len(cell) + len(shown) + 3)]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in cell]
        cells.append(f"{row['best_lr']:g}" + (" (ladder end)" if row["lr_at_ladder_end"]
                                             else f" (fit {row['lr_fit']:.2g})"))
        for m in [select_on, *shown]:
            mean, half = row[f"{m}_mean"], row[f"{m}_ci95"]
            cells.append(mean_pm(mean, half, ".4g", ".2g"))
        cells.append(str(row["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    (out / "best_lr.md").write_text(
        f"Best learning rate per cell by mean {select_on}"
        f"{' (the highest)' if higher_is_better else ''} over seeds; every metric at "
        "that learning rate as mean ± 95% t-interval over seeds.\n\n"
        + "\n".join(lines) + "\n")


def _markdown(results, group: list[str], metrics: list[str]) -> str:
    """mean ± std (n runs) per group; std is blank for a single seed."""
    seeds = results.groupby(group, sort=False) if group else [((), results)]
    lines = ["| " + " | ".join([*group, *metrics, "runs"]) + " |",
             "|" + "---|" * (len(group) + len(metrics) + 1)]
    for key, frame in seeds:
        key = key if isinstance(key, tuple) else (key,)
        cells = [str(k) for k in key]
        for m in metrics:
            col = frame[m].dropna()
            if col.empty:
                cells.append("-")
            elif len(col) == 1:
                cells.append(f"{col.iloc[0]:.4g}")
            else:
                cells.append(f"{col.mean():.4g} ± {col.std():.2g}")
        cells.append(str(len(frame)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
