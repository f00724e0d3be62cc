"""Your own CSV: federate it, compare methods, plot them.

    .venv/bin/python examples/own_csv.py --csv reviews.csv --text text --label label
    .venv/bin/python examples/own_csv.py            # no CSV: writes one from BBC News first

Each method runs on the same clients (same partition, same seed), and the figure shows
each client's own-adapter accuracy on its own test part, averaged over clients, round
by round. Any further ``dotted.key=value`` arguments go to every run (``rounds=3``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sfedlora


def bbc_csv(path: Path, per_topic: int = 60) -> Path:
    """A small CSV of BBC News articles (the corpus the offline install ships), so the
    example runs without a file of your own."""
    from sfedlora.data.sources import load_bbc

    frame = load_bbc().groupby("label").head(per_topic)
    frame.assign(text=frame.text.str.slice(0, 600)).to_csv(path, index=False)
    return path


def compare(csv: Path, methods: list[str], out: Path, text: str = "text",
            label: str = "label", overrides: tuple[str, ...] = ()) -> dict:
    config = {
        "data": {"source": "files", "train_path": str(csv), "text_column": text,
                 "label_column": label, "partition": "dirichlet", "dirichlet_alpha": 0.5},
        "clients": {"num": 8}, "rounds": 5, "eval": {"every": 1},
    }
    return {method: sfedlora.run(config, f"method={method}", *overrides,
                                 f"output_dir={out / method}", overwrite=True)
            for method in methods}


def plot(results: dict, path: Path, metric: str = "personalized_accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, result in results.items():
        rows = result.metrics.dropna(subset=[metric])
        ax.plot(rows["round"], rows[metric], marker="o", label=method)
    ax.set(xlabel="round", ylabel=metric.replace("_", " "), title="your CSV, federated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, help="your CSV (default: one from BBC News)")
    parser.add_argument("--text", default="text", help="the text column")
    parser.add_argument("--label", default="label", help="the label column")
    parser.add_argument("--methods", nargs="+", default=["sfed", "fedit", "local"])
    parser.add_argument("--out", type=Path, default=Path("runs/own_csv"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.csv or bbc_csv(args.out / "bbc.csv")
    results = compare(csv, args.methods, args.out, args.text, args.label,
                      tuple(args.overrides))
    for method, result in results.items():
        print(f"{method:>8}  personalised accuracy "
              f"{result.summary['personalized_accuracy']:.3f}  "
              f"bytes {result.summary['bytes_total']:,}")
    print("figure:", plot(results, args.out / "accuracy.png"))
    return results


if __name__ == "__main__":
    main()
