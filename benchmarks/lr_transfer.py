"""The learning-rate transfer study of issue 16: does gamma = alpha*sqrt(N/r) make the
best learning rate, and the training dynamics, stay put as r and N change?

Scale and learning rate are one knob here (tests/test_scaling.py proves it), so rules
are compared each at its own best learning rate, chosen on each client's validation
part (never the test part), and the question is where that best learning rate sits.

    python benchmarks/lr_transfer.py --part rank --optimizer adamw --stage ladder
    python benchmarks/lr_transfer.py --part rank --optimizer adamw --stage seeds
    python benchmarks/lr_transfer.py --part rank --optimizer adamw --stage report

* ``ladder``: rules x (r, or N) x a learning-rate ladder, seed 0; writes best_lr tables.
* ``seeds``: every cell again at its best learning rate with seeds 1..S.
* ``report``: per cell, seed 0 at the best learning rate plus the other seeds, as mean
  and 95% t-interval (``final.csv`` / ``final.md``), and the lr-transfer figure.

Parts (``--part``): ``rank`` at N=4 with r in {4, 32, 256}; ``clients`` at r=64 with N in
{2, 8, 32}, every client holding exactly ``examples_per_client`` training examples, so N
changes only how many adapters are averaged. ``--size gpu`` is the issue's budget (15
rounds x 8 steps x batch 32); ``--size cpu`` cuts it for a 2-core machine (fewer rounds,
steps, tokens); ``--size smoke`` is a seconds-long check of the plumbing. ``--shard K/M``
lets M processes share a stage (one per GPU or core); the last one writes the tables.
``--batched R`` runs R runs at a time in a process, their clients trained in shared
passes through the one base model (``sfedlora sweep --batched``).
Resumable: rerunning skips finished runs, also runs committed under docs/results/.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from sfedlora.studies.sweep import (
    LR_KEY,
    TABLE_METRICS,
    best_learning_rates,
    parse_grid,
    parse_shard,
    run_sweep,
)
from sfedlora.studies.tables import mean_pm

ROOT = Path(__file__).resolve().parents[1]

RULES = "lora+shared,rslora+shared,sfed+shared,rslora+independent,sfed+independent"
LADDERS = {  # 8 rungs 4x apart: the rules' gammas differ by up to ~250x at one (r, N)
    "adamw": "1e-5,4e-5,1.6e-4,6.4e-4,2.56e-3,1.024e-2,4.096e-2,1.6384e-1",
    "sgd": "1e-4,4e-4,1.6e-3,6.4e-3,2.56e-2,1.024e-1,4.096e-1,1.6384",
}
# The head (private under FedSA) trains at one fixed learning rate per optimizer, so the
# ladder moves only the adapter's: with head_lr = lr, a CPU pilot's curves were the
# head's, identical across ranks even for alpha/r at r=256 (gamma 1/16). Each value is
# the best validation loss of a pilot with the adapter at a negligible learning rate
# (SGD: docs/results/lr_transfer/sgd-head-pilot/, head_lr 0.01 to 1.0 with momentum 0.9).
HEAD_LR = {"adamw": 2.56e-3, "sgd": 0.3}


@dataclass(frozen=True)
class Part:
    """One part of the study: the key drawn as one curve per value, its values, fixed
    settings, further swept keys, the base config and the budget per ``--size``."""

    key: str
    values: str
    fixed: tuple[str, ...]
    config: str
    sizes: dict[str, tuple[str, ...]]
    grid: tuple[str, ...] = ()
    rules: str = RULES
    ladder: dict[str, str] = field(default_factory=lambda: LADDERS)
    head: bool = True  # a classification head with its own learning rate


SST2_SIZES = {
    "gpu": ("rounds=15", "local.steps=8", "local.batch_size=32", "model.max_length=64",
            "data.examples_per_client=320", "data.client_test_examples=60"),
    "cpu": ("rounds=8", "local.steps=4", "local.batch_size=16", "model.max_length=32",
            "data.examples_per_client=96", "data.client_test_examples=40"),
    "smoke": ("rounds=1", "local.steps=1", "local.batch_size=4", "model.max_length=16",
              "data.examples_per_client=12", "data.client_test_examples=4"),
}
LM_SIZES = {
    "gpu": ("rounds=10", "local.steps=8", "local.batch_size=8", "model.max_length=256",
            "data.examples_per_client=64", "data.client_test_examples=16"),
    "smoke": ("rounds=1", "local.steps=1", "local.batch_size=2", "model.max_length=256",
              "data.examples_per_client=5", "data.client_test_examples=2"),
}
PARTS = {
    "rank": Part("lora.rank", "4,32,256", ("clients.num=4",), "configs/lr_transfer_sst2.yaml",
                 SST2_SIZES),
    "clients": Part("clients.num", "2,8,32", ("lora.rank=64",),
                    "configs/lr_transfer_sst2.yaml", SST2_SIZES),
    # SmolLM2-135M on GSM8K, one figure per N: a GPU study (no --size cpu)
    "lm": Part("lora.rank", "8,64,512", (), "configs/lr_transfer_gsm8k.yaml", LM_SIZES,
               grid=("clients.num=2,8",), rules="rslora+independent,sfed+independent",
               ladder={"adamw": "1e-5,4e-5,1.6e-4,6.4e-4,2.56e-3,1.024e-2"}, head=False),
}
SEEDS = "1,2,3,4"


def base_overrides(args) -> list[str]:
    part = PARTS[args.part]
    opt = [f"local.optimizer={args.optimizer}"]
    if part.head:
        opt.append(f"local.head_lr={HEAD_LR[args.optimizer]}")
    if args.optimizer == "sgd":
        opt.append("local.momentum=0.9")
    return [*part.fixed, *opt, *part.sizes[args.size], f"model.device={args.device}",
            *args.overrides]


def config(args) -> str:
    return args.config or str(ROOT / PARTS[args.part].config)


def cell_keys(args) -> list[str]:
    """The keys that name a cell: the rule, the curve key and any further swept key."""
    part = PARTS[args.part]
    return ["lora.scaling", "lora.a_init", part.key, *(g.split("=")[0] for g in part.grid)]


def study_dir(args) -> Path:
    return Path(args.out) / f"{args.part}-{args.optimizer}-{args.size}"


def stage_dir(args, stage: str) -> Path:
    return study_dir(args) / stage


def sweep(args, grid, stage: str) -> bool:
    """One stage's runs (this shard's, ``--batched`` at a time where asked)."""
    return run_sweep(config(args), grid, stage_dir(args, stage), base_overrides(args),
                     on_start=lambda name: print("run", name, flush=True),
                     shard=parse_shard(args.shard), batched=args.batched)


def ladder(args) -> bool:
    part = PARTS[args.part]
    grid = parse_grid([f"lora.scaling+lora.a_init={args.rules or part.rules}",
                       f"{part.key}={args.values or part.values}", *part.grid,
                       f"{LR_KEY}={args.ladder or part.ladder[args.optimizer]}", "seed=0"])
    return sweep(args, grid, "ladder")


def seeds(args) -> bool:
    import pandas as pd

    cell = cell_keys(args)
    best = pd.read_csv(stage_dir(args, "ladder") / "best_lr.csv")
    if best["lr_at_ladder_end"].any():
        ends = best[best["lr_at_ladder_end"]]
        print("warning: best learning rate at a ladder end (extend --ladder) for:\n"
              + ends[[*cell, "best_lr"]].to_string(index=False))
    cells = ",".join("+".join([*(str(r[k]) for k in cell), repr(r["best_lr"])])
                     for _, r in best.iterrows())
    grid = parse_grid([f"{'+'.join(cell)}+{LR_KEY}={cells}", f"seed={args.seeds}"])
    return sweep(args, grid, "seeds")


def replicate(args) -> bool:
    """The chosen rung's two neighbours again with other seeds (``--seeds``; the chosen
    rung itself ran in ``seeds``): a second estimate of each cell's fitted optimum, to
    tell a shift of the optimum from the jitter of one seed's ladder."""
    import pandas as pd

    cell = cell_keys(args)
    ladder_runs = pd.read_csv(stage_dir(args, "ladder") / "results.csv")
    rungs = sorted(float(lr) for lr in ladder_runs[LR_KEY].unique())
    best = pd.read_csv(stage_dir(args, "ladder") / "best_lr.csv")
    cells = []
    for _, row in best.iterrows():
        i = rungs.index(row["best_lr"])
        cells += ["+".join([*(str(row[k]) for k in cell), repr(rungs[j])])
                  for j in (i - 1, i + 1) if 0 <= j < len(rungs)]
    grid = parse_grid([f"{'+'.join(cell)}+{LR_KEY}={','.join(cells)}",
                       f"seed={args.seeds}"])
    return sweep(args, grid, "replicate")


