"""The tuned studies' learning-rate ladder (benchmarks/methods.py, reused by the
wireless and compression studies): extension at an end, and reruns that keep it."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import import_benchmark


@pytest.fixture
def study(monkeypatch):
    """benchmarks/methods.py with a sweep that records each grid and finishes every
    rung at once, its validation loss ``args.loss(lr)``."""
    methods = import_benchmark("methods")
    rows: list[dict] = []
    grids: list[list[float]] = []

    def sweep(args, arm, stage, grid):  # finishes every rung at once
        rates = [float(x) for x in grid[0].split("=", 1)[1].split(",")]
        grids.append(rates)
        known = {r["lr"] for r in rows}
        rows.extend({"lr": lr, "val_loss": args.loss(lr)} for lr in rates if lr not in known)
        return True

    monkeypatch.setattr(methods, "sweep", sweep)
    monkeypatch.setattr(methods, "_ladder_results", lambda args, arm: list(rows))
    return methods, grids


def test_a_best_rate_at_the_low_end_extends_the_ladder_down(study):
    methods, grids = study
    args = argparse.Namespace(max_extend=2, loss=lambda lr: abs(lr - 6e-4))
    assert methods.ladder(args, "arm")
    # 5e-4 is best at the low end, so one more rung below; then it is inside
    assert grids == [[2e-3, 8e-3, 3.2e-2], [5e-4, 2e-3, 8e-3, 3.2e-2],
                     [1.25e-4, 5e-4, 2e-3, 8e-3, 3.2e-2]]


def test_the_ladder_adds_at_most_max_extend_rungs(study):
    methods, grids = study
    args = argparse.Namespace(max_extend=1, loss=lambda lr: lr)  # lower is always better
    assert methods.ladder(args, "arm")
    assert grids == [[2e-3, 8e-3, 3.2e-2], [5e-4, 2e-3, 8e-3, 3.2e-2]]


def test_a_rerun_of_an_extended_ladder_sweeps_every_rung_it_has(study):
    methods, grids = study
    args = argparse.Namespace(max_extend=1, loss=lambda lr: lr)
    methods.ladder(args, "arm")
    grids.clear()
    # the best is still at the low end, but the extension is spent: one sweep of every
    # rung (the tables are written from this grid) and no new rung
    assert methods.ladder(args, "arm")
    assert grids == [[5e-4, 2e-3, 8e-3, 3.2e-2]]
