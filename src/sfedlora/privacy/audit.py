"""An empirical lower bound on the epsilon of a DP run, from one run (client level).

After Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS
2023): m canary clients are each included with probability 1/2 (from OS entropy); each
included canary sends a recognisable change (a direction of its own, at the clip norm).
After the run the auditor scores every canary from what the server released, guesses
"included" for the highest scores and "excluded" for the lowest (abstaining on the
rest), and counts its correct guesses. If the run is epsilon-DP towards each canary,
the number correct among r guesses is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) (their Theorem 3.1 at delta = 0), so an epsilon whose
binomial tail at the observed count is below beta is refuted: the largest such epsilon
is a lower bound with confidence 1 - beta. The auditor fixes its guess counts before
the run and pays for trying several with a Bonferroni split of beta.

The delta = 0 form is used: with delta > 0 the paper's bound adds a term of order
m * delta to the tail, which at delta = 1e-5 and a few thousand canaries moves the 5%
level by a few hundredths; the bounds below are read against that (docs/reliability.md).

Written here: no maintained library implements the one-run audit (the audit papers'
own code targets their training loops); the binomial tail is scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


def epsilon_lower_bound(guesses: int, correct: int, beta: float = 0.05) -> float:
    """The largest epsilon at which ``correct`` or more right answers out of ``guesses``
    has probability at most ``beta`` under Binomial(guesses, e^eps / (1 + e^eps));
    0 when even eps = 0 (coin flips) explains the count."""
    if guesses <= 0 or correct <= 0:
        return 0.0

    def tail(eps: float) -> float:
        return float(binom.sf(correct - 1, guesses, 1.0 / (1.0 + math.exp(-eps))))

    if tail(0.0) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while tail(high) <= beta and high < 60:
        low, high = high, 2 * high
    for _ in range(60):  # bisection: tail rises with eps
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) <= beta else (low, mid)
    return low


@dataclass(frozen=True)
class Guess:
    """One of the auditor's pre-declared strategies: guess "included" for the ``top``
    highest scores and "excluded" for the ``bottom`` lowest."""

    top: int
    bottom: int


def guess_grid(canaries: int, fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.25)
               ) -> list[Guess]:
    """One-sided (top only: a canary that never took part scores like an excluded
    one, so "excluded" guesses are the weaker side) and two-sided strategies, each
    guessing on a fraction of the canaries."""
    grid = []
    for f in fractions:
        k = max(1, int(f * canaries))
        grid += [Guess(k, 0), Guess(k // 2, k // 2)]
    return grid


@dataclass(frozen=True)
class AuditResult:
    epsilon_lb: float
    guesses: int
    correct: int
    strategy: Guess


def audit(scores: np.ndarray, included: np.ndarray, grid: Sequence[Guess],
          beta: float = 0.05) -> AuditResult:
    """The best lower bound over the pre-declared ``grid`` (Bonferroni: each strategy
    is tested at ``beta / len(grid)``), from each canary's score and whether it was
    really included."""
    order = np.argsort(-scores, kind="stable")
    best = AuditResult(0.0, 0, 0, grid[0])
    for g in grid:
        plus, minus = order[:g.top], order[len(order) - g.bottom:] if g.bottom else order[:0]
        correct = int(included[plus].sum() + (~included[minus]).sum())
        bound = epsilon_lower_bound(g.top + g.bottom, correct, beta / len(grid))
        if bound > best.epsilon_lb:
            best = AuditResult(bound, g.top + g.bottom, correct, g)
    return best
