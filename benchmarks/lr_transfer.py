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
Resumable: rerunning skips finished runs, also runs committed under docs/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sfedlora.sweep import (  # noqa: E402
    LR_KEY,
    TABLE_METRICS,
    best_learning_rates,
    parse_grid,
    parse_shard,
    run_sweep,
)

RULES = "lora.scaling+lora.a_init=lora+shared,rslora+shared,sfed+shared,rslora+independent," \
    "sfed+independent"
LADDERS = {  # 8 rungs 4x apart: the rules' gammas differ by up to ~250x at one (r, N)
    "adamw": "1e-5,4e-5,1.6e-4,6.4e-4,2.56e-3,1.024e-2,4.096e-2,1.6384e-1",
    "sgd": "1e-4,4e-4,1.6e-3,6.4e-3,2.56e-2,1.024e-1,4.096e-1,1.6384",
}
# The head (private under FedSA) trains at one fixed learning rate per optimizer, so the
# ladder moves only the adapter's: with head_lr = lr, a CPU pilot's curves were the
# head's, identical across ranks even for alpha/r at r=256 (gamma 1/16). AdamW's value
# is that pilot's best for the head alone; SGD's is a guess for its pilot to check.
HEAD_LR = {"adamw": 2.56e-3, "sgd": 0.1}
PARTS = {"rank": ("lora.rank", "4,32,256", ["clients.num=4"]),
         "clients": ("clients.num", "2,8,32", ["lora.rank=64"])}
SIZES = {
    "gpu": ["rounds=15", "local.steps=8", "local.batch_size=32", "model.max_length=64",
            "data.examples_per_client=320", "data.client_test_examples=60"],
    "cpu": ["rounds=8", "local.steps=4", "local.batch_size=16", "model.max_length=32",
            "data.examples_per_client=96", "data.client_test_examples=40"],
    "smoke": ["rounds=1", "local.steps=1", "local.batch_size=4", "model.max_length=16",
              "data.examples_per_client=12", "data.client_test_examples=4"],
}
SEEDS = "1,2,3,4"


def base_overrides(args) -> list[str]:
    fixed = PARTS[args.part][2]
    opt = [f"local.optimizer={args.optimizer}", f"local.head_lr={HEAD_LR[args.optimizer]}"]
    if args.optimizer == "sgd":
        opt.append("local.momentum=0.9")
    return [*fixed, *opt, *SIZES[args.size], f"model.device={args.device}", *args.overrides]


def study_dir(args) -> Path:
    return Path(args.out) / f"{args.part}-{args.optimizer}-{args.size}"


def stage_dir(args, stage: str) -> Path:
    return study_dir(args) / stage


def ladder(args) -> bool:
    key, values, _ = PARTS[args.part]
    rungs = args.ladder or LADDERS[args.optimizer]
    rules = f"lora.scaling+lora.a_init={args.rules}" if args.rules else RULES
    grid = parse_grid([rules, f"{key}={args.values or values}", f"{LR_KEY}={rungs}",
                       "seed=0"])
    return run_sweep(args.config, grid, stage_dir(args, "ladder"), base_overrides(args),
                     on_start=lambda name: print("run", name, flush=True),
                     shard=parse_shard(args.shard))


def seeds(args) -> bool:
    import pandas as pd

    key = PARTS[args.part][0]
    best = pd.read_csv(stage_dir(args, "ladder") / "best_lr.csv")
    if best["lr_at_ladder_end"].any():
        ends = best[best["lr_at_ladder_end"]]
        print("warning: best learning rate at a ladder end (extend --ladder) for:\n"
              + ends[["lora.scaling", "lora.a_init", key, "best_lr"]].to_string(index=False))
    cells = ",".join(f"{r['lora.scaling']}+{r['lora.a_init']}+{r[key]}+{r['best_lr']!r}"
                     for _, r in best.iterrows())
    grid = parse_grid([f"lora.scaling+lora.a_init+{key}+{LR_KEY}={cells}",
                       f"seed={args.seeds}"])
    return run_sweep(args.config, grid, stage_dir(args, "seeds"), base_overrides(args),
                     on_start=lambda name: print("run", name, flush=True),
                     shard=parse_shard(args.shard))


def report(args) -> Path:
    """Seed 0 at each cell's best learning rate plus the other seeds' runs."""
    import pandas as pd

    from sfedlora.plots import plot_lr_transfer

    key = PARTS[args.part][0]
    cell = ["lora.scaling", "lora.a_init", key]
    first = pd.read_csv(stage_dir(args, "ladder") / "results.csv")
    best = pd.read_csv(stage_dir(args, "ladder") / "best_lr.csv")
    chosen = first.merge(best[[*cell, "best_lr"]], on=cell)
    chosen = chosen[chosen[LR_KEY] == chosen["best_lr"]].drop(columns="best_lr")
    rest = pd.read_csv(stage_dir(args, "seeds") / "results.csv")
    runs = pd.concat([chosen, rest], ignore_index=True)
    metrics = [m for m in TABLE_METRICS if m in runs and runs[m].notna().any()]
    table, _ = best_learning_rates(runs, [*cell, LR_KEY, "seed"], metrics)
    out = study_dir(args)
    table.to_csv(out / "final.csv", index=False)
    lines = ["| rule | " + key + " | best lr | " + " | ".join(metrics) + " | seeds |",
             "|" + "---|" * (len(metrics) + 4)]
    for _, row in table.iterrows():
        cells = [f"{row['lora.scaling']}/{row['lora.a_init']}", str(row[key]),
                 f"{row['best_lr']:g}"]
        cells += [f"{row[f'{m}_mean']:.4g} ± {row[f'{m}_ci95']:.2g}" for m in metrics]
        lines.append("| " + " | ".join([*cells, str(row["seeds"])]) + " |")
    (out / "final.md").write_text(
        f"Command: python benchmarks/lr_transfer.py --part {args.part} --optimizer "
        f"{args.optimizer} --size {args.size} --stage report\n\nmean ± 95% t-interval "
        "over seeds at each cell's learning rate chosen on validation loss (seed 0)\n\n"
        + "\n".join(lines) + "\n")
    plot_lr_transfer(stage_dir(args, "ladder"), out / "figures", curve_key=key)
    (out / "settings.json").write_text(json.dumps(
        {"size": args.size, "overrides": base_overrides(args), "rules": args.rules or RULES,
         "values": args.values or PARTS[args.part][1],
         "ladder": args.ladder or LADDERS[args.optimizer], "seeds": args.seeds}, indent=2))
    return out / "final.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--optimizer", choices=sorted(LADDERS), required=True)
    parser.add_argument("--stage", choices=["ladder", "seeds", "report"], required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--config", default=str(ROOT / "configs/lr_transfer_sst2.yaml"))
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
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value settings")
    args = parser.parse_args(argv)
    if args.stage == "report":
        print(report(args))
        return 0
    done = ladder(args) if args.stage == "ladder" else seeds(args)
    print("tables written" if done else "other shards still running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
