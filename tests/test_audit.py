"""The one-run audit's lower bound (sfedlora.privacy.audit) against its closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sfedlora.privacy.audit import Guess, audit, epsilon_lower_bound, guess_grid


@pytest.mark.parametrize("guesses", [10, 100, 1000])
def test_all_correct_gives_the_closed_form(guesses):
    """With every guess right the tail is p^r, so the bound is logit(beta^(1/r))."""
    p = 0.05 ** (1 / guesses)
    assert epsilon_lower_bound(guesses, guesses) == pytest.approx(math.log(p / (1 - p)),
                                                                  rel=1e-9)


def test_coin_flip_accuracy_bounds_nothing():
    assert epsilon_lower_bound(1000, 500) == 0.0
    assert epsilon_lower_bound(1000, 520) == 0.0  # within chance at 95%
    assert epsilon_lower_bound(0, 0) == 0.0


def test_the_bound_is_exactly_at_the_binomial_tail_level():
    from scipy.stats import binom

    eps = epsilon_lower_bound(400, 330)
    p = 1 / (1 + math.exp(-eps))
    assert binom.sf(329, 400, p) == pytest.approx(0.05, rel=1e-6)


def test_audit_uses_the_bonferroni_level_and_the_best_strategy():
    scores = np.arange(100.0)[::-1]  # canary 0 scores highest
    included = np.arange(100) < 50  # and the top half was included
    grid = [Guess(10, 0), Guess(25, 25)]
    result = audit(scores, included, grid)
    assert result.correct == result.guesses == 50
    assert result.epsilon_lb == epsilon_lower_bound(50, 50, 0.05 / 2)
    assert len(guess_grid(4000)) == 10