REFERENCE = ("sfed", "independent")  # the flagship: every other rule is compared to it
SHOWN = ("personalized_loss", "personalized_loss_std", "personalized_balanced_accuracy",
         "personalized_accuracy", "majority_baseline_accuracy", "adapter_output_norm")


def report(args) -> Path:
    """Seed 0 at each cell's best learning rate plus the other seeds' runs: ``final``
    (every metric per cell), ``transfer`` (where each rule's best learning rate sits
    along the curve key), ``paired`` (each rule minus the flagship, paired by seed),
    and the lr-transfer figure."""
    import pandas as pd

    from sfedlora.studies.plots import plot_lr_transfer

    part = PARTS[args.part]
    cell = cell_keys(args)
    first = pd.read_csv(stage_dir(args, "ladder") / "results.csv")
    best = pd.read_csv(stage_dir(args, "ladder") / "best_lr.csv")
    chosen = first.merge(best[[*cell, "best_lr"]], on=cell)
    chosen = chosen[chosen[LR_KEY] == chosen["best_lr"]].drop(columns="best_lr")
    seeded = stage_dir(args, "seeds") / "results.csv"
    rest = pd.read_csv(seeded) if seeded.is_file() else chosen.iloc[:0]  # seed 0 only
    runs = pd.concat([chosen, rest], ignore_index=True)
    metrics = [m for m in TABLE_METRICS if m in runs and runs[m].notna().any()]
    table, _ = best_learning_rates(runs, [*cell, LR_KEY, "seed"], metrics)
    table = table.drop(columns=["lr_at_ladder_end", "lr_fit"]).merge(
        best[[*cell, "lr_at_ladder_end", "lr_fit"]], on=cell)
    out = study_dir(args)
    table.to_csv(out / "final.csv", index=False)
    command = (f"python benchmarks/lr_transfer.py --part {args.part} --optimizer "
               f"{args.optimizer} --size {args.size} --stage report")
    shown = [m for m in SHOWN if m in metrics]
    others = cell[2:]
    rows = []
    for _, row in table.iterrows():
        lr = f"{row['best_lr']:g}" + (" (end)" if row["lr_at_ladder_end"]
                                      else f" ({row['lr_fit']:.2g})")
        rows.append([_rule(row), *(str(row[k]) for k in others), lr,
                     *(_pm(row[f"{m}_mean"], row[f"{m}_ci95"]) for m in shown),
                     str(row["seeds"])])
    (out / "final.md").write_text(
        f"Command: `{command}`\n\nPer cell: the learning rate chosen on seed 0's mean "
        "client validation loss (in brackets the fitted optimum between rungs, or 'end' "
        "at a ladder end), and each metric there as mean ± 95% t-interval over seeds "
        "(test parts). Every metric: final.csv.\n\n"
        + _markdown(["rule", *others, "best lr (fit)", *shown, "seeds"], rows))
    (out / "transfer.md").write_text(
        f"Command: `{command}`\n\n" + _transfer_table(best, part.key, cell))
    (out / "paired.md").write_text(
        f"Command: `{command}`\n\n" + _paired_table(runs, cell))
    (out / "trend.md").write_text(
        f"Command: `{command}`\n\n" + _trend_table(runs, part.key, cell))
    if (stage_dir(args, "replicate") / "results.csv").is_file():
        again = pd.concat([first, rest, pd.read_csv(stage_dir(args, "replicate")
                                                    / "results.csv")], ignore_index=True)
        (out / "replicate.md").write_text(
            f"Command: `{command}`\n\n" + _replicate_table(again, best, cell))
    plot_lr_transfer(stage_dir(args, "ladder"), out / "figures", curve_key=part.key)
    (out / "settings.json").write_text(json.dumps(
        {"size": args.size, "config": _relative(config(args)), "overrides": base_overrides(args),
         "ladder": sorted(first[LR_KEY].unique().tolist()),
         "seeds": sorted(runs["seed"].unique().tolist())}, indent=2))
    return out / "final.md"


