"""Batched sweeps against one run after another: the learning-rate study's rank part.

Runs the same slice of ``benchmarks/lr_transfer.py --part rank --stage ladder`` twice,
each as that command in a fresh process: one run after another (today's path) and
``--batched R`` (R runs in one process, their clients in shared passes). Prints each
arm's wall time, seconds per run and their ratio, side by side, and the largest
difference between the two arms' final metrics (the runs must agree); the arms
alternate which goes first when ``--repeats`` is above 1. From the seconds per run it
also gives what the whole rank part (ladder and seeds stages) would take on this
machine, marked as extrapolated from the slice.

    python benchmarks/batched_sweep.py --values 4,32,256 --rules sfed+independent,lora+shared \\
        --ladder 6.4e-4,2.56e-3 --batched 6 --save docs/results/batched/sweep-cpu.json
    python benchmarks/batched_sweep.py --report docs/results/batched/sweep-cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lr_transfer  # noqa: E402  (the study whose rank part is timed)

from sfedlora.core.environment import describe  # noqa: E402

COMPARED = ("personalized_val_loss", "personalized_loss", "personalized_accuracy",
            "train_loss")


def study_command(out: Path, args, batched: int) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "lr_transfer.py"), "--part", "rank",
            "--optimizer", args.optimizer, "--stage", "ladder", "--size", args.size,
            "--out", str(out), "--values", args.values, "--rules", args.rules,
            "--ladder", args.ladder, "--batched", str(batched), *args.overrides]


def run_arm(out: Path, args, batched: int) -> float:
    """Wall seconds of the study's own command, imports and model loads included."""
    start = time.perf_counter()
    subprocess.run(study_command(out, args, batched), check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def largest_gap(a: Path, b: Path) -> float:
    import pandas as pd

    ours = pd.read_csv(a / "results.csv").set_index("run").sort_index()
    theirs = pd.read_csv(b / "results.csv").set_index("run").sort_index()
    if list(ours.index) != list(theirs.index):
        raise SystemExit("the two arms ran different runs")
    cols = [c for c in COMPARED if c in ours]
    return float((ours[cols] - theirs[cols]).abs().max().max())


def full_rank_part(args) -> dict[str, int]:
    """How many runs the study's rank part makes with its default rules, ranks and
    ladder: the ladder stage, then each cell at its best rate with the other seeds."""
    part = lr_transfer.PARTS["rank"]
    rules = len(part.rules.split(","))
    values = len(part.values.split(","))
    rungs = len(part.ladder[args.optimizer].split(","))
    seeds = len(lr_transfer.SEEDS.split(","))
    return {"ladder": rules * values * rungs, "seeds": rules * values * seeds}


def measure(args) -> dict:
    arms = {"sequential": 1, "batched": args.batched}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    gaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
            dirs = {}
            for name in order:
                out = Path(tmp) / f"{name}-{repeat}"
                seconds[name].append(run_arm(out, args, arms[name]))
                dirs[name] = lr_transfer.stage_dir(
                    argparse.Namespace(out=out, part="rank", optimizer=args.optimizer,
                                       size=args.size), "ladder")
                print(f"{name} (repeat {repeat}): {seconds[name][-1]:.1f} s", flush=True)
            gaps.append(largest_gap(dirs["sequential"], dirs["batched"]))
    runs = (len(args.values.split(",")) * len(args.rules.split(","))
            * len(args.ladder.split(",")))
    return {"command": " ".join(["python", "benchmarks/batched_sweep.py", *sys.argv[1:]]),
            "study": " ".join(study_command(Path("OUT"), args, args.batched)[1:]),
            "runs": runs, "batched": args.batched, "seconds": seconds,
            "largest_metric_gap": max(gaps), "full_rank_part_runs": full_rank_part(args),
            "environment": describe()}


def report(paths: list[Path]) -> str:
    blocks = []
    for path in paths:
        saved = json.loads(path.read_text())
        env = saved["environment"]
        commit = ((env.get("source") or {}).get("commit") or "?")[:7]
        per_run = {name: min(s) / saved["runs"] for name, s in saved["seconds"].items()}
        total = sum(saved["full_rank_part_runs"].values())
        lines = [f"`{saved['command']}` ({saved['runs']} runs of the rank part's ladder; "
                 f"commit {commit}; {env.get('cpu_count', '?')} CPUs, torch "
                 f"{(env.get('packages') or {}).get('torch', '?')})", "",
                 "| path | wall s (best of repeats) | s per run | speedup | whole rank part "
                 f"({total} runs), extrapolated |", "|---|---|---|---|---|"]
        for name, s in saved["seconds"].items():
            label = name if name == "sequential" else f"batched, R = {saved['batched']}"
            lines.append(f"| {label} | {min(s):.0f} | {per_run[name]:.1f} | "
                         f"{per_run['sequential'] / per_run[name]:.2f}x | "
                         f"{per_run[name] * total / 3600:.1f} h |")
        lines += ["", f"Largest difference between the two paths' final metrics: "
                  f"{saved['largest_metric_gap']:.1e}."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="adamw", choices=sorted(lr_transfer.LADDERS))
    parser.add_argument("--size", default="cpu", choices=["gpu", "cpu", "smoke"])
    parser.add_argument("--values", default="4,32,256", help="ranks of the slice")
    parser.add_argument("--rules", default="sfed+independent,lora+shared")
    parser.add_argument("--ladder", default="6.4e-4,2.56e-3")
    parser.add_argument("--batched", type=int, default=6, metavar="R")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--save", type=Path, help="write the measurement as JSON")
    parser.add_argument("--report", type=Path, nargs="+", help="print saved measurements")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_intermixed_args()
    if args.report:
        print(report(args.report))
        return
    saved = measure(args)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(saved, indent=1) + "\n")
    print(report([args.save]) if args.save else json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
