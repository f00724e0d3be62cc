"""Every method, tuned the same way: the fair methods table of issue 20.

Per arm (a method plus what it needs: mixed ranks, a scaling rule, an adapter type):

1. ``ladder``: the adapter's learning rate (``local.lr``) over a ladder 4x apart, seed 0;
   the rung with the lowest mean client **validation** loss (a stratified part of each
   client's training data, ``data.validation_fraction``; never the test part) is
   chosen. A choice at an end of the ladder extends it by one rung on that side, up to
   ``--max-extend`` times, so no arm is judged at a rate clipped by the ladder.
2. ``seeds``: the chosen rate again with seeds 1 and 2.
3. ``report``: per arm, personalised and global accuracy over the 3 seeds as mean ±
   95% t-interval, bytes per run, the chosen rate; ``local`` (no federation) and
   ``central`` (all data pooled, same total steps) as reference rows.

The head's learning rate (``local.head_lr``) and everything else are the same for every
arm; only the adapter's rate is tuned. Datasets (``--dataset``): ``sst2``
(``../shared/data/sst2``, 2 classes) and ``bbc`` (BBC News, 5 topics, the offline
stand-in for AG News' 4), each with 10 clients, Dirichlet(0.5), all-MiniLM-L6-v2.
``--size cpu`` is the budget a 2-core machine finishes (see ``SIZES``); ``gpu`` is the
same budget on a CUDA device; ``smoke`` is a seconds-long check of the plumbing.

    python benchmarks/methods.py --dataset sst2 --stage ladder [--arms fedit ...] [--shard 0/2]
    python benchmarks/methods.py --dataset sst2 --stage seeds
    python benchmarks/methods.py --dataset sst2 --stage report   # writes table.md
    python benchmarks/methods.py --dataset sst2 bbc --size gpu --jobs 14   # arms in parallel

Runs go to ``docs/results/methods/<dataset>-<size>/<arm>/{ladder,seeds}/runs/`` (configs,
metrics and summaries are committed, weights are not), so rerunning skips finished
runs, resumes interrupted ones, and the table regenerates from a clean clone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfedlora.config import load_config
from sfedlora.studies import runs as run_files
from sfedlora.studies.stats import ci95
from sfedlora.studies.sweep import LR_KEY, parse_grid, parse_shard, run_sweep

ROOT = Path(__file__).resolve().parents[1]

ARMS: dict[str, list[str]] = {
    "fedit": ["method=fedit"],
    "ffa": ["method=ffa"],
    "rolora": ["method=rolora"],
    "fedsa": ["method=fedsa"],
    "fedsa-rslora": ["method=fedsa", "lora.scaling=rslora"],
    "fedsa-vera": ["method=fedsa", "lora.adapter=vera"],
    "sfed": ["method=sfed"],
    "flasc": ["method=flasc", "comm.down.density=0.25", "comm.up.density=0.25"],
    "flocora": ["method=flocora"],
    "hetlora": ["method=hetlora", "lora.client_ranks=[2,4,8]"],
    "flora": ["method=flora", "lora.client_ranks=[2,4,8]"],
    "flexlora": ["method=flexlora", "lora.client_ranks=[2,4,8]"],
    "fedex": ["method=fedex"],
    "fedsvd": ["method=fedsvd"],
    "fdlora": ["method=fdlora"],
    "local": ["method=local"],
    "central": ["method=central"],
}
REFERENCES = ("local", "central")
CONFIGS = {"sst2": "configs/methods_sst2.yaml", "bbc": "configs/methods_bbc.yaml"}
LADDER = (2e-3, 8e-3, 3.2e-2)  # 4x apart from the old shared 2e-3 up (extended where needed)
CPU_BUDGET = ("rounds=10", "local.steps=5", "eval.every=10", "checkpoint.every=5")
SIZES = {
    "cpu": CPU_BUDGET,
    # The same budget on a CUDA device: run many arms at once with --jobs.
    "gpu": (*CPU_BUDGET, "model.device=cuda"),
    "smoke": ("rounds=1", "local.steps=1", "eval.every=1", "checkpoint.every=0",
              "data.max_train_examples=1000", "data.max_test_examples=40"),
}
SEEDS = (1, 2)


@dataclass(frozen=True)
class Study:
    """What a tuned comparison runs: its arms (name: overrides), base configs per
    dataset and budgets per size. ``benchmarks/wireless.py`` reuses the ladder, seeds
    and rows below with a study of its own."""

    arms: dict[str, list[str]]
    configs: dict[str, str]
    sizes: dict[str, tuple[str, ...]]


METHODS = Study(ARMS, CONFIGS, SIZES)


def arm_dir(args, arm: str) -> Path:
    return Path(args.out) / f"{args.dataset}-{args.size}" / arm


def overrides(args, arm: str) -> list[str]:
    study = getattr(args, "study", METHODS)
    return [*study.arms[arm], *study.sizes[args.size], *args.overrides]


def config(args) -> str:
    return str(ROOT / getattr(args, "study", METHODS).configs[args.dataset])


def sweep(args, arm: str, stage: str, grid: list[str]) -> bool:
    """Run ``grid`` under an arm's overrides into ``<arm>/<stage>/runs/``; False while
    other shards still hold some of its runs."""
    return run_sweep(config(args), parse_grid(grid), arm_dir(args, arm) / stage,
                     overrides(args, arm), shard=parse_shard(args.shard),
                     on_start=lambda name: print(f"{arm} {stage} {name}", flush=True))


def _ladder_results(args, arm: str) -> list[dict]:
    """Finished ladder runs of an arm: learning rate and final validation loss."""
    rows = []
    for run in run_files.finished_runs(arm_dir(args, arm) / "ladder" / "runs"):
        s = run_files.summary(run)
        lr = load_config(run / "config.yaml").local.lr
        rows.append({"lr": lr, "val_loss": s.get("personalized_val_loss"), **s})
    return rows


def best_rung(rows: list[dict]) -> tuple[float, bool, bool]:
    """The rung with the lowest validation loss, and whether it is the lowest / highest
    rung tried (a loss that is not finite counts as worst)."""
    def key(r):
        v = r["val_loss"]
        return v if v is not None and math.isfinite(v) else math.inf

    rates = sorted({r["lr"] for r in rows})
    best = min(rows, key=key)["lr"]
    return best, best == rates[0], best == rates[-1]


def chosen_rate(args, arm: str) -> float | None:
    """The rate an arm's finished ladder chose (None before any rung finished)."""
    rows = _ladder_results(args, arm)
    return best_rung(rows)[0] if rows else None


