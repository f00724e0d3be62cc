"""TSFA's online stage as pure functions: the Lyapunov drift-plus-penalty choice of the
round's keep ratio and the virtual queue that enforces the latency budget on average.

After Kim and Choi (arXiv 2505.00333); details reconstructed from the abstract. Round t
chooses the keep ratio rho from ``options.keep_choices`` that minimises

    V * E_t(rho) + Q_t * T_t(rho, b*(rho))

where E_t(rho) is the share of importance mass a client would drop keeping only its top
ceil(rho r) components (from the importance profiles reported last round), T_t is the
round's latency with this round's channels, and b*(rho) the bandwidth split that
equalises the clients' finish times. E does not depend on the split, and for a given
rho that split minimises T, so minimising over (rho, b) jointly is minimising over rho
with b = b*(rho): the joint choice needs no search over splits. Then

    Q_{t+1} = max(0, Q_t + T_t - options.latency_budget_s)

with T_t the round's realised latency. A large Q (rounds have run over budget) weighs
latency more; a large V weighs accuracy (kept importance) more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def dropped_share(profile: Sequence[float], keep: float) -> float:
    """The share of one layer's importance mass outside its top ceil(keep r) components
    (0 for a layer without any)."""
    scores = sorted((float(s) for s in profile), reverse=True)
    total = sum(scores)
    if total <= 0:
        return 0.0
    return sum(scores[math.ceil(keep * len(scores)):]) / total


def mean_dropped_share(profiles: Sequence[Sequence[float]], keep: float) -> float:
    """E(keep): :func:`dropped_share` averaged over profiles (every reporting client's
    every layer, equally)."""
    if not profiles:
        return 0.0
    return sum(dropped_share(p, keep) for p in profiles) / len(profiles)


def drift_plus_penalty(choices: Sequence[float], dropped: Callable[[float], float],
                       latency: Callable[[float], float], v: float, queue: float
                       ) -> tuple[float, dict[float, float]]:
    """The choice minimising ``v * dropped(rho) + queue * latency(rho)`` (ties: the
    larger keep ratio) and every choice's objective."""
    objective = {rho: v * dropped(rho) + queue * latency(rho) for rho in choices}
    best = min(sorted(choices, reverse=True), key=lambda rho: objective[rho])
    return best, objective


def next_queue(queue: float, latency_s: float, budget_s: float) -> float:
    """Q_{t+1} = max(0, Q_t + T_t - budget)."""
    return max(0.0, queue + latency_s - budget_s)


def upload_values(keep: float, layers: Sequence[tuple[int, int]], always: int) -> int:
    """Numbers a SOFT upload carries at ``keep``: per layer (rank r, component size
    d_in + d_out) ceil(keep r) whole components, plus what always goes whole (the
    head)."""
    return always + sum(math.ceil(keep * r) * size for r, size in layers)
