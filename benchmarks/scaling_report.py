"""Tables and the acceptance questions of the scaling study (docs/results/scaling.md),
computed from finished sweep directories, so every number in the page comes from here.

    .venv/bin/python benchmarks/scaling_report.py runs/scaling-gpu/adamw \
        runs/scaling-gpu/sgd-lr0.3-m0.9 > /tmp/scaling_tables.md

For each sweep: personalised accuracy (mean ± std over seeds) per (N, rule) and rank,
next to the majority-label baseline of the same partitions (each client predicts the
most frequent label of its own training split: what a model that learned nothing
useful from the text scores); ``||gamma B A x||`` and ``||grad B||`` averaged over
the logged rounds; then the issue's questions answered from those numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from sfedlora.config import load_config
from sfedlora.data import build_federated_data

RULES = ["lora/shared", "rslora/shared", "sfed/shared", "sfed/independent"]


def majority_baseline(config_path: Path) -> float:
    """Mean over clients of the accuracy of predicting the client's majority label."""
    cfg = load_config(config_path)
    data = build_federated_data(cfg.data, cfg.clients.num, cfg.seed, cfg.task)
    labels = np.asarray(data.train.labels)
    scores = []
    for split in data.clients:
        majority = np.bincount(labels[split.train]).argmax()
        scores.append(float(np.mean(labels[split.test] == majority)))
    return float(np.mean(scores))


def load(sweep: Path) -> pd.DataFrame:
    results = pd.read_csv(sweep / "results.csv")
    results["rule"] = results["lora.scaling"] + "/" + results["lora.a_init"]
    for key in ("clients.num", "seed"):  # fixed by an override rather than swept
        if key not in results:
            cfg = load_config(sweep / "runs" / results["run"].iloc[0] / "config.yaml")
            results[key] = cfg.clients.num if key == "clients.num" else cfg.seed
    results["N"], results["r"] = results["clients.num"], results["lora.rank"]
    for i, name in enumerate(results["run"]):
        lines = [json.loads(x) for x in (sweep / "runs" / name / "metrics.jsonl")
                 .read_text().splitlines()]
        results.loc[i, "out_norm"] = np.nanmean(
            [m.get("adapter_output_norm") or np.nan for m in lines])
        results.loc[i, "grad_B"] = np.nanmean([m.get("grad_norm_B") or np.nan for m in lines])
    baselines = {}
    for (n, seed), frame in results.groupby(["N", "seed"]):
        baselines[(n, seed)] = majority_baseline(sweep / "runs" / frame["run"].iloc[0]
                                                 / "config.yaml")
    results["baseline"] = [baselines[(n, s)] for n, s in zip(results["N"], results["seed"],
                                                              strict=True)]
    return results


def pivot(results: pd.DataFrame, column: str, fmt: str, spread: bool = True) -> str:
    ranks = sorted(results["r"].unique())
    lines = ["| N | rule | " + " | ".join(f"r={r}" for r in ranks) + " |",
             "|---|---|" + "---|" * len(ranks)]
    for n in sorted(results["N"].unique()):
        if column == "personalized_accuracy":
            base = results[results["N"] == n].groupby("seed")["baseline"].first()
            lines.append(f"| {n} | majority label | " + " | ".join(
                [f"{base.mean():{fmt}}"] * len(ranks)) + " |")
        for rule in RULES:
            cells = []
            for r in ranks:
                values = results[(results["N"] == n) & (results["rule"] == rule)
                                 & (results["r"] == r)][column]
                text = f"{values.mean():{fmt}}"
                if spread and len(values) > 1:
                    text += f" ± {values.std():{fmt}}"
                cells.append(text)
            lines.append(f"| {n} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def means(results: pd.DataFrame, column: str = "personalized_accuracy") -> pd.DataFrame:
    return results.groupby(["N", "rule", "r"])[column].mean().unstack("r")


def answers(results: pd.DataFrame) -> list[str]:
    acc, norm = means(results), means(results, "out_norm")
    ranks = list(acc.columns)
    low = [r for r in ranks if r in (4, 16)]
    out = []
    for n in sorted(results["N"].unique()):
        lora = acc.loc[(n, "lora/shared")]
        base = results[results["N"] == n].groupby("seed")["baseline"].first().mean()
        out.append(
            f"- alpha/r, N={n}: best of r=4/16 {lora[low].max():.3f}, r=256 "
            f"{lora[256]:.3f} (drop {100 * (lora[low].max() - lora[256]):+.1f} points); "
            f"majority label {base:.3f}, so alpha/r is {100 * (lora.max() - base):+.1f} "
            "points above it at its best rank.")
    for rule in ("sfed/independent", "sfed/shared"):
        for n in sorted(results["N"].unique()):
            row = acc.loc[(n, rule)]
            out.append(f"- {rule}, N={n}: best rank r={row.idxmax()} ({row.max():.3f}); "
                       f"r=256 {row[256]:.3f}, {100 * (row.max() - row[256]):.1f} points "
                       "below the best.")
    for rule in ("sfed/independent", "sfed/shared"):
        diff = (acc.xs(rule, level="rule") - acc.xs("rslora/shared", level="rule")) * 100
        worst = diff.stack().idxmin()
        out.append(f"- {rule} minus rslora: at least as good in "
                   f"{int((diff >= 0).to_numpy().sum())} of {diff.size} (N, r) cells; "
                   f"mean {diff.to_numpy().mean():+.1f} points, worst {diff.min().min():+.1f} "
                   f"at N={worst[0]}, r={worst[1]}.")
    for rule in RULES:
        block = norm.xs(rule, level="rule")
        out.append(f"- ||gamma B A x|| under {rule}: {block.min().min():.3g} to "
                   f"{block.max().max():.3g} across N and r (max/min "
                   f"{block.max().max() / block.min().min():.1f}x).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    args = parser.parse_args()
    for sweep in args.sweeps:
        results = load(sweep)
        seeds = sorted(int(s) for s in results["seed"].unique())
        print(f"### {sweep.name} ({len(results)} runs, seeds {seeds})\n")
        print("Personalised accuracy after the last round (mean ± std over seeds):\n")
        print(pivot(results, "personalized_accuracy", ".3f"), "\n")
        print("||gamma B A x|| on the probe batch, mean over logged rounds and seeds:\n")
        print(pivot(results, "out_norm", ".3g", spread=False), "\n")
        print("||grad B||, mean over rounds and seeds:\n")
        print(pivot(results, "grad_B", ".3g", spread=False), "\n")
        print("Answers:\n")
        print("\n".join(answers(results)), "\n")


if __name__ == "__main__":
    main()
