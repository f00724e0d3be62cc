"""Local work: step/epoch batching and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sfedlora.modeling.model import steps_per_round, train_batches
from sfedlora.runtime.worker import lr_factor
from sfedlora.tasks.classification import Encoded

DATA = Encoded([[1, 2]] * 10, np.zeros(10, dtype=np.int64))


def test_steps_walk_permutations_without_repeats_within_a_pass():
    batches = list(train_batches(DATA, batch_size=4, num_steps=4, epochs=None, seed=0))
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert len(set(np.concatenate(batches[:2]).tolist())) == 8  # one pass: no repeats
    again = list(train_batches(DATA, batch_size=4, num_steps=4, epochs=None, seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_epochs_cover_every_example_once_per_pass():
    batches = list(train_batches(DATA, batch_size=4, num_steps=None, epochs=2, seed=1))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    first = np.concatenate(batches[:3])
    assert sorted(first.tolist()) == list(range(10))
    assert steps_per_round(10, 4, None, 2) == 6 and steps_per_round(10, 4, 7, None) == 7


def test_fewer_examples_than_a_batch_uses_them_all():
    small = Encoded([[1]] * 3, np.zeros(3, dtype=np.int64))
    batches = list(train_batches(small, batch_size=8, num_steps=2, epochs=None, seed=0))
    assert [sorted(b.tolist()) for b in batches] == [[0, 1, 2]] * 2


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("constant", 50, 1.0), ("linear", 25, 0.75), ("cosine", 50, 0.5),
     ("cosine", 0, 1.0), ("cosine", 100, 0.0), ("linear", 100, 0.0)],
)
def test_lr_schedule(schedule, step, expected):
    assert lr_factor(schedule, step, 100) == pytest.approx(expected, abs=1e-12)
    assert math.isfinite(lr_factor(schedule, step, 0))


def test_epochs_mode_runs_end_to_end(tiny_config):
    from sfedlora.runtime.simulation import Simulation

    sim = Simulation(tiny_config("local.steps=null", "local.epochs=1", "rounds=1"))
    rec = sim.run_round(1).metrics
    assert rec["train_loss"] > 0


def test_the_learning_rate_schedule_runs_over_all_rounds_not_each_round(tiny_config):
    """Cosine over 3 rounds of 2 steps: the learning rate of the optimizer step s
    (0..5, counted across rounds) is lr * (1 + cos(pi s / 6)) / 2, written out here; a
    schedule that restarted every round would repeat round 1's two values."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from sfedlora.runtime.simulation import Simulation

    sim = Simulation(tiny_config("method=fedit", "clients.num=2", "rounds=3",
                                 "local.steps=2", "local.lr=0.01", "local.schedule=cosine"))
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        for r in (1, 2, 3):
            sim.run_round(r)
    finally:
        handle.remove()
    per_client = [0.01 * (1 + math.cos(math.pi * s / 6)) / 2 for s in range(6)]
    expected = [lr for r in range(3) for _ in range(2)
                for lr in per_client[2 * r: 2 * r + 2]]  # each round: client 0, client 1
    assert seen == pytest.approx(expected, rel=1e-12)
