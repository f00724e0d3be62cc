"""A study checks that every run of its plan can start before it starts any
(sfedlora.studies.preflight): a setting the config refuses, or clients that cannot be
drawn, stop the study at once with the arm, the seeds and the cause, instead of
failing each run hours in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sfedlora.cli import main
from sfedlora.studies.plan import Plan
from sfedlora.studies.preflight import check, rungs

SEEDS = {"selection_seeds": [100], "reporting_seeds": [0, 1, 2, 3, 4]}


def _plan(arms: dict, **change) -> dict:
    return {
        "question": "does fedit beat local?", "config": "tiny.yaml", "arms": arms,
        "ladder": {"local.lr": [1e-3, 4e-3]}, **SEEDS, "rounds": 2, "eval_every": 1,
        "metrics": ["personalized_accuracy"],
        "rules": [{"name": "federation", "arm": "fedit", "control": "local",
                   "mechanism": "one adapter trained on every client's data"}],
        **change,
    }


@pytest.fixture
def root(tmp_path, tiny_data_file) -> Path:
    """A repository whose tiny.yaml gives 6 clients 20 + 8 examples each: 168 of the
    192 the tiny data keeps for clients (240 less a fifth for the global test)."""
    (tmp_path / ".git").mkdir()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({
        "data": {"source": "files", "train_path": str(tiny_data_file), "partition": "iid",
                 "examples_per_client": 20, "client_test_examples": 8},
        "clients": {"num": 6}, "progress": False}))
    return tmp_path


def test_a_plan_whose_runs_can_start_passes(root):
    plan = Plan(**_plan({"local": ["method=local"], "fedit": ["method=fedit"]}))
    assert check(plan, root) == []
    assert rungs(plan) == [{"local.lr": 1e-3}, {"local.lr": 4e-3}]


def test_each_cause_is_named_once_with_the_arm_and_the_seeds_it_stops(root):
    plan = Plan(**_plan({
        "local": ["method=local"],
        "fedit": ["method=fedit", "lora.rnak=4"],  # a typo: every seed
        "crowded": ["method=fedit", "clients.num=7"],  # 7 x 28 > 192: every seed
        "tuned": {"settings": ["method=fedit", "local.steps=0"], "rung_from": "local"},
    }))
    problems = check(plan, root)
    assert len(problems) == 3, problems
    typo, crowded, tuned = problems
    assert typo.startswith("arm fedit, seeds 100, 0, 1, 2, 3, 4: ")
    assert "lora.rnak" in typo
    assert crowded.startswith("arm crowded, seeds 100, 0, 1, 2, 3, 4: ")
    assert "client 6 needs" in crowded and "examples_per_client=20" in crowded
    # an arm with rung_from runs the reporting seeds only
    assert tuned.startswith("arm tuned, seeds 0, 1, 2, 3, 4: ") and "local.steps" in tuned


def test_the_study_command_starts_nothing_when_a_run_cannot_start(root, capsys):
    folder = root / "study"
    folder.mkdir()
    plan = folder / "plan.yaml"
    plan.write_text(yaml.safe_dump(_plan({"local": ["method=local", "lora.rnak=4"],
                                          "fedit": ["method=fedit"]})))
    assert main(["study", str(plan), "--stage", "select"]) == 2
    err = capsys.readouterr().err
    assert "some runs of this plan cannot start, so none was started" in err
    assert "- arm local, seeds 100, 0, 1, 2, 3, 4: " in err and "lora.rnak" in err
    assert not (folder / "runs").exists()

    plan.write_text(yaml.safe_dump(_plan({"local": ["method=local"],
                                          "fedit": ["method=fedit"]})))
    assert main(["study", str(plan), "--stage", "check"]) == 0
    assert "can start" in capsys.readouterr().out
    assert not (folder / "runs").exists()
