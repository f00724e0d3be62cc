"""Cross-device scale: memory and round time from 10 to 10,000 clients (issue 19).

SFed-LoRA (a private B and head per client) on the full SST-2 training file,
all-MiniLM-L6-v2, 10 clients per round whatever N is (``configs/scale_sst2.yaml``), for
each N in-process (``sfedlora run``) and on Flower's simulation engine (``sfedlora
flower-sim``): ``flower`` with one virtual SuperNode per client, ``flower-pooled`` with
10 (``flower.virtual_nodes``; each serves whichever client a message names, so the
engine polls 10 nodes instead of N). Each (runtime, N) runs in a fresh
process tree, sampled every 0.2 s for its peak resident memory, summed over the whole
tree (Ray's workers included, so shared libraries count once per process). Steady
s/round is the median over the rounds after the first of a round's training and
aggregation (``timings.jsonl``; the evaluation after the last round is left out); start-up is
from launch to the start of round 1 (loading, tokenising, partitioning, Ray). Prints both
runtimes side by side and each N's ratios to the smallest N, the figures
``docs/results/scale.md`` records. Every (runtime, N) runs ``--repeats`` times (2),
interleaved, so a slow spell of a shared machine hits every N alike.

    python benchmarks/scale.py [--clients 10 1000 10000] [--runtimes inprocess flower flower-pooled]
                               [--workers 2] [--repeats 2] [--save ROWS.json] [dotted.key=value ...]
    python benchmarks/scale.py --report docs/results/scale/rows.json   # reprint, no runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from sfedlora.studies import runs as run_files

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/scale_sst2.yaml"
TARGETS = {"rss": 1.5, "round": 1.10}  # at the largest N, relative to the smallest


RUNTIMES = {  # name: (sfedlora command, extra overrides)
    "inprocess": ("run", []),
    "flower": ("flower-sim", []),  # one virtual SuperNode per client
    # as many virtual SuperNodes as clients per round, each serving any client
    "flower-pooled": ("flower-sim", ["flower.virtual_nodes=10"]),
}


def command(runtime: str, config: str, overrides: list[str], workers: int) -> list[str]:
    verb, extra = RUNTIMES[runtime]
    cli = [sys.executable, "-m", "sfedlora", verb, config, *overrides, *extra]
    return cli if verb == "run" else [*cli, "--workers", str(workers)]


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
    return total


def measure(runtime: str, n: int, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / f"{runtime}-{n}"
    overrides = [f"clients.num={n}", f"output_dir={run_dir}", "progress=false",
                 *args.overrides]
    log = out / f"{runtime}-{n}.log"
    launched = time.time()
    with log.open("w") as sink:
        proc = subprocess.Popen(command(runtime, args.config, overrides, args.workers),
                                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{runtime} N={n} failed:\n{log.read_text()[-3000:]}")
    rounds = run_files.timings(run_dir)
    # a round's training and aggregation; the last round's evaluation is left out
    seconds = [r["train"] + r["aggregate"] for r in rounds]
    return {"runtime": runtime, "clients": n, "peak_rss_mb": peak / 2**20,
            "round_s": statistics.median(seconds[1:] or seconds),
            "startup_s": rounds[0]["started_at"] - launched,
            "total_s": time.time() - launched}


def machine() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(), "torch": torch.__version__}


def combine(rows: list[dict]) -> list[dict]:
    """One row per (runtime, N) over its repeats: the median steady s/round and
    start-up, the largest peak RSS."""
    out = []
    for key in dict.fromkeys((r["runtime"], r["clients"]) for r in rows):
        mine = [r for r in rows if (r["runtime"], r["clients"]) == key]
        out.append({"runtime": key[0], "clients": key[1], "repeats": len(mine),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                    "round_s": statistics.median(r["round_s"] for r in mine),
                    "round_s_each": [round(r["round_s"], 3) for r in mine],
                    "startup_s": statistics.median(r["startup_s"] for r in mine)})
    return out


def report(rows: list[dict]) -> str:
    rows = combine(rows)
    lines = ["| runtime | clients | peak RSS (MB) | RSS / N=min | steady s/round (each "
             "repeat) | s/round / N=min | start-up (s) |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        mine = sorted((r for r in rows if r["runtime"] == runtime), key=lambda r: r["clients"])
        base = mine[0]
        for r in mine:
            rss, rnd = r["peak_rss_mb"] / base["peak_rss_mb"], r["round_s"] / base["round_s"]
            each = ", ".join(f"{x:.2f}" for x in r["round_s_each"])
            lines.append(f"| {runtime} | {r['clients']:,} | {r['peak_rss_mb']:.0f} | "
                         f"{rss:.2f}x | {r['round_s']:.2f} ({each}) | {rnd:.2f}x | "
                         f"{r['startup_s']:.1f} |")
        top = mine[-1]
        rss = top["peak_rss_mb"] / base["peak_rss_mb"]
        rnd = top["round_s"] / base["round_s"]
        verdicts.append(
            f"{runtime}: N={top['clients']:,} vs N={base['clients']:,}: RSS {rss:.2f}x "
            f"(target <= {TARGETS['rss']}x: {'met' if rss <= TARGETS['rss'] else 'MISSED'}), "
            f"s/round {rnd:.2f}x (target <= {TARGETS['round']}x: "
            f"{'met' if rnd <= TARGETS['round'] else 'MISSED'})")
    return "\n".join([*lines, "", *verdicts])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES),
                        default=list(RUNTIMES))
    parser.add_argument("--workers", type=int, default=2,
                        help="Flower simulation workers (one model each)")
    parser.add_argument("--repeats", type=int, default=2, help="measure every (runtime, "
                        "N) this many times, interleaved; the tables take the median round "
                        "time and the largest peak")
    parser.add_argument("--save", type=Path, help="write the measured rows (JSON) here")
    parser.add_argument("--report", type=Path, help="print the tables of saved rows; run "
                        "nothing")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())["rows"]))
        return 0
    out = Path(tempfile.mkdtemp(prefix="scale-"))
    rows = []
    for repeat in range(args.repeats):  # interleaved, so a slow spell hits every N
        for runtime in args.runtimes:
            for n in args.clients:
                rows.append({"repeat": repeat,
                             **measure(runtime, n, args, out / f"repeat-{repeat}")})
                print(json.dumps(rows[-1]), flush=True)
            if args.save:  # after every run, so a long benchmark keeps what it measured
                args.save.parent.mkdir(parents=True, exist_ok=True)
                args.save.write_text(json.dumps(
                    {"command": " ".join(["python", "benchmarks/scale.py",
                                          *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine(), "rows": rows}, indent=1) + "\n")
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
