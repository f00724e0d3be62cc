"""A learning-rate sweep chosen the way our studies choose: some seeds choose the rate
on validation data and are never reported; other seeds run the chosen rate alone and
are reported with a 95% interval. The test part never chooses anything.

    .venv/bin/python examples/lr_sweep.py                  # the main job: 3 rates, 1 + 2 seeds
    .venv/bin/python examples/lr_sweep.py --config my.yaml --rates 1e-4 4e-4 1.6e-3

Every client holds out a validation part (``data.validation_fraction``). Stage one runs
every rate on the selection seeds (``sfedlora.sweep``) and chooses the rate with the
best mean validation accuracy (for a causal-LM config, the lowest validation loss);
among exact ties, the lowest rate. A rate at an end of the ladder is flagged: the best
may lie beyond it. Stage two runs the chosen rate on the reporting seeds, and their test
accuracy is the figure reported, as a mean with a 95% t-interval
(``sfedlora.studies.stats``).

Why accuracy rather than loss for classification: when each client keeps its own head
(FedSA-LoRA, SFed-LoRA, ``local``), a head trained on a few dozen examples grows
overconfident, and the validation loss can then favour a rate whose model predicts
little beyond the majority label (docs/results/regime.md). To compare methods with a
plan fixed before the first run, rules paired by seed and a report, use
``sfedlora study PLAN`` (docs/guides/sweeps.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sfedlora
from sfedlora.config import load_config
from sfedlora.studies.stats import mean_ci
from sfedlora.studies.sweep import TUNE_ON, best_learning_rates

# what chooses (a best_lr table's tune_on), by task; the test figure that is reported
CHOOSE_ON = {"classification": "accuracy", "causal-lm": "loss"}
TEST = {"classification": "personalized_accuracy", "causal-lm": "personalized_perplexity"}


def choose(results, tune_on: str) -> tuple[float, bool]:
    """The rate with the best mean validation figure over the selection seeds (the
    lowest rate among exact ties), and whether it sits at an end of the ladder: the
    choice ``sfedlora sweep --tune-on`` writes to its best_lr table."""
    table, _ = best_learning_rates(results, ["local.lr", "seed"], [], tune_on)
    return float(table["best_lr"].iloc[0]), bool(table["lr_at_ladder_end"].iloc[0])


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rates", nargs="+", type=float, default=[1.25e-4, 5e-4, 2e-3])
    parser.add_argument("--select-seeds", nargs="+", type=int, default=[100],
                        help="seeds that choose the rate (never reported)")
    parser.add_argument("--report-seeds", nargs="+", type=int, default=[0, 1],
                        help="seeds that run the chosen rate and are reported")
    parser.add_argument("--out", type=Path, default=Path("runs/lr_sweep"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args(argv)
    if shared := set(args.select_seeds) & set(args.report_seeds):
        parser.error(f"seeds {sorted(shared)} would both choose and be reported; "
                     "give --select-seeds and --report-seeds disjoint seeds")
    overrides = ["data.validation_fraction=0.2", *args.overrides]
    task = load_config(args.config, overrides).task
    metric, _ = TUNE_ON[CHOOSE_ON[task]]

    selection = sfedlora.sweep(args.config, {"local.lr": args.rates, "seed": args.select_seeds},
                               *overrides, out=args.out / "select")
    best, at_end = choose(selection.results, CHOOSE_ON[task])
    reporting = sfedlora.sweep(args.config, {"local.lr": [best], "seed": args.report_seeds},
                               *overrides, out=args.out / "report")
    mean, half = mean_ci(reporting.results[TEST[task]].tolist())

    print(selection.results[["local.lr", "seed", metric]].to_string(index=False))
    print(f"chosen on {metric}: local.lr={best:g}"
          f"{' (at an end of the ladder: extend it)' if at_end else ''}")
    print(f"{TEST[task]} at the chosen rate: {mean:.3f} ± {half:.3f} "
          f"(95% t-interval over reporting seeds {args.report_seeds})")
    return best, selection, reporting


if __name__ == "__main__":
    main()
