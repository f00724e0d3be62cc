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
(``data.dataset: sst2``, 2 classes) and ``bbc`` (BBC News, 5 topics, the offline
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
import math
import sys
from pathlib import Path

import numpy as np

from sfedlora.config import load_config
from sfedlora.studies import runs as run_files
from sfedlora.studies.stats import ci95
from sfedlora.studies.tables import markdown_table, mean_pm
from sfedlora.studies.tuning import Study, Tuning, best_rung

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


METHODS = Study(ARMS, CONFIGS, SIZES, root=ROOT, ladder=LADDER, seeds=SEEDS)


def tuning(args) -> Tuning:
    return Tuning.from_args(METHODS, args)


def arm_row(args, arm: str) -> dict | None:
    """An arm's row, once its tuning has finished (its seeds stage has runs): an arm
    whose ladder is still running has no chosen rate yet, and a row of it would stand
    beside tuned arms as if it were one."""
    import pandas as pd

    study = tuning(args)
    ladder_rows = study.ladder_results(arm)
    seeded = run_files.finished_runs(study.arm_dir(arm) / "seeds" / "runs")
    if not ladder_rows or not seeded:
        return None
    best, low, high = best_rung(ladder_rows)
    runs = [r for r in ladder_rows if r["lr"] == best]
    runs += [run_files.summary(run) for run in seeded]
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
    return mean_pm(*mean_half)


def _mb(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def majority_row(args) -> list | None:
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
    return ["*majority label* (floor)", cell, "-", "-", 0, 0, "-", len(values)]


def report(args) -> str:
    rows = []
    for r in sorted((r for arm in args.arms if (r := arm_row(args, arm)) is not None),
                    key=lambda r: (r["arm"] in REFERENCES, r["arm"])):
        mb = ("n/a", "n/a") if r["arm"] == "central" else (_mb(r["mb_up"]),
                                                            _mb(r["mb_down"]))
        flag = " (ladder end)" if r["at_end"] else ""
        name = f"*{r['arm']}* (reference)" if r["arm"] in REFERENCES else r["arm"]
        rows.append([name, _pm(r["pers"]), _pm(r["glob"]), _pm(r["val_loss"]), *mb,
                     f"{r['lr']:.1e}{flag}", r["seeds"]])
    if majority := majority_row(args):
        rows.append(majority)
    table = markdown_table(["method", "pers. acc", "global acc", "val loss", "MB up",
                            "MB down", "lr", "seeds"], rows)
    (tuning(args).folder / "table.md").write_text(table + "\n")
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
            rows[size] = {r["lr"]: r for r in tuning(one).ladder_results(arm)}
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
        study = tuning(one)
        for arm in args.arms:
            if args.stage in ("ladder", "all"):
                finished &= study.ladder(arm)
            if args.stage in ("seeds", "all") and finished:
                finished &= study.seeds(arm)
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
