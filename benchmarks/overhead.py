"""Federation overhead: a 10-client simulation vs the same local steps without it.

Both arms run in this one process on the same model (all-MiniLM-L6-v2 on BBC News,
the main job's settings), the same batches in the same order and the same number of
optimizer steps. The federated arm adds what federation costs: swapping each
client's adapter in and out, serialising every message with safetensors, checking
and aggregating uploads, and the per-step gradient-norm bookkeeping. Evaluation is
off in both arms. Rounds alternate between the arms so that drift in machine speed
hits both alike.

    python benchmarks/overhead.py [--rounds 3] [--save FILE] [dotted.key=value ...]
    python benchmarks/overhead.py --report FILE    # a saved record's table
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sfedlora.config import load_config
from sfedlora.core.seeds import BATCHES as TAG_BATCHES
from sfedlora.core.seeds import TRAIN as TAG_TRAIN
from sfedlora.core.seeds import derive_seed
from sfedlora.modeling.model import train_batches
from sfedlora.privacy.sampling import sample_clients
from sfedlora.runtime.simulation import Simulation
from sfedlora.studies import runs


def plain_round(sim: Simulation, round_idx: int, optimizer: torch.optim.Optimizer) -> None:
    """The same clients' batches, trained back to back on one adapter: no swapping,
    no messages, no aggregation."""
    cfg, worker = sim.cfg, sim.pool.exp.worker
    model, collate = worker.model, worker.collate
    model.train()
    for cid in sample_clients(cfg.clients.num, cfg.clients_per_round, cfg.seed, round_idx):
        data = sim.pool.exp.client_train[cid]
        torch.manual_seed(derive_seed(cfg.seed, TAG_TRAIN, round_idx, cid))
        for idx in train_batches(data, cfg.local.batch_size, cfg.local.steps, cfg.local.epochs,
                                 derive_seed(cfg.seed, TAG_BATCHES, round_idx, cid)):
            model(**collate(data, idx)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", type=Path, help="write the timings, the command and the "
                        "environment as JSON (the results page's table is its --report)")
    parser.add_argument("--report", type=Path, help="print a saved record's table, run nothing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.report:
        print(render(runs.read_record(args.report)))
        return
    cfg = load_config(args.config, [f"rounds={args.rounds}", "eval.every=0", "progress=false",
                                    *args.overrides])
    import transformers

    transformers.logging.set_verbosity_error()
    sim = Simulation(cfg)
    worker = sim.pool.exp.worker
    worker.slots.set_trainable(worker.method.plan(1).train)
    optimizer = torch.optim.AdamW([p for p in worker.slots.params.values() if p.requires_grad],
                                  lr=cfg.local.lr)

    # one warm-up round of each (allocator, thread pools), not timed
    sim.run_round(1)
    plain_round(sim, 1, optimizer)
    fed, plain = [], []
    for r in range(1, args.rounds + 1):
        t = time.perf_counter()
        sim.run_round(r)
        fed.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain_round(sim, r, optimizer)
        plain.append(time.perf_counter() - t)

    steps = cfg.clients_per_round * (cfg.local.steps or 0)
    header = (f"model={cfg.model.name} method={cfg.method} "
              f"clients/round={cfg.clients_per_round} local.steps={cfg.local.steps} "
              f"batch={cfg.local.batch_size} max_length={cfg.model.max_length} "
              f"rank={cfg.lora.rank} threads={torch.get_num_threads()}")
    record = {"header": header, "steps_per_round": steps, "federated_s": fed,
              "plain_s": plain}
    if args.save:
        runs.write_record(args.save, **record)
    print(render(record))


def render(record: dict) -> str:
    """The table a run prints (and the results page shows), from its record."""
    fed, plain = record["federated_s"], record["plain_s"]
    lines = [record["header"], f"{'round':>5} {'federated s':>12} {'plain s':>9} {'ratio':>7}"]
    lines += [f"{r:>5} {f:>12.2f} {p:>9.2f} {f / p:>7.3f}"
              for r, (f, p) in enumerate(zip(fed, plain, strict=True), start=1)]
    lines += [f"{'total':>5} {sum(fed):>12.2f} {sum(plain):>9.2f} {sum(fed) / sum(plain):>7.3f}",
              f"steps per round: {record['steps_per_round']}; federated overhead per round: "
              f"{(sum(fed) - sum(plain)) / len(fed):.3f} s; target ratio <= 1.05"]
    if commit := (record.get("environment", {}).get("source") or {}).get("commit"):
        lines.append(f"commit {commit[:7]}")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
