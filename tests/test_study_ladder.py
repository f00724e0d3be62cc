"""The tuned studies' learning-rate ladder (sfedlora.studies.tuning, which
benchmarks/methods.py, wireless.py and compression.py run): extension at an end,
reruns that keep it, and the check of the choice against more than one evaluation.
The sweep runner is the library's own parameter: here one that finishes every rung at
once by writing the run files the ladder reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sfedlora.studies.tuning import Study, Tuning

CONFIG = Path(__file__).parents[1] / "configs/wireless_sst2.yaml"


def _ladder_run(runs: Path, lr: float, val_losses: list[float], seed: int = 0) -> None:
    """A finished ladder run at ``lr`` whose evaluations log ``val_losses``."""
    run = runs / f"local.lr-{lr}__seed-{seed}"
    run.mkdir(parents=True)
    config = yaml.safe_load(CONFIG.read_text())
    config["local"]["lr"], config["seed"] = lr, seed
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"round": r + 1, "personalized_val_loss": v} for r, v in enumerate(val_losses)]
    rows.append({"round": len(rows) + 1})  # a round without an evaluation
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"personalized_val_loss": val_losses[-1]}))


def _tuning(out: Path, loss=None, max_extend: int = 2) -> tuple[Tuning, list[list[float]]]:
    """A study of one arm whose runner records each grid and finishes every new rung
    at once, with final validation loss ``loss(lr)``."""
    grids: list[list[float]] = []

    def runner(config, grid, folder, overrides, shard, on_start):
        rates = [float(x) for x in grid["local.lr"]]
        grids.append(rates)
        for lr in rates:
            for seed in grid["seed"]:
                if not (folder / "runs" / f"local.lr-{lr}__seed-{seed}").exists():
                    _ladder_run(folder / "runs", lr, [loss(lr)], int(seed))
        return True

    study = Study({"arm": ["method=fedit"]}, {"sst2": str(CONFIG)}, {"cpu": ()})
    return Tuning(study, "sst2", "cpu", out, max_extend=max_extend, runner=runner), grids


def test_a_best_rate_at_the_low_end_extends_the_ladder_down(tmp_path):
    tuning, grids = _tuning(tmp_path, loss=lambda lr: abs(lr - 6e-4))
    assert tuning.ladder("arm")
    # 5e-4 is best at the low end, so one more rung below; then it is inside
    assert grids == [[2e-3, 8e-3, 3.2e-2], [5e-4, 2e-3, 8e-3, 3.2e-2],
                     [1.25e-4, 5e-4, 2e-3, 8e-3, 3.2e-2]]
    assert tuning.chosen_rate("arm") == 5e-4


def test_the_ladder_adds_at_most_max_extend_rungs(tmp_path):
    tuning, grids = _tuning(tmp_path, loss=lambda lr: lr, max_extend=1)  # lower: better
    assert tuning.ladder("arm")
    assert grids == [[2e-3, 8e-3, 3.2e-2], [5e-4, 2e-3, 8e-3, 3.2e-2]]


def test_a_rerun_of_an_extended_ladder_sweeps_every_rung_it_has(tmp_path):
    tuning, grids = _tuning(tmp_path, loss=lambda lr: lr, max_extend=1)
    tuning.ladder("arm")
    grids.clear()
    # the best is still at the low end, but the extension is spent: one sweep of every
    # rung (the tables are written from this grid) and no new rung
    assert tuning.ladder("arm")
    assert grids == [[5e-4, 2e-3, 8e-3, 3.2e-2]]


def test_the_seeds_stage_runs_the_chosen_rate_and_the_chosen_runs_follow(tmp_path):
    tuning, grids = _tuning(tmp_path, loss=lambda lr: abs(lr - 8e-3))
    assert tuning.ladder("arm") and tuning.seeds("arm")
    assert grids[-1] == [8e-3]
    chosen = tuning.chosen_runs("arm")
    assert [p.name for p in chosen] == ["local.lr-0.008__seed-0", "local.lr-0.008__seed-1",
                                        "local.lr-0.008__seed-2"]
    assert [p.parent.parent.name for p in chosen] == ["ladder", "seeds", "seeds"]
    assert sorted(tuning.chosen_by_seed("arm")) == [0, 1, 2]


def test_the_recent_evaluations_check_averages_each_runs_last_losses(tmp_path):
    tuning, _ = _tuning(tmp_path)
    runs = tuning.arm_dir("arm") / "ladder" / "runs"
    # 1e-3 ends lowest on a dip; 4e-3 is lower over its last three evaluations, and
    # the first evaluation (5.0) is outside the three
    _ladder_run(runs, 1e-3, [5.0, 0.9, 0.9, 0.3])
    _ladder_run(runs, 4e-3, [5.0, 0.4, 0.4, 0.41])
    assert tuning.chosen_rate("arm") == 1e-3  # the study's rule: the last loss
    assert tuning.rate_on_recent_evaluations("arm", count=3) == 4e-3
    assert tuning.rate_on_recent_evaluations("arm", count=1) == 1e-3
    assert tuning.rate_on_recent_evaluations("other-arm") is None
    assert tuning.chosen_rate("other-arm") is None


def test_a_run_on_needs_a_tuned_arm(tmp_path):
    tuning, _ = _tuning(tmp_path)
    with pytest.raises(SystemExit, match="tune it first"):
        tuning.run_on("arm", "longer", ("rounds=20",))
