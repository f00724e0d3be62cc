"""Where a deployment's CPU goes: every process on the machine, grouped by what it is.

Runs a command (for example ``sfedlora deploy-local ...``) and samples the CPU time of
every process on the machine every ``--every`` seconds until it exits, then reports the
CPU seconds each kind of process (the nodes' runtimes, serving processes (``--serve``)
and their supervisors, or the nodes' workers and Flower's per-message ClientApp
processes, SuperNodes, SuperExecs, the SuperLink, ``flwr`` CLI calls, ...) used during
chosen rounds of the run, read from its ``timings.jsonl``. A process's CPU time between
two samples is spread evenly over that interval; a process born between samples counts
from zero. Short-lived processes that start and end between two samples are missed,
so ``--every`` should be well under a second.

    python benchmarks/process_cpu.py --save FILE --run-dir RUN_DIR -- COMMAND ...
    python benchmarks/process_cpu.py --report FILE [--rounds 2-3]
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil

# what a process is, by the first of these its command line contains
KINDS = ("node_runtime --serve", "node_runtime", "node_worker", "flwr-clientapp",
         "flower-superexec", "flower-supernode",
         "flower-superlink", "flwr-serverapp", "flwr ", "sfedlora deploy-local")


def kind(cmdline: list[str]) -> str:
    text = " ".join(Path(part).name if i == 0 or part.startswith("/") else part
                    for i, part in enumerate(cmdline))
    return next((k.strip() for k in KINDS if k in text), "other")


def sample(command: list[str], every: float) -> dict[str, dict]:
    """Run ``command``; per process seen: its kind, birth, and its first and last
    (time, CPU seconds) samples."""
    me = psutil.Process().pid
    seen: dict[str, dict] = {}
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        now = time.time()
        for p in psutil.process_iter():
            try:
                if p.pid == me:
                    continue
                times = p.cpu_times()
                cpu = times.user + times.system
                key = f"{p.pid}@{p.create_time()}"  # a pid may be reused
                if key not in seen:
                    seen[key] = {"kind": kind(p.cmdline()), "born": p.create_time(),
                                 "first": [now, cpu]}
                seen[key]["last"] = [now, cpu]
            except (psutil.Error, OSError):
                continue
        time.sleep(every)
    if proc.returncode:
        sys.exit(f"the command failed ({proc.returncode})")
    return seen


def cpu_by_kind(seen: dict, start: float, end: float) -> dict[str, tuple[float, int]]:
    """CPU seconds and process count per kind within [start, end]."""
    cpu, count = collections.Counter(), collections.Counter()
    for entry in seen.values():
        (t0, c0), (t1, c1) = entry["first"], entry["last"]
        if entry["born"] >= t0 - 1.0:  # born under observation: from zero at birth
            t0, c0 = entry["born"], 0.0
        low, high = max(t0, start), min(t1, end)
        if t1 <= t0 or high <= low:
            continue
        cpu[entry["kind"]] += (c1 - c0) * (high - low) / (t1 - t0)
        count[entry["kind"]] += 1
    return {k: (v, count[k]) for k, v in cpu.most_common()}


def report(saved: dict, rounds: tuple[int, int]) -> str:
    timings = {t["round"]: t for t in saved["timings"]}
    start, end = timings[rounds[0]]["started_at"], timings[rounds[1]]["ended_at"]
    rows = cpu_by_kind(saved["processes"], start, end)
    total = sum(v for v, _ in rows.values())
    lines = [f"rounds {rounds[0]}-{rounds[1]}: {end - start:.1f} s of wall time, "
             f"{total:.1f} CPU s ({total / (end - start):.2f} cores busy)", "",
             "| process | CPU s | share | processes |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / total:.0%} | {n} |" for k, (v, n) in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", type=Path, help="write the samples and timings as JSON")
    parser.add_argument("--run-dir", type=Path, help="the command's run directory")
    parser.add_argument("--every", type=float, default=0.3)
    parser.add_argument("--report", type=Path, help="print a saved file's table")
    parser.add_argument("--rounds", default="2-3", help="first-last round to count")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args()
    rounds = tuple(int(r) for r in args.rounds.split("-"))
    if args.report:
        print(report(json.loads(args.report.read_text()), rounds))
        return
    if not (args.command and args.save and args.run_dir):
        parser.error("give --save, --run-dir and the command after --")
    seen = sample(args.command, args.every)
    timings = [json.loads(line) for line in (args.run_dir / "timings.jsonl").open()]
    saved = {"command": "python benchmarks/process_cpu.py " + shlex.join(sys.argv[1:]),
             "timings": timings, "processes": seen}
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text(json.dumps(saved))
    print(report(saved, rounds))


if __name__ == "__main__":
    main()
