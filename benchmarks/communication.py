"""Accuracy against bytes for every communication-efficient arm, side by side.

Every arm is the same experiment (``configs/sst2_communication.yaml``: SST-2,
all-MiniLM-L6-v2, 10 clients, Dirichlet(0.5), same seed and rounds) with a different
method and codec. Finished arms are reused, half-finished ones resumed, so the script
can be stopped and rerun. It prints one table: final accuracies, total bytes, the
reduction against dense FedIT, and the bytes each arm needed to first reach dense
FedIT's final accuracy minus one point ("equal accuracy").

    python benchmarks/communication.py                 # all arms
    python benchmarks/communication.py rounds=10 --arms fedit flasc-d16

On a machine with spare cores, split the arms over processes (``--runs-only``, each
with ``OMP_NUM_THREADS=1``) and run the plain command last to print the table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sfedlora.config import load_config
from sfedlora.runtime.simulation import Simulation
from sfedlora.studies import runs as run_files
from sfedlora.studies.plots import plot_runs

ARMS: dict[str, list[str]] = {
    "fedit": ["method=fedit"],
    "flasc-d4": ["method=flasc", "comm.down.density=0.25", "comm.up.density=0.25"],
    "flasc-d16": ["method=flasc", "comm.down.density=0.0625", "comm.up.density=0.0625"],
    "fedsa": ["method=fedsa"],
    "sfed": ["method=sfed"],
    "fedit-up8": ["method=flocora"],
    "fedit-up4": ["method=flocora", "comm.up.bits=4"],
    "sfed-up-d16-q4": ["method=sfed", "comm.up.density=0.0625", "comm.up.bits=4"],
    "sfed-up-d16-q4-down-q8": ["method=sfed", "comm.up.density=0.0625", "comm.up.bits=4",
                               "comm.down.bits=8"],
}
METRIC = "personalized_accuracy"
BASELINE = "fedit"


def run_arm(run_dir: Path, config: str, overrides: list[str]) -> Path:
    """Run one arm into ``run_dir``: reused when finished, resumed when half done."""
    if run_files.is_finished(run_dir):
        return run_dir
    if (run_dir / "checkpoint.safetensors").is_file():
        Simulation.resume(run_dir, ["progress=false"]).run()
        return run_dir
    cfg = load_config(config, [*overrides, f"output_dir={run_dir}", "progress=false"])
    Simulation(cfg).run(overwrite=True)  # this arm's own run, cut short before a checkpoint
    return run_dir


def bytes_to_reach(metrics: list[dict], target: float) -> int | None:
    for m in metrics:
        if m.get(METRIC) is not None and m[METRIC] >= target:
            return m["bytes_total"]
    return None


def table(run_dirs: dict[str, Path]) -> str:
    base = run_files.metrics(run_dirs[BASELINE])
    base_final = run_files.summary(run_dirs[BASELINE])
    target = base_final[METRIC] - 0.01
    base_to_target = bytes_to_reach(base, target)
    lines = [
        f"equal accuracy: {METRIC} >= {target:.4f} (dense FedIT's final minus 1 point)",
        "",
        "| arm | pers. acc | global acc | MB up | MB down | MB total | x fewer bytes "
        "(total) | MB to equal acc | x fewer bytes to equal acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run_dir in run_dirs.items():
        s = run_files.summary(run_dir)
        reach = bytes_to_reach(run_files.metrics(run_dir), target)
        glob = "-" if s["global_accuracy"] is None else f"{s['global_accuracy']:.4f}"
        lines.append(
            f"| {name} | {s[METRIC]:.4f} | {glob} | {s['bytes_up_total'] / 1e6:.2f} | "
            f"{s['bytes_down_total'] / 1e6:.2f} | {s['bytes_total'] / 1e6:.2f} | "
            f"{base_final['bytes_total'] / s['bytes_total']:.1f} | "
            + ("not reached | - |" if reach is None else
               f"{reach / 1e6:.2f} | {base_to_target / reach:.1f} |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2_communication.yaml")
    parser.add_argument("--out", default="runs/communication", type=Path)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--plot", default="docs/results/communication.png", type=Path)
    parser.add_argument("--runs-only", action="store_true",
                        help="run just these arms, no table (to split arms over processes)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every arm")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    arms = args.arms if args.runs_only else [BASELINE, *[a for a in args.arms
                                                         if a != BASELINE]]
    run_dirs = {}
    for name in arms:
        print(f"arm {name} ...", flush=True)
        run_dirs[name] = run_arm(args.out / name, args.config, [*ARMS[name], *args.overrides])
    if args.runs_only:
        return
    print(table(run_dirs))
    plot_runs(list(run_dirs.values()), args.plot, x="bytes", y=METRIC, labels=list(run_dirs),
              title="SST-2, all-MiniLM-L6-v2, 10 clients, Dirichlet(0.5)")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
