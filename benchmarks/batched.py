"""Batched against sequential client training, side by side in one process.

For each K, the same K clients' first local round runs twice on the one model of this
process: one client after another (``Worker.fit``, what ``clients.parallel=1`` does)
and all K at once (``BatchedTrainer.train``, ``clients.parallel=K``). Both arms start
from the same downloads and client states; the order of the arms alternates with K so
drift in machine speed hits both alike. Each arm reports client-steps per second,
tokens per second (positions the model computes, padding included) and its peak memory
above what the process held before it (resident set on the CPU, sampled every 5 ms;
``torch.cuda.max_memory_allocated`` on a GPU). On a GPU it also reports the achieved
FLOP/s, counted as 4 x (frozen base parameters) per token (forward, and the backward
to the activations; the base has no weight gradients), over ``--peak-tflops``. The
largest difference between the two arms' uploads is printed as a check.

    python benchmarks/batched.py --workload minilm --ks 1,4,16,64 [--save FILE]
    python benchmarks/batched.py --report docs/results/batched/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sfedlora.config import load_config
from sfedlora.core import codecs
from sfedlora.core.environment import describe
from sfedlora.core.records import ClientState
from sfedlora.runtime.batched.training import BatchedTrainer
from sfedlora.runtime.simulation import Simulation

WORKLOADS = {
    # the demo's task: BBC News, all-MiniLM-L6-v2, 16 examples of 96 tokens a step
    "minilm": ["method=sfed", "model.max_length=96", "local.batch_size=16",
               "data.partition=iid"],
    # GSM8K on SmolLM2-135M-Instruct, LoRA on every projection, 4 examples a step
    "smollm2": ["task=causal-lm", "method=sfed", "data.dataset=gsm8k", "data.partition=iid",
                "model.max_length=256", "local.batch_size=4", "lora.targets=[q_proj,k_proj,"
                "v_proj,o_proj,gate_proj,up_proj,down_proj]"],
}


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator statistics, or the
    resident set sampled by a thread."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.start = self.high = _rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.high = max(self.high, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self.done.set()
        self.thread.join()
        self.peak = max(self.high, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def arm(sim: Simulation, k: int, downloads: dict[int, bytes], batched: bool) -> dict:
    exp = sim.pool.exp
    worker = exp.worker
    states = {cid: ClientState() for cid in range(k)}
    with PeakMemory(worker.device) as memory:
        start = time.perf_counter()
        if batched:
            runs = [worker.start_fit(cid, states[cid], downloads[cid],
                                     exp.round_train(cid, 1), 1) for cid in range(k)]
            fits = BatchedTrainer(worker).train(runs)
        else:
            fits = [worker.fit(cid, states[cid], downloads[cid], exp.round_train(cid, 1), 1)
                    for cid in range(k)]
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
        seconds = time.perf_counter() - start
    steps, tokens = sum(f.steps for f in fits), sum(f.tokens for f in fits)
    return {"seconds": seconds, "client_steps": steps, "tokens": tokens,
            "client_steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds,
            "peak_bytes": memory.peak, "uploads": [f.upload for f in fits]}


def upload_gap(a: list[bytes], b: list[bytes]) -> float:
    gap = 0.0
    for x, y in zip(a, b, strict=True):
        tx, ty = codecs.decode(x), codecs.decode(y)
        gap = max([gap, *((tx[n] - ty[n]).abs().max().item() for n in tx)])
    return gap


def measure(workload: str, ks: list[int], steps: int, overrides: list[str],
            peak_tflops: float | None) -> dict:
    cfg = load_config(None, [*WORKLOADS[workload], f"clients.num={max(ks)}",
                             f"local.steps={steps}", "eval.every=0", "progress=false",
                             "checkpoint.every=0", *overrides])
    sim = Simulation(cfg)
    worker = sim.pool.exp.worker
    downloads = {cid: sim.server.download(cid) for cid in range(max(ks))}
    arm(sim, 1, downloads, batched=False)  # warm-up: first-call costs hit neither arm
    rows = []
    for i, k in enumerate(ks):
        order = (False, True) if i % 2 == 0 else (True, False)
        result = {batched: arm(sim, k, downloads, batched) for batched in order}
        seq, bat = result[False], result[True]
        row = {"K": k, "gap": upload_gap(seq.pop("uploads"), bat.pop("uploads")),
               "sequential": seq, "batched": bat,
               "speedup": bat["client_steps_per_s"] / seq["client_steps_per_s"]}
        if worker.device.type == "cuda":
            for name in ("sequential", "batched"):
                flops = 4 * worker.base_params * row[name]["tokens_per_s"]
                row[name]["tflops"] = flops / 1e12
                if peak_tflops:
                    row[name]["utilisation"] = flops / 1e12 / peak_tflops
        rows.append(row)
        print(_line(row), flush=True)
    device = worker.device
    return {"workload": workload, "command": _command(workload, ks, steps, overrides),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads",
            "config": {"model": cfg.model_name, "batch_size": cfg.local.batch_size,
                       "max_length": cfg.model.max_length, "steps": steps,
                       "rank": cfg.lora.rank, "base_params": worker.base_params},
            "rows": rows, "environment": describe()}


def _command(workload: str, ks: list[int], steps: int, overrides: list[str]) -> str:
    return " ".join(["python benchmarks/batched.py", f"--workload {workload}",
                     f"--ks {','.join(map(str, ks))}", f"--steps {steps}", *overrides])


HEADER = ("| K | sequential client-steps/s | batched client-steps/s | speedup | "
          "sequential tokens/s | batched tokens/s | sequential peak MiB | batched peak MiB |")


def _line(row: dict) -> str:
    s, b = row["sequential"], row["batched"]
    cells = [row["K"], f"{s['client_steps_per_s']:.2f}", f"{b['client_steps_per_s']:.2f}",
             f"{row['speedup']:.2f}x", f"{s['tokens_per_s']:.0f}", f"{b['tokens_per_s']:.0f}",
             f"{s['peak_bytes'] / 2**20:.0f}", f"{b['peak_bytes'] / 2**20:.0f}"]
    line = "| " + " | ".join(map(str, cells)) + " |"
    if "utilisation" in b:
        line += f" {s['utilisation']:.1%} | {b['utilisation']:.1%} |"
    return line


def report(paths: list[Path]) -> str:
    """The saved runs as markdown tables, one per workload."""
    out = []
    for path in paths:
        saved = json.loads(path.read_text())
        cfg = saved["config"]
        commit = (saved["environment"]["source"] or {}).get("commit", "?")[:7]
        out += [f"**{saved['workload']}**: {cfg['model']}, {cfg['batch_size']} examples of up "
                f"to {cfg['max_length']} tokens a step, {cfg['steps']} steps a client, rank "
                f"{cfg['rank']}; {saved['device']}; commit {commit}", "",
                f"`{saved['command']}`", "", HEADER, "|---" * 8 + "|",
                *[_line(row) for row in saved["rows"]],
                "", "Largest difference between the two arms' uploads: "
                f"{max(row['gap'] for row in saved['rows']):.1e}.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--ks", default="1,4,16,64", help="client counts, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for utilisation")
    parser.add_argument("--save", type=Path, help="write the rows and environment as JSON")
    parser.add_argument("--report", type=Path, nargs="+", help="print saved runs as tables")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    print(HEADER)
    saved = measure(args.workload, [int(k) for k in args.ks.split(",")], args.steps,
                    args.overrides, args.peak_tflops)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