def rate_on_recent_evaluations(args, arm: str, count: int = 3) -> float | None:
    """The rung a sturdier rule would choose: the lowest mean validation loss over each
    seed-0 ladder run's last ``count`` evaluations rather than its last one. A check of
    the choice, not a second one (a run that oscillates can end on a high point, and
    the rule should not hinge on it): studies report the rate :func:`best_rung` picks,
    and print where this one differs."""
    rows = []
    for run in run_files.finished_runs(arm_dir(args, arm) / "ladder" / "runs"):
        losses = [m["personalized_val_loss"] for m in run_files.metrics(run)
                  if m.get("personalized_val_loss") is not None][-count:]
        rows.append({"lr": load_config(run / "config.yaml").local.lr,
                     "val_loss": sum(losses) / len(losses) if losses else None})
    return best_rung(rows)[0] if rows else None


def ladder(args, arm: str) -> bool:
    """Sweep the ladder at seed 0, adding a rung past whichever end the best rate sits
    at, up to ``args.max_extend`` rungs beyond ``LADDER`` in all. Rungs an earlier call
    added stay in (and count), so a rerun of a finished ladder trains nothing and
    writes its tables with every rung."""
    rates = sorted({*LADDER, *(r["lr"] for r in _ladder_results(args, arm))})
    while True:
        if not sweep(args, arm, "ladder", [f"{LR_KEY}={','.join(map(repr, rates))}",
                                            "seed=0"]):
            return False  # other shards are still running this arm
        best, low, high = best_rung(_ladder_results(args, arm))
        if not (low or high) or len(rates) - len(LADDER) >= args.max_extend:
            return True
        rates = sorted({*rates, best / 4 if low else best * 4})


