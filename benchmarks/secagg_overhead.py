"""What secure aggregation costs per round: time and bytes, with and without it.

Two simulations of one experiment (``configs/sst2_communication.yaml``: SST-2,
all-MiniLM-L6-v2 with r = 8, 10 clients, every client every round, FedIT by default),
one plain and one with ``privacy.secure_aggregation=true``, run in one process with
their rounds interleaved (plain round r, then secure round r), so both see the same
machine load. Per round: the wall time of the whole round (training, the protocol's
four exchanges, aggregation) and the bytes up and down, as serialised (the masked
vector, keys, encrypted shares, revealed shares, client lists). Prints the table and
the ratios that ``docs/reliability.md`` records.

    python benchmarks/secagg_overhead.py [--rounds 3] [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from sfedlora.config import load_config
from sfedlora.runtime.simulation import Simulation

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/sst2_communication.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for both arms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sims, out = {}, tempfile.mkdtemp(prefix="secagg-overhead-")
    for arm, extra in (("plain", []), ("secure", ["privacy.secure_aggregation=true"])):
        cfg = load_config(args.config, [f"rounds={args.rounds}", "progress=false",
                                        f"output_dir={out}/{arm}", *args.overrides, *extra])
        sims[arm] = Simulation(cfg)
    seconds = {arm: [] for arm in sims}
    up = {arm: [] for arm in sims}
    down = {arm: [] for arm in sims}
    for r in range(1, args.rounds + 1):
        for arm, sim in sims.items():
            t0 = time.perf_counter()
            metrics = sim.run_round(r).metrics
            seconds[arm].append(time.perf_counter() - t0)
            up[arm].append(metrics["bytes_up"])
            down[arm].append(metrics["bytes_down"])
            assert metrics["aggregated"], (arm, r)
    cfg = sims["secure"].cfg
    print(f"{cfg.method}, {cfg.clients.num} clients, rank {cfg.lora.rank}, "
          f"{args.rounds} rounds each, interleaved; model {cfg.model.name}")
    # the first round of each arm pays one-off costs (allocations, caches): steady
    # figures are over the later rounds
    steady = {arm: s[1:] or s for arm, s in seconds.items()}
    print("| arm | steady s/round | s/round (each) | MB up/round | MB down/round |")
    print("|---|---|---|---|---|")
    for arm in sims:
        print(f"| {arm} | {statistics.mean(steady[arm]):.2f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds[arm])} | "
              f"{statistics.mean(up[arm]) / 1e6:.4f} | {statistics.mean(down[arm]) / 1e6:.4f} |")
    ratio = {key: statistics.mean(vals["secure"]) / statistics.mean(vals["plain"])
             for key, vals in (("time", steady), ("up", up), ("down", down))}
    total = (sum(up["secure"]) + sum(down["secure"])) / (sum(up["plain"]) + sum(down["plain"]))
    print(f"secure / plain: steady time {ratio['time']:.3f}x, bytes up {ratio['up']:.4f}x, "
          f"bytes down {ratio['down']:.4f}x, bytes total {total:.4f}x "
          f"(targets: time <= 1.2x, bytes <= 1.3x)")
    print(f"quantisation bound (|secure - plain mean| per coordinate): "
          f"{sims['secure'].uploads.error_bound(cfg.clients_per_round):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
