"""Flower's simulation engine vs the in-process simulator, side by side in one run.

The main job's settings (all-MiniLM-L6-v2 on BBC News, 10 clients, 5 steps per round),
evaluation off, the same config and seed in both arms. Reported per arm:

* steady-state seconds per round: the median over rounds 2.. of the round's training
  and aggregation time (for Flower: messages out, the nodes' local work, replies in);
* start-up: from the call to the first round's start (model and data loading; for
  Flower also Ray, its workers and their models);
* shut-down: from the last round's end to the call's return (adapter export, teardown).

Round starts and ends come from the run's ``timings.jsonl`` (wall-clock Unix time, so
they compare with this process's clock even when the rounds ran elsewhere).

The in-process arm trains the clients one after another in this process (torch uses
every core); the Flower arm runs them on ``--workers`` worker processes, one model and
one core each. ``--deployment`` adds a third arm, Flower's deployment engine on
loopback (``sfedlora deploy-local``: a SuperLink and one SuperNode per client, TLS);
it is not in the ratio.

    python benchmarks/flower_overhead.py [--rounds 4] [--workers N] [--deployment]
                                         [dotted.key=value ...]
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
from sfedlora.runtime.flower.deploy import deploy_local
from sfedlora.runtime.flower.simulation import run_simulation
from sfedlora.runtime.simulation import Simulation
from sfedlora.studies import runs as run_files


def timed(name: str, run_dir: Path, call) -> dict:
    """Run ``call()`` and report its rounds, start-up and shut-down from ``run_dir``."""
    start = time.time()
    call()
    end = time.time()
    lines = run_files.timings(run_dir)
    rounds = [t for t in lines if t["round"] >= 1]
    seconds = [t["train"] + t["aggregate"] for t in rounds]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    row = {"arm": name, "steady_s_per_round": steady, "rounds_s": seconds,
           "startup_s": rounds[0]["started_at"] - start,
           "shutdown_s": end - rounds[-1]["ended_at"], "wall_s": end - start}
    print(f"{name:>10}: steady {steady:7.2f} s/round | start-up {row['startup_s']:6.1f} s"
          f" | shut-down {row['shutdown_s']:5.1f} s | wall {row['wall_s']:6.1f} s | rounds "
          + " ".join(f"{r:.1f}" for r in seconds), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--deployment", action="store_true",
                        help="also time the loopback deployment engine")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    common = [f"rounds={args.rounds}", "eval.every=0", "checkpoint.every=0",
              "progress=false", *args.overrides]
    import transformers

    transformers.logging.set_verbosity_error()

    local = timed("in-process", out / "local", lambda: Simulation(
        load_config(args.config, [*common, f"output_dir={out / 'local'}"])).run())
    flower = timed("flower", out / "flower", lambda: run_simulation(
        args.config, [*common, f"output_dir={out / 'flower'}", "flower.round_timeout=3600"],
        workers=args.workers))

    arms = {"local": local, "flower": flower}
    if args.deployment:
        nodes = load_config(args.config, common).clients.num
        arms["deployment"] = timed("deployment", out / "deployment", lambda: deploy_local(
            args.config, [*common, f"output_dir={out / 'deployment'}",
                          "flower.round_timeout=3600"], nodes=nodes))
    ratio = flower["steady_s_per_round"] / local["steady_s_per_round"]
    print(f"steady-state ratio flower / in-process: {ratio:.3f} (target <= 1.10); "
          f"{args.workers} Flower workers, torch threads in-process: "
          f"{__import__('torch').get_num_threads()}")
    print(json.dumps({**arms, "ratio": ratio}))


if __name__ == "__main__":
    main()
