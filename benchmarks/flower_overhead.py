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

Arms (``--arms``, any of them, in this order):

* ``in-process``: the clients one after another in this process (torch uses every core);
* ``simulation``: Flower's simulation engine on ``--workers`` worker processes, one
  model and one core each;
* ``deployment``: Flower's deployment engine on loopback (``sfedlora deploy-local``: a
  SuperLink and one SuperNode per client, TLS, node authentication), each node's
  messages answered by its sfedlora node runtime (one long-lived process that takes the
  node's tasks itself); the nodes take turns at the cores, one computing node per core
  (``deploy-local``'s default ``--compute-slots``);
* ``deployment-worker``: the same, each message taken by Flower's SuperExec, which
  starts a ClientApp process for it that hands it to the node's long-lived worker
  (``--serving worker``, the default before the node runtime);
* ``deployment-all-at-once``: like ``deployment``, with every node computing at once,
  each on ``cores // nodes`` threads (``--compute-slots 0``);
* ``deployment-per-message``: every message served in the process Flower starts for
  it, the model built per message (``--serving per-message``, Flower's own way).

Each arm's steady seconds per round is printed beside its ratio to in-process
(targets: simulation <= 1.10, deployment <= 1.20). ``--save FILE`` writes the rows,
the command and the environment as JSON.

    python benchmarks/flower_overhead.py [--config configs/demo.yaml] [--rounds 4]
        [--arms in-process,simulation] [--workers N] [--save FILE] [dotted.key=value ...]
    python benchmarks/flower_overhead.py --report FILE [FILE ...]   # saved rows as a table
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


ARMS = ("in-process", "simulation", "deployment", "deployment-worker",
        "deployment-all-at-once", "deployment-per-message")
TARGETS = {"simulation": 1.10, "deployment": 1.20}


def report(paths: list[Path]) -> str:
    """The saved rows of each file as one markdown table (what the results page shows)."""
    lines = ["| config | arm | steady s/round (median of rounds 2..) | ratio to in-process "
             "| rounds (s) | start-up (s) | shut-down (s) | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        saved = json.loads(path.read_text())
        config = next((a for a in saved["command"].split("--config ")[1:]), "configs/demo.yaml")
        commit = (saved["environment"]["source"] or {}).get("commit", "?")[:7]
        for row in saved["rows"].values():
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else "1"
            lines.append(f"| {config.split()[0]} | {row['arm']} | "
                         f"{row['steady_s_per_round']:.1f} | {ratio} | "
                         + ", ".join(f"{r:.1f}" for r in row["rounds_s"])
                         + f" | {row['startup_s']:.1f} | {row['shutdown_s']:.1f} | {commit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--arms", default="in-process,simulation",
                        help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--save", type=Path, help="write the rows and environment as JSON")
    parser.add_argument("--report", type=Path, nargs="+", metavar="FILE",
                        help="print saved rows as a markdown table, run nothing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ARMS)}")
    out = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    common = [f"rounds={args.rounds}", "eval.every=0", "checkpoint.every=0",
              "progress=false", *args.overrides]
    nodes = load_config(args.config, common).clients.num
    import transformers

    transformers.logging.set_verbosity_error()

    def deploy(name: str, serving: str = "runtime", compute_slots: int | None = -1):
        return lambda: deploy_local(
            args.config, [*common, f"output_dir={out / name}", "flower.round_timeout=3600"],
            nodes=nodes, state_dir=out / f"{name}-state", serving=serving,
            compute_slots=compute_slots)

    calls = {
        "in-process": lambda: Simulation(
            load_config(args.config, [*common, f"output_dir={out / 'in-process'}"])).run(),
        "simulation": lambda: run_simulation(
            args.config, [*common, f"output_dir={out / 'simulation'}",
                          "flower.round_timeout=3600"], workers=args.workers),
        "deployment": deploy("deployment"),
        "deployment-worker": deploy("deployment-worker", serving="worker"),
        "deployment-all-at-once": deploy("deployment-all-at-once", compute_slots=None),
        "deployment-per-message": deploy("deployment-per-message", serving="per-message"),
    }
    rows = {name: timed(name, out / name, calls[name]) for name in ARMS if name in arms}
    base = rows.get("in-process")
    for name, row in rows.items():
        if base and name != "in-process":
            row["ratio"] = row["steady_s_per_round"] / base["steady_s_per_round"]
            target = f" (target <= {TARGETS[name]:.2f})" if name in TARGETS else ""
            print(f"steady-state ratio {name} / in-process: {row['ratio']:.3f}{target}")
    print(f"{args.workers} simulation workers, {nodes} SuperNodes sharing "
          f"{os.cpu_count()} cores, torch threads in-process: "
          f"{__import__('torch').get_num_threads()}")
    if args.save:
        run_files.write_record(args.save, rows=rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
