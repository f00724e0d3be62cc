"""The tuned studies' learning-rate ladder (benchmarks/methods.py, reused by the
wireless and compression studies): extension at an end, reruns that keep it, and the
check of the choice against more than one evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

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


def _ladder_run(study: Path, lr: float, val_losses: list[float]) -> None:
    """A finished seed-0 ladder run at ``lr`` whose evaluations log ``val_losses``."""
    run = study / "sst2-cpu/arm/ladder/runs" / f"local.lr-{lr}__seed-0"
    run.mkdir(parents=True)
    config = yaml.safe_load((Path(__file__).parents[1] / "configs/wireless_sst2.yaml")
                            .read_text())
    config["local"]["lr"] = lr
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"round": r + 1, "personalized_val_loss": v} for r, v in enumerate(val_losses)]
    rows.append({"round": len(rows) + 1})  # a round without an evaluation
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"personalized_val_loss": val_losses[-1]}))


def test_the_recent_evaluations_check_averages_each_runs_last_losses(tmp_path):
    methods = import_benchmark("methods")
    args = argparse.Namespace(out=str(tmp_path), dataset="sst2", size="cpu")
    # 1e-3 ends lowest on a dip; 4e-3 is lower over its last three evaluations, and
    # the first evaluation (5.0) is outside the three
    _ladder_run(tmp_path, 1e-3, [5.0, 0.9, 0.9, 0.3])
    _ladder_run(tmp_path, 4e-3, [5.0, 0.4, 0.4, 0.41])
    assert methods.chosen_rate(args, "arm") == 1e-3  # the study's rule: the last loss
    assert methods.rate_on_recent_evaluations(args, "arm", count=3) == 4e-3
    assert methods.rate_on_recent_evaluations(args, "arm", count=1) == 1e-3
    assert methods.rate_on_recent_evaluations(args, "other-arm") is None
    assert methods.chosen_rate(args, "other-arm") is None