def _pm(mean: float, half: float, signed: bool = False) -> str:
    """``mean ± half`` ("mean" alone where one seed gives no interval)."""
    return mean_pm(mean, half, "+.4f" if signed else ".4g", ".2g")


def _relative(path: str) -> str:
    """A path as the repository sees it, so committed settings name no machine."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def _rule(row) -> str:
    return f"{row['lora.scaling']}/{row['lora.a_init']}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def _transfer_table(best, key: str, cell: list[str]) -> str:
    """One row per rule (and further swept key): the best learning rate at each value
    of the curve key, and how far the fitted optimum moves (largest over smallest)."""
    import math

    group = [k for k in cell if k != key]
    values = sorted(best[key].unique())
    rows = []
    for _, frame in best.groupby(group, sort=False):
        frame = frame.set_index(key)
        fits = [frame.loc[v, "lr_fit"] for v in values if v in frame.index]
        ends = frame["lr_at_ladder_end"].any()
        spread = "-" if ends or any(math.isnan(f) for f in fits) \
            else f"{max(fits) / min(fits):.2g}x"
        first = frame.iloc[0]
        rows.append([_rule(first), *(str(first[k]) for k in group[2:]),
                     *(f"{frame.loc[v, 'best_lr']:g} ({frame.loc[v, 'lr_fit']:.2g})"
                       if v in frame.index else "-" for v in values), spread])
    return (f"Best learning rate on the ladder (fitted optimum) at each {key}, chosen on "
            "seed 0's validation loss; the last column is the largest fitted optimum over "
            "the smallest ('-' where one sits at a ladder end).\n\n"
            + _markdown(["rule", *group[2:], *(f"{key}={v}" for v in values),
                         "optimum moves"], rows))


def _trend_table(runs, key: str, cell: list[str]) -> str:
    """Per rule, held-out loss at each value of the curve key minus at its smallest
    value (r=256 minus r=4, say), each at its own chosen learning rate, paired by seed:
    does a rule get worse at high rank (or many clients) even when tuned?"""
    from sfedlora.studies.stats import ci95

    group = [k for k in cell if k != key]
    values = sorted(runs[key].unique())
    rows = []
    for name, frame in runs.groupby(group, sort=False):
        table = frame.pivot(index="seed", columns=key, values="personalized_loss")
        cells = [f"{name[0]}/{name[1]}", *(str(v) for v in name[2:])]
        for v in values[1:]:
            diff = (table[v] - table[values[0]]).dropna()
            cells.append(_pm(diff.mean(), ci95(diff), signed=True))
        rows.append(cells)
    return (f"Held-out loss at each {key} minus at {key}={values[0]}, per rule, each at "
            "its own chosen learning rate, paired by seed: mean ± 95% t-interval. "
            "Positive: worse than at the smallest value.\n\n"
            + _markdown(["rule", *group[2:], *(f"{key}={v}" for v in values[1:])], rows))


def _replicate_table(runs, best, cell: list[str]) -> str:
    """Per cell, the fitted optimum over the chosen rung and its two neighbours for each
    seed that ran all three, and for their mean curve."""
    from sfedlora.studies.sweep import SELECT_ON

    rows = []
    seeds = sorted(runs["seed"].unique())
    for _, row in best.iterrows():
        mine = runs
        for k in cell:
            mine = mine[mine[k] == row[k]]
        ladder = sorted(mine[mine["seed"] == seeds[0]][LR_KEY].unique())
        i = ladder.index(row["best_lr"])
        near = mine[mine[LR_KEY].isin(ladder[max(i - 1, 0):i + 2])]
        counts = near.groupby("seed")[LR_KEY].nunique()
        full = [s for s in seeds if counts.get(s, 0) == 3]
        near = near[near["seed"].isin(full)]
        fits = [_fit_text(near[near["seed"] == s].groupby(LR_KEY)[SELECT_ON].mean())
                for s in full]
        mean = _fit_text(near.groupby(LR_KEY)[SELECT_ON].mean()) if len(full) > 1 else "-"
        rows.append([_rule(row), *(str(row[k]) for k in cell[2:]),
                     "; ".join(f"seed {s}: {f}" for s, f in zip(full, fits, strict=True)),
                     mean])
    return ("The optimum fitted through the chosen rung and its two neighbours, per seed "
            "and for the mean over seeds ('below'/'above': that seed's lowest of the three "
            "is a neighbour, so its optimum lies beyond it).\n\n"
            + _markdown(["rule", *cell[2:], "fitted optimum per seed", "mean curve"], rows))


def _fit_text(curve) -> str:
    import math

    from sfedlora.studies.sweep import fitted_best_lr

    if len(curve) < 3:
        return "-"
    lowest = curve.idxmin()
    if lowest == curve.index.min():
        return f"below {lowest:.2g}"
    if lowest == curve.index.max():
        return f"above {lowest:.2g}"
    fit = fitted_best_lr(curve)
    return "-" if math.isnan(fit) else f"{fit:.2g}"


def _paired_table(runs, cell: list[str]) -> str:
    """Each rule minus the flagship in held-out loss and balanced accuracy, per cell, at
    each rule's own chosen learning rate, paired by seed (one seed draws one partition
    and one initialisation for every rule), as mean ± 95% t-interval."""
    import pandas as pd

    from sfedlora.studies.stats import ci95

    group = [k for k in cell if k not in ("lora.scaling", "lora.a_init")]
    is_ref = (runs["lora.scaling"] == REFERENCE[0]) & (runs["lora.a_init"] == REFERENCE[1])
    metrics = ["personalized_loss", "personalized_balanced_accuracy"]
    ref = runs[is_ref].set_index([*group, "seed"])[metrics]
    rows = []
    for key, frame in runs[~is_ref].groupby(["lora.scaling", "lora.a_init", *group],
                                            sort=False):
        diff = frame.set_index([*group, "seed"])[metrics] - ref
        diff = diff.dropna()
        if diff.empty:
            continue
        cells = [f"{key[0]}/{key[1]}", *(str(v) for v in key[2:])]
        for m in metrics:
            cells.append(_pm(diff[m].mean(), ci95(diff[m]), signed=True))
        rows.append([*cells, str(len(diff))])
    frame = pd.DataFrame(rows)
    if frame.empty:
        return "no rule to compare with the flagship\n"
    return (f"Each rule minus {REFERENCE[0]}/{REFERENCE[1]}, paired by seed, at each "
            "rule's own chosen learning rate: mean ± 95% t-interval. A positive loss "
            "difference (negative accuracy difference) means the flagship did better.\n\n"
            + _markdown(["rule", *group, "held-out loss difference",
                         "balanced accuracy difference", "seeds"], rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--optimizer", choices=sorted(LADDERS), required=True)
    parser.add_argument("--stage", choices=["ladder", "seeds", "replicate", "report"],
                        required=True)
    parser.add_argument("--size", choices=["gpu", "cpu", "smoke"], default="cpu")
    parser.add_argument("--config", help="base config (default: the part's)")
    parser.add_argument("--out", default="docs/results/lr_transfer",
                        help="where the study lives; under docs/results/ only configs, "
                        "metrics, timings and summaries are tracked (see .gitignore)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ladder", help="comma-separated learning rates (default per optimizer)")
    parser.add_argument("--rules", help="comma-separated scaling+a_init pairs, e.g. "
                        "rslora+shared,sfed+independent (default: all five)")
    parser.add_argument("--values", help="comma-separated r (rank part) or N (clients "
                        "part) instead of the part's default")
    parser.add_argument("--seeds", default=SEEDS)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--batched", type=int, default=1, metavar="R",
                        help="R runs at a time in one process, clients trained in shared "
                        "passes (sfedlora sweep --batched)")
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value settings")
    args = parser.parse_intermixed_args(argv)
    part = PARTS[args.part]
    if args.size not in part.sizes:
        parser.error(f"--part {args.part} has no --size {args.size}; choose one of "
                     f"{sorted(part.sizes)}")
    if args.optimizer not in part.ladder and not args.ladder:
        parser.error(f"--part {args.part} has no default ladder for {args.optimizer}; "
                     "give --ladder")
    if args.stage == "report":
        print(report(args))
        return 0
    done = {"ladder": ladder, "seeds": seeds, "replicate": replicate}[args.stage](args)
    print("tables written" if done else "other shards still running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
