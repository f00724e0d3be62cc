"""What SOFT's importance rules cost a client per round, side by side (issue 18).

A client scores every adapted layer's rank components once per round: ``norms``
(||B[:, i]|| ||A[i, :]||) or ``svd`` (each component's size inside the best
rank-ceil(keep r) approximation of BA, one SVD per layer). This times both on the
wireless study's adapter (all-MiniLM-L6-v2: 6 layers x query and value, r = 8,
d = 384) in one process, interleaved, so machine load hits both alike; the wireless
study's per-client training seconds are too noisy (processes shared the cores) to
tell them apart.

    python benchmarks/importance_cost.py [--rank 8] [--dim 384] [--layers 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sfedlora.methods.soft.components import IMPORTANCE


def one_round(rule: str, factors: list[tuple[torch.Tensor, torch.Tensor]], keep: float
              ) -> float:
    start = time.perf_counter()
    for a, b in factors:
        IMPORTANCE[rule](a, b, keep)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    factors = [(torch.randn(args.rank, args.dim, generator=gen),
                torch.randn(args.dim, args.rank, generator=gen)) for _ in range(args.layers)]
    times: dict[str, list[float]] = {rule: [] for rule in IMPORTANCE}
    for _ in range(args.repeats):
        for rule in IMPORTANCE:  # interleaved
            times[rule].append(one_round(rule, factors, args.keep))
    print(f"{args.layers} layers, A {args.rank}x{args.dim}, B {args.dim}x{args.rank}, "
          f"keep {args.keep}, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} torch threads")
    for rule, values in times.items():
        print(f"{rule}: median {statistics.median(values) * 1e3:.3f} ms per client round")
    ratio = statistics.median(times["svd"]) / statistics.median(times["norms"])
    print(f"svd / norms: {ratio:.1f}x")


if __name__ == "__main__":
    main()
