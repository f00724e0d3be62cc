"""Flower's simulation engine vs the in-process simulator, side by side in one run.

The main job's settings (all-MiniLM-L6-v2 on BBC News, 10 clients, 5 steps per round),
evaluation off, the same config and seed in both arms. Reported per arm:

* steady-state seconds per round: the median over rounds 2.. of the round's training
  and aggregation time (for Flower: messages out, the nodes' local work, replies in);
* outside the rounds: wall time of the whole call minus the rounds (start-up: model
  and data loading, for Flower also Ray and its workers; shut-down: export, teardown).

The in-process arm trains the clients one after another in this process (torch uses
every core); the Flower arm runs them on ``--workers`` worker processes, one model and
one core each.

    python benchmarks/flower_overhead.py [--rounds 4] [--workers N] [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sfedlora.config import load_config
from sfedlora.flower.simulation import run_simulation
from sfedlora.simulation import Simulation


def round_seconds(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "timings.jsonl").read_text().splitlines()]
    return [t["train"] + t["aggregate"] for t in lines if t["round"] >= 1]


def report(name: str, wall: float, rounds: list[float]) -> dict:
    steady = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
    row = {"arm": name, "steady_s_per_round": steady, "rounds_s": rounds,
           "outside_rounds_s": wall - sum(rounds), "wall_s": wall}
    print(f"{name:>10}: steady {steady:7.2f} s/round | outside the rounds "
          f"{row['outside_rounds_s']:6.1f} s | wall {wall:6.1f} s | rounds "
          + " ".join(f"{r:.1f}" for r in rounds), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    common = [f"rounds={args.rounds}", "eval.every=0", "checkpoint.every=0",
              "progress=false", *args.overrides]
    import transformers

    transformers.logging.set_verbosity_error()

    t = time.perf_counter()
    Simulation(load_config(args.config, [*common, f"output_dir={out / 'local'}"])).run()
    local = report("in-process", time.perf_counter() - t, round_seconds(out / "local"))

    t = time.perf_counter()
    run_simulation(args.config, [*common, f"output_dir={out / 'flower'}",
                                 f"flower.round_timeout={3600}"], workers=args.workers)
    flower = report("flower", time.perf_counter() - t, round_seconds(out / "flower"))

    ratio = flower["steady_s_per_round"] / local["steady_s_per_round"]
    print(f"steady-state ratio flower / in-process: {ratio:.3f} (target <= 1.10); "
          f"{args.workers} Flower workers, torch threads in-process: "
          f"{__import__('torch').get_num_threads()}")
    print(json.dumps({"local": local, "flower": flower, "ratio": ratio}))


if __name__ == "__main__":
    main()
