"""Batched against sequential client training, side by side in one run.

For each K, the same K clients' first local round runs twice on the same model: one
client after another (``Worker.fit``, what ``clients.parallel=1`` does) and all K at
once (``BatchedTrainer.train``, ``clients.parallel=K``). Both arms start from the same
downloads and client states, and the order of the arms alternates with K so drift in
machine speed hits both alike. Each arm runs in a process of its own (after loading
the model and a one-client warm-up), so its peak memory is its own: on the CPU the
process's peak resident set above the level with the model loaded (the warm-up's one
client stays below every arm's peak), ``max_memory_allocated`` on a GPU. Both arms
run with the allocator setting the batched pool makes on the CPU
(:func:`~sfedlora.runtime.batched.pool.keep_freed_memory`).

Each arm reports client-steps per second and tokens per second (positions the model
computes, padding included); on a GPU also the achieved FLOP/s, counted as 4 x (frozen
base parameters) per token (the forward, and the backward to the activations: the
base has no weight gradients), and its share of ``--peak-tflops``. The largest
difference between the two arms' uploads is printed as a check.

    python benchmarks/batched.py --workload minilm --ks 1,4,16,64 [--save FILE]
    python benchmarks/batched.py --report docs/results/batched/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sfedlora.config import load_config
from sfedlora.core import codecs
from sfedlora.core.environment import describe
from sfedlora.core.records import ClientState
from sfedlora.runtime.batched.pool import keep_freed_memory
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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def arm(sim: Simulation, k: int, downloads: dict[int, bytes], batched: bool,
        loaded: int = 0) -> dict:
    """One arm; its peak memory above ``loaded`` (the resident set with the model
    loaded, before any training) on the CPU, above the allocation at its start on a GPU."""
    exp = sim.pool.exp
    worker = exp.worker
    states = {cid: ClientState() for cid in range(k)}
    cuda = worker.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(worker.device)
        before = torch.cuda.memory_allocated(worker.device)
        torch.cuda.reset_peak_memory_stats(worker.device)
    else:
        before = loaded
    start = time.perf_counter()
    if batched:
        runs = [worker.start_fit(cid, states[cid], downloads[cid],
                                 exp.round_train(cid, 1), 1) for cid in range(k)]
        fits = BatchedTrainer(worker).train(runs)
    else:
        fits = [worker.fit(cid, states[cid], downloads[cid], exp.round_train(cid, 1), 1)
                for cid in range(k)]
    if cuda:
        torch.cuda.synchronize(worker.device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(worker.device) if cuda else _peak_rss()) - before
    steps, tokens = sum(f.steps for f in fits), sum(f.tokens for f in fits)
    return {"seconds": seconds, "client_steps": steps, "tokens": tokens,
            "client_steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds,
            "peak_bytes": max(peak, 0), "uploads": [f.upload for f in fits]}


def setup(workload: str, k: int, steps: int, overrides: list[str]):
    cfg = load_config(None, [*WORKLOADS[workload], f"clients.num={k}", f"local.steps={steps}",
                             "eval.every=0", "progress=false", "checkpoint.every=0",
                             *overrides])
    sim = Simulation(cfg)
    keep_freed_memory()
    downloads = {cid: sim.server.download(cid) for cid in range(k)}
    loaded = _rss()
    arm(sim, 1, downloads, batched=False)  # warm-up: first-call costs hit neither arm
    return cfg, sim, downloads, loaded


def child(workload: str, k: int, steps: int, overrides: list[str], batched: bool,
          out: Path) -> None:
    """One arm in this process; its row as JSON on stdout, its uploads to ``out``."""
    cfg, sim, downloads, loaded = setup(workload, k, steps, overrides)
    row = arm(sim, k, downloads, batched, loaded)
    tensors = {f"{cid}/{name}": t for cid, upload in enumerate(row.pop("uploads"))
               for name, t in codecs.decode(upload).items()}
    save_file(tensors, out)
    worker = sim.pool.exp.worker
    device = worker.device
    print(json.dumps({**row, "config": {
        "model": cfg.model_name, "batch_size": cfg.local.batch_size,
        "max_length": cfg.model.max_length, "steps": steps, "rank": cfg.lora.rank,
        "base_params": worker.base_params},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"}))


def spawn(workload: str, k: int, steps: int, overrides: list[str], batched: bool,
          out: Path) -> dict | str:
    """The arm's row, or why it has none (a process the kernel killed for memory)."""
    cmd = [sys.executable, __file__, "--workload", workload, "--child",
           "batched" if batched else "sequential", "--ks", str(k), "--steps", str(steps),
           "--uploads", str(out), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == -signal.SIGKILL:
        return "killed (out of memory)"
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def upload_gap(a: Path, b: Path) -> float:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    return max((ta[n] - tb[n]).abs().max().item() for n in ta)


def measure(workload: str, ks: list[int], steps: int, overrides: list[str],
            peak_tflops: float | None) -> dict:
    rows, meta = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, k in enumerate(ks):
            order = (False, True) if i % 2 == 0 else (True, False)
            result = {batched: spawn(workload, k, steps, overrides, batched,
                                     Path(tmp) / f"{k}-{batched}.safetensors")
                      for batched in order}
            seq, bat = result[False], result[True]
            if isinstance(seq, str) or isinstance(bat, str):
                rows.append({"K": k, "failed": {
                    "sequential": seq if isinstance(seq, str) else "ran",
                    "batched": bat if isinstance(bat, str) else "ran"}})
                print(_line(rows[-1]), flush=True)
                continue
            meta = {"config": seq.pop("config"), "device": seq.pop("device")}
            bat.pop("config"), bat.pop("device")
            row = {"K": k, "gap": upload_gap(Path(tmp) / f"{k}-False.safetensors",
                                             Path(tmp) / f"{k}-True.safetensors"),
                   "sequential": seq, "batched": bat,
                   "speedup": bat["client_steps_per_s"] / seq["client_steps_per_s"]}
            if not meta["device"].startswith("cpu"):
                for name in ("sequential", "batched"):
                    flops = 4 * meta["config"]["base_params"] * row[name]["tokens_per_s"]
                    row[name]["tflops"] = flops / 1e12
                    if peak_tflops:
                        row[name]["utilisation"] = flops / 1e12 / peak_tflops
            rows.append(row)
            print(_line(row), flush=True)
    return {"workload": workload, "command": _command(workload, ks, steps, overrides),
            **meta, "rows": rows, "environment": describe()}


def _command(workload: str, ks: list[int], steps: int, overrides: list[str]) -> str:
    return " ".join(["python benchmarks/batched.py", f"--workload {workload}",
                     f"--ks {','.join(map(str, ks))}", f"--steps {steps}", *overrides])


HEADER = ("| K | sequential client-steps/s | batched client-steps/s | speedup | "
          "sequential tokens/s | batched tokens/s | sequential peak MiB | batched peak MiB |")


def _line(row: dict) -> str:
    if "failed" in row:
        failed = row["failed"]
        return f"| {row['K']} | {failed['sequential']} | {failed['batched']} |" + " |" * 5
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
                f"{max(row['gap'] for row in saved['rows'] if 'gap' in row):.1e}.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--ks", default="1,4,16,64", help="client counts, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for utilisation")
    parser.add_argument("--save", type=Path, help="write the rows and environment as JSON")
    parser.add_argument("--report", type=Path, nargs="+", help="print saved runs as tables")
    parser.add_argument("--child", choices=["sequential", "batched"], help=argparse.SUPPRESS)
    parser.add_argument("--uploads", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings")
    args = parser.parse_args()
    if args.child:
        import transformers

        transformers.logging.set_verbosity_error()
        child(args.workload, int(args.ks), args.steps, args.overrides,
              args.child == "batched", args.uploads)
        return
    if args.report:
        print(report(args.report))
        return
    print(HEADER)
    saved = measure(args.workload, [int(k) for k in args.ks.split(",")], args.steps,
                    args.overrides, args.peak_tflops)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