def seeds(args, arm: str) -> bool:
    return sweep(args, arm, "seeds", [f"{LR_KEY}={chosen_rate(args, arm)!r}",
                                       f"seed={','.join(map(str, SEEDS))}"])


def run_on(args, arm: str, stage: str, extra: tuple[str, ...],
           seeds: tuple[int, ...] = (0, *SEEDS)) -> bool:
    """An arm's chosen rate run again for ``seeds`` with ``extra`` overrides after the
    size's (more rounds, denser evaluation) into ``<arm>/<stage>/runs/``: the arm is
    tuned like every other, then runs on where a study reads a time or a byte count
    rather than a final figure. With a constant schedule and every draw seeded by
    (seed, round, client) such runs repeat the tuned runs' rounds (:func:`repeats`)."""
    chosen = chosen_runs(args, arm)
    if not chosen:
        raise SystemExit(f"the {stage} stage runs {arm} at its chosen rate: tune it first "
                         f"(--arms {arm} --stage all)")
    lr = load_config(chosen[0] / "config.yaml").local.lr
    base = args.study
    args.study = dataclasses.replace(
        base, sizes={**base.sizes, args.size: (*base.sizes[args.size], *extra)})
    try:
        return sweep(args, arm, stage, [f"{LR_KEY}={lr!r}",
                                        f"seed={','.join(map(str, seeds))}"])
    finally:
        args.study = base


def stage_runs(args, arm: str, stage: str) -> dict[int, Path]:
    """An arm's finished runs of one stage, keyed by seed."""
    return {load_config(run / "config.yaml").seed: run
            for run in run_files.finished_runs(arm_dir(args, arm) / stage / "runs")}


def repeats(longer: Path, run: Path,
            keys: tuple[str, ...] = ("personalized_accuracy", "bytes_total")) -> bool:
    """Whether ``longer`` has ``run``'s evaluated rounds with equal figures (``keys``)."""
    by_round = {m["round"]: m for m in run_files.metrics(longer)}
    return all(r["round"] in by_round and all(by_round[r["round"]].get(k) == r.get(k)
                                             for k in keys)
               for r in run_files.metrics(run) if r.get("personalized_accuracy") is not None)


def study_parser(description: str, arms: list[str], out: Path, sizes: list[str],
                 stages: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The command line of a one-dataset tuned study (``wireless.py``,
    ``compression.py``): stages (``stages`` adds a study's own, run after tuning), size,
    arms, output folder, shard, ladder extension."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stage", choices=["ladder", "seeds", *stages, "report", "all"],
                        default="all")
    parser.add_argument("--size", choices=sizes, default="cpu")
    parser.add_argument("--arms", nargs="+", default=arms, choices=arms)
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--max-extend", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every arm")
    return parser


def tune(args, arm: str) -> bool:
    """The ladder and seeds stages ``args.stage`` asks for; False while other shards
    are still running this arm."""
    if args.stage in ("ladder", "all") and not ladder(args, arm):
        return False
    return not (args.stage in ("seeds", "all") and not seeds(args, arm))


def run_study(args, study_for, report, after_tuning=None) -> int:
    """A one-dataset tuned study: each arm's ladder and seeds under
    ``study_for(arm)`` (in ``args.arms`` order), then ``after_tuning(args)`` if given
    (a study's own stage; False while other shards still run it), then
    ``report(args)`` kept and printed."""
    for arm in args.arms:
        args.study = study_for(arm)
        if not tune(args, arm):
            return 0  # other shards are still running this arm
    if after_tuning is not None and not after_tuning(args):
        return 0
    if args.stage in ("report", "all"):
        publish_report(args, report(args))
    return 0


