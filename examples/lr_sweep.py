"""A learning-rate sweep chosen the way our studies choose: on validation loss, never
on the test part, with several seeds and a 95% interval.

    .venv/bin/python examples/lr_sweep.py                       # the main job, 3 rates x 2 seeds
    .venv/bin/python examples/lr_sweep.py --config my.yaml --rates 1e-4 4e-4 1.6e-3

Every client holds out a validation part (``data.validation_fraction``); the sweep runs
every rate with every seed (``sfedlora.sweep``), the rate with the lowest mean
validation loss is chosen, and its test accuracy is reported as a mean with a 95%
t-interval over seeds (``sfedlora.studies.stats``). A chosen rate at an end of the
ladder is flagged: the best rate may lie beyond it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sfedlora
from sfedlora.studies.stats import mean_ci

VALIDATION = "personalized_val_loss"
TEST = "personalized_accuracy"


def choose(results) -> tuple[float, bool]:
    """The rate of lowest mean validation loss, and whether it sits at a ladder end."""
    by_rate = results.groupby("local.lr")[VALIDATION].mean()
    best = float(by_rate.idxmin())
    return best, best in (by_rate.index.min(), by_rate.index.max())


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rates", nargs="+", type=float, default=[1.25e-4, 5e-4, 2e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("runs/lr_sweep"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args(argv)
    swept = sfedlora.sweep(args.config, {"local.lr": args.rates, "seed": args.seeds},
                           "data.validation_fraction=0.2", *args.overrides, out=args.out)
    results = swept.results
    best, at_end = choose(results)
    mean, half = mean_ci(results.loc[results["local.lr"] == best, TEST].tolist())
    print(results[["local.lr", "seed", VALIDATION, TEST]].to_string(index=False))
    print(f"chosen on validation loss: local.lr={best:g}"
          f"{' (at an end of the ladder: extend it)' if at_end else ''}; "
          f"test accuracy {mean:.3f} ± {half:.3f} (95% t-interval, {len(args.seeds)} seeds)")
    return best, swept


if __name__ == "__main__":
    main()
