"""Federation overhead: a 10-client simulation vs the same local steps without it.

Both arms run in this one process on the same model (all-MiniLM-L6-v2 on BBC News,
the main job's settings), the same batches in the same order and the same number of
optimizer steps. The federated arm adds what federation costs: swapping each
client's adapter in and out, serialising every message with safetensors, checking
and aggregating uploads, and the per-step gradient-norm bookkeeping. Evaluation is
off in both arms. Rounds alternate between the arms so that drift in machine speed
hits both alike.

    python benchmarks/overhead.py [--rounds 3] [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sfedlora.config import load_config
from sfedlora.core.seeds import BATCHES as TAG_BATCHES
from sfedlora.core.seeds import TRAIN as TAG_TRAIN
from sfedlora.core.seeds import derive_seed
from sfedlora.modeling.model import train_batches
from sfedlora.privacy.sampling import sample_clients
from sfedlora.runtime.simulation import Simulation


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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
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
    print(f"model={cfg.model.name} method={cfg.method} clients/round={cfg.clients_per_round} "
          f"local.steps={cfg.local.steps} batch={cfg.local.batch_size} "
          f"max_length={cfg.model.max_length} rank={cfg.lora.rank} threads="
          f"{torch.get_num_threads()}")
    print(f"{'round':>5} {'federated s':>12} {'plain s':>9} {'ratio':>7}")
    for r, (f, p) in enumerate(zip(fed, plain, strict=True), start=1):
        print(f"{r:>5} {f:>12.2f} {p:>9.2f} {f / p:>7.3f}")
    print(f"{'total':>5} {sum(fed):>12.2f} {sum(plain):>9.2f} {sum(fed) / sum(plain):>7.3f}")
    print(f"steps per round: {steps}; federated overhead per round: "
          f"{(sum(fed) - sum(plain)) / len(fed):.3f} s; target ratio <= 1.05")


if __name__ == "__main__":
    main()