def publish_report(args, text: str) -> None:
    """Print a study's report and keep it as ``<out>/<dataset>-<size>/table.md``."""
    (Path(args.out) / f"{args.dataset}-{args.size}" / "table.md").write_text(text + "\n")
    print(text)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chosen_runs(args, arm: str) -> list[Path]:
    """An arm's run directories at its chosen rate: the ladder's seed-0 run, then the
    seeds' runs (the rows a tuned comparison reports)."""
    rows = _ladder_results(args, arm)
    if not rows:
        return []
    best, *_ = best_rung(rows)
    base = arm_dir(args, arm)
    runs = [run for run in run_files.finished_runs(base / "ladder/runs")
            if load_config(run / "config.yaml").local.lr == best]
    return runs + run_files.finished_runs(base / "seeds/runs")


def chosen_by_seed(args, arm: str) -> dict[int, Path]:
    """:func:`chosen_runs` keyed by seed (equal seeds: equal partitions across arms)."""
    return {load_config(r / "config.yaml").seed: r for r in chosen_runs(args, arm)}


def arm_row(args, arm: str) -> dict | None:
    import pandas as pd

    ladder_rows = _ladder_results(args, arm)
    if not ladder_rows:
        return None
    best, low, high = best_rung(ladder_rows)
    runs = [r for r in ladder_rows if r["lr"] == best]
    for run in run_files.finished_runs(arm_dir(args, arm) / "seeds" / "runs"):
        runs.append(run_files.summary(run))
    frame = pd.DataFrame(runs)

    def stat(key):
        col = frame[key].dropna() if key in frame else pd.Series([], dtype=float)
        return (col.mean(), ci95(col)) if len(col) else (math.nan, math.nan)

    return {"arm": arm, "lr": best, "at_end": low or high, "seeds": len(frame),
            "rungs": len({r["lr"] for r in ladder_rows}),
            "pers": stat("personalized_accuracy"), "glob": stat("global_accuracy"),
            "val_loss": stat("personalized_val_loss"),
            "mb_up": frame["bytes_up_total"].mean() / 1e6,
            "mb_down": frame["bytes_down_total"].mean() / 1e6}


def _pm(mean_half: tuple[float, float]) -> str:
    mean, half = mean_half
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def _mb(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def majority_row(args) -> str | None:
    """Each client predicting its most frequent training label: the floor a
    personalised accuracy has to clear (per seed it depends only on the partition)."""
    by_seed = {}
    for stage in Path(args.out, f"{args.dataset}-{args.size}").glob("*/*/runs"):
        if stage.parts[-3] == "central":  # its training data is pooled on one client
            continue
        for run in run_files.finished_runs(stage):
            value = run_files.summary(run).get("majority_baseline_accuracy")
            if value is not None:
                by_seed[load_config(run / "config.yaml").seed] = value
    if not by_seed:
        return None
    values = [by_seed[s] for s in sorted(by_seed)]
    mean = sum(values) / len(values)
    cell = _pm((mean, ci95(np.array(values))))
    return f"| *majority label* (floor) | {cell} | - | - | 0 | 0 | - | {len(values)} |"


def report(args) -> str:
    rows = [r for arm in args.arms if (r := arm_row(args, arm)) is not None]
    lines = ["| method | pers. acc | global acc | val loss | MB up | MB down | lr | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arm"] in REFERENCES, r["arm"])):
        mb = ("n/a", "n/a") if r["arm"] == "central" else (_mb(r["mb_up"]),
                                                            _mb(r["mb_down"]))
        flag = " (ladder end)" if r["at_end"] else ""
        name = f"*{r['arm']}* (reference)" if r["arm"] in REFERENCES else r["arm"]
        lines.append(f"| {name} | {_pm(r['pers'])} | {_pm(r['glob'])} | "
                     f"{_pm(r['val_loss'])} | {mb[0]} | {mb[1]} | {r['lr']:.1e}{flag} | "
                     f"{r['seeds']} |")
    majority = majority_row(args)
    if majority:
        lines.append(majority)
    table = "\n".join(lines)
    out = Path(args.out) / f"{args.dataset}-{args.size}" / "table.md"
    out.write_text(table + "\n")
    return table


