"""Training tokens per second: sfedlora's client loop vs a plain PEFT + PyTorch loop.

Both arms use the one PEFT model of this process (SmolLM2-135M-Instruct with LoRA on
q,k,v,o,gate,up,down by default), the same GSM8K batches in the same order and AdamW
over the same adapter parameters. The sfedlora arm is ``Worker.fit``: decode the
download, copy the client's adapter in, build the optimizer, train K steps with the
per-step gradient-norm bookkeeping, read the adapter back and serialise the upload.
The plain arm is the textbook loop ``loss.backward(); opt.step(); opt.zero_grad()``.
Both arms are warmed up once; then they run in ABBA order (which arm goes first
alternates) so drift in machine speed hits both alike. Tokens are non-padding input
tokens.

    python benchmarks/lm_throughput.py [--repeats 4] [--steps 3] [--save FILE] [key=value ...]
    python benchmarks/lm_throughput.py --report FILE    # a saved record's table
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
from sfedlora.runtime.simulation import Simulation
from sfedlora.studies import runs

DEFAULTS = [
    "task=causal-lm", "method=sfed", "data.dataset=gsm8k", "data.partition=iid",
    "data.max_train_examples=200", "clients.num=2", "model.max_length=256",
    "local.batch_size=4", "lora.rank=8", "progress=false", "eval.every=0",
]


def batches_of(sim: Simulation, cid: int, round_idx: int):
    cfg = sim.cfg
    return list(train_batches(sim.pool.exp.client_train[cid], cfg.local.batch_size, cfg.local.steps,
                              cfg.local.epochs, derive_seed(cfg.seed, TAG_BATCHES, round_idx,
                                                            cid)))


def plain_loop(sim: Simulation, cid: int, round_idx: int) -> None:
    worker, data = sim.pool.exp.worker, sim.pool.exp.client_train[cid]
    params = [p for p in worker.slots.params.values() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sim.cfg.local.lr)
    worker.model.train()
    torch.manual_seed(derive_seed(sim.cfg.seed, TAG_TRAIN, round_idx, cid))
    for idx in batches_of(sim, cid, round_idx):
        worker.model(**worker.batch(data, idx)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def tokens_in(sim: Simulation, cid: int, round_idx: int) -> int:
    data = sim.pool.exp.client_train[cid]
    return sum(len(data.input_ids[i]) for idx in batches_of(sim, cid, round_idx) for i in idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save", type=Path, help="write the timings, the command and the "
                        "environment as JSON (the results page's table is its --report)")
    parser.add_argument("--report", type=Path, help="print a saved record's table, run nothing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.report:
        print(render(runs.read_record(args.report)))
        return
    cfg = load_config(None, [*DEFAULTS, f"local.steps={args.steps}", *args.overrides])
    import transformers

    transformers.logging.set_verbosity_error()
    sim = Simulation(cfg)
    worker = sim.pool.exp.worker
    download = sim.server.download()
    cid = 0
    worker.fit(cid, sim.pool.states[cid], download, sim.pool.exp.client_train[cid], 1)  # warm-up
    plain_loop(sim, cid, 1)  # warm-up of the plain arm too
    ours, plain, tokens = [], [], []

    def time_ours(r: int) -> float:
        t = time.perf_counter()
        worker.fit(cid, sim.pool.states[cid], download, sim.pool.exp.client_train[cid], r)
        return time.perf_counter() - t

    def time_plain(r: int) -> float:
        t = time.perf_counter()
        plain_loop(sim, cid, r)
        return time.perf_counter() - t

    for r in range(1, args.repeats + 1):
        tokens.append(tokens_in(sim, cid, r))
        if r % 2:  # ABBA order: neither arm always runs first
            ours.append(time_ours(r))
            plain.append(time_plain(r))
        else:
            plain.append(time_plain(r))
            ours.append(time_ours(r))

    device = next(worker.model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu x{torch.get_num_threads()} threads"
    targets = sorted(worker.model.peft_config["default"].target_modules)
    header = (f"model={cfg.model_name} device={name} batch={cfg.local.batch_size} "
              f"steps/repeat={cfg.local.steps} max_length={cfg.model.max_length} "
              f"rank={cfg.lora.rank} targets={targets}")
    record = {"header": header, "tokens": tokens, "sfedlora_s": ours, "plain_s": plain}
    if args.save:
        runs.write_record(args.save, **record)
    print(render(record))


def render(record: dict) -> str:
    """The table a run prints (and the results page shows), from its record."""
    tokens, ours, plain = record["tokens"], record["sfedlora_s"], record["plain_s"]
    lines = [record["header"],
             f"{'repeat':>6} {'tokens':>7} {'sfedlora tok/s':>15} {'plain tok/s':>12} "
             f"{'ratio':>6}"]
    lines += [f"{i:>6} {n:>7} {n / a:>15.1f} {n / b:>12.1f} {b / a:>6.3f}"
              for i, (n, a, b) in enumerate(zip(tokens, ours, plain, strict=True), start=1)]
    total = sum(tokens)
    lines += [f"{'total':>6} {total:>7} {total / sum(ours):>15.1f} "
              f"{total / sum(plain):>12.1f} {sum(plain) / sum(ours):>6.3f}",
              "ratio = sfedlora tokens/s / plain tokens/s; target >= 0.95"]
    if commit := (record.get("environment", {}).get("source") or {}).get("commit"):
        lines.append(f"commit {commit[:7]}")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