def compare(args) -> str:
    """Seed 0 of every ladder rung that ran at both sizes (e.g. cpu and gpu, the same
    runs but the device): what the device alone changes."""
    first, second = args.compare
    lines = [f"| method | lr | val loss ({first}) | val loss ({second}) | pers. acc ({first}) "
             f"| pers. acc ({second}) |", "|---|---|---|---|---|---|"]
    for arm in args.arms:
        rows = {}
        for size in (first, second):
            one = argparse.Namespace(**{**vars(args), "size": size})
            rows[size] = {r["lr"]: r for r in _ladder_results(one, arm)}
        for lr in sorted(set(rows[first]) & set(rows[second])):
            a, b = rows[first][lr], rows[second][lr]
            lines.append(f"| {arm} | {lr:.1e} | {a['val_loss']:.3f} | {b['val_loss']:.3f} | "
                         f"{a['personalized_accuracy']:.3f} | "
                         f"{b['personalized_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", choices=list(CONFIGS), default=["sst2"])
    parser.add_argument("--stage", choices=["ladder", "seeds", "report", "all"],
                        default="all")
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default=str(ROOT / "docs/results/methods"))
    parser.add_argument("--shard", default="0/1", help="K/M: this process runs every M-th "
                        "run of each sweep starting at K")
    parser.add_argument("--max-extend", type=int, default=2,
                        help="rungs added at most when the best rate sits at a ladder end")
    parser.add_argument("--compare", nargs=2, metavar=("SIZE", "SIZE"),
                        help="print seed 0 of the ladder rungs run at both sizes (--arms)")
    parser.add_argument("--jobs", type=int, default=1, help="arms run at once, each in "
                        "its own process (ladder then seeds); for a GPU or many cores")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every arm")
    args = parser.parse_args(argv)
    if args.compare:
        for dataset in args.dataset:
            print(compare(argparse.Namespace(**{**vars(args), "dataset": dataset})))
        return 0
    if args.jobs > 1 and args.stage != "report":
        run_parallel(args)
        args.stage = "report"
    for dataset in args.dataset:
        one = argparse.Namespace(**{**vars(args), "dataset": dataset})
        finished = True
        for arm in args.arms:
            if args.stage in ("ladder", "all"):
                finished &= ladder(one, arm)
            if args.stage in ("seeds", "all") and finished:
                finished &= seeds(one, arm)
        if args.stage in ("report", "all") and finished:
            print(f"{dataset} ({args.size})\n{report(one)}")
    return 0


def run_parallel(args) -> None:
    """Each (dataset, arm) in its own process, ``--jobs`` at a time. An arm's ladder is
    sequential (an end rung extends it), so arms, not rungs, are the unit of work."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor, as_completed

    stages = ["ladder", "seeds"] if args.stage == "all" else [args.stage]

    def one(dataset: str, arm: str) -> str:
        for stage in stages:
            cmd = [sys.executable, __file__, "--dataset", dataset, "--size", args.size,
                   "--arms", arm, "--stage", stage, "--out", args.out,
                   "--max-extend", str(args.max_extend), *args.overrides]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                return f"FAILED {dataset} {arm} {stage}\n{done.stdout}{done.stderr[-4000:]}"
        return f"done {dataset} {arm}"

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, d, a) for d in args.dataset for a in args.arms]
        for future in as_completed(futures):
            print(future.result(), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
