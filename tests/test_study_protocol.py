"""A study run by its plan (sfedlora.studies.protocol, issue 41): the selection seeds
choose each arm's rung and are never reported, the reporting seeds run the chosen rung
only, the ladder extends past an end, and each verdict is the paired interval of the
plan's rule. The sweep runner is the study's own parameter: here one that writes the
run files a study reads, with figures given as functions of (arm, rung, seed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from sfedlora.studies.plan import PlanError
from sfedlora.studies.protocol import PlannedStudy

CONFIG = Path(__file__).parents[1] / "configs/methods_sst2.yaml"
PLAN = {
    "question": "does sfed beat local?",
    "config": "configs/methods_sst2.yaml",
    "arms": {"sfed": ["method=sfed"], "local": ["method=local"]},
    "common": ["clients.num=4"],
    "ladder": {"local.lr": [1e-3, 4e-3, 1.6e-2]},
    "selection_seeds": [100, 101],
    "reporting_seeds": [0, 1, 2, 3, 4],
    "rounds": 4,
    "eval_every": 2,
    "metrics": ["personalized_accuracy"],
    "rules": [
        {"name": "federation", "arm": "sfed", "control": "local",
         "mechanism": "the shared A pools what every client learns"},
        {"name": "learns", "arm": "local", "control": "baseline:majority_baseline_accuracy",
         "margin": 0.1, "mechanism": "the adapter learns beyond each client's majority"},
    ],
}


def _accuracy(arm: str, seed: int) -> float:
    return {"sfed": 0.80, "local": 0.70}[arm] + 0.01 * (seed % 3)


class FakeRuns:
    """A runner that writes each run the grid asks for: validation loss
    ``val_loss(arm, lr, seed)``, accuracy :func:`_accuracy` on every evaluated round."""

    def __init__(self, val_loss):
        self.val_loss = val_loss
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, config, grid, folder, overrides, shard, on_start):
        arm = next(s.split("=")[1] for s in overrides if s.startswith("method="))
        self.calls.append((arm, Path(folder).name, grid))
        for lr in grid["local.lr"]:
            for seed in grid["seed"]:
                run = Path(folder) / "runs" / f"local.lr-{lr}__seed-{seed}"
                if not run.exists():
                    self._write(run, arm, lr, seed, overrides)
        return True

    def _write(self, run, arm, lr, seed, overrides):
        run.mkdir(parents=True, exist_ok=True)  # a crashed attempt may have left it
        cfg = yaml.safe_load(CONFIG.read_text())
        cfg["local"]["lr"], cfg["seed"], cfg["method"] = lr, seed, arm
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        acc = _accuracy(arm, seed)
        rows = [{"round": r, "personalized_accuracy": acc - 0.1 * (r < 4),
                 "bytes_total": 100_000 * r} for r in (2, 4)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({
            "personalized_val_loss": self.val_loss(arm, lr, seed),
            "personalized_accuracy": acc, "majority_baseline_accuracy": 0.55}))


def _study(tmp_path, val_loss, **change) -> tuple[PlannedStudy, FakeRuns]:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "plan.yaml").write_text(yaml.safe_dump({**PLAN, **change}))
    runs = FakeRuns(val_loss)
    return PlannedStudy.load(folder / "plan.yaml", root=CONFIG.parents[1], runner=runs), runs


def test_the_selection_seeds_choose_the_lowest_mean_and_never_report(tmp_path):
    # seed 100 alone would choose 1.6e-2 for sfed; the mean over both seeds is 4e-3's
    def val_loss(arm, lr, seed):
        table = {1e-3: (0.50, 0.50), 4e-3: (0.41, 0.30), 1.6e-2: (0.40, 0.60)}
        return table[lr][seed - 100] if seed >= 100 else 0.5  # reporting runs: unread

    study, runs = _study(tmp_path, val_loss)
    assert study.run("all")
    assert study.choice("sfed")[0] == {"local.lr": 4e-3}
    assert study.choice("sfed")[1][(("local.lr", 4e-3),)] == pytest.approx(0.355)
    select = [grid for arm, stage, grid in runs.calls if stage == "select"]
    assert all(grid["seed"] == [100, 101] for grid in select)
    report = [grid for arm, stage, grid in runs.calls if stage == "report"]
    assert report == [{"local.lr": [4e-3], "seed": [0, 1, 2, 3, 4]}] * 2
    assert sorted(study.reporting_runs("sfed")) == [0, 1, 2, 3, 4]


def test_a_plan_may_choose_on_an_accuracy_where_highest_wins(tmp_path):
    study, _ = _study(tmp_path, lambda arm, lr, seed: {1e-3: 0.7, 4e-3: 0.9, 1.6e-2: 0.8}[lr],
                      tune_higher_is_better=True)
    assert study.select("sfed")
    rung, means = study.choice("sfed")
    assert rung == {"local.lr": 4e-3} and means[(("local.lr", 4e-3),)] == pytest.approx(0.9)


def test_among_rungs_that_tie_exactly_the_lowest_learning_rate_is_chosen(tmp_path):
    """Accuracy over a few hundred validation examples ties often; the choice must not
    depend on the order runs finished in. Here the top two rungs tie."""
    study, _ = _study(tmp_path, lambda arm, lr, seed: {1e-3: 0.7, 4e-3: 0.9, 1.6e-2: 0.9}[lr],
                      tune_higher_is_better=True)
    assert study.select("sfed")
    assert study.choice("sfed")[0] == {"local.lr": 4e-3}


def test_status_says_what_has_finished_and_what_is_due_without_running_anything(tmp_path):
    study, runs = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3))
    assert study.progress().splitlines()[2:] == [  # the plan's arms in order (yaml sorts)
        "| local | 0 | 0/5 | - | select: 6 |", "| sfed | 0 | 0/5 | - | select: 6 |", "",
        "At least 22 runs to go (a ladder may still gain a rung past an end)."]
    assert runs.calls == []
    study.select("sfed")
    assert study.progress().splitlines()[3] == "| sfed | 6 | 0/5 | local.lr=0.004 | report: 5 |"
    # how long is left, from the finished runs' rounds: 2, 4, ... 12 minutes, median 7
    for k, run in enumerate(study.arm_runs("sfed"), start=1):
        rounds = [{"round": 0, "eval": 5.0},  # an evaluation before round 1: no round
                  {"round": 1, "started_at": 1000.0, "ended_at": 1000.0 + 60 * k},
                  {"round": 2, "started_at": 9000.0, "ended_at": 9000.0 + 60 * k}]
        (run / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    assert study.progress().splitlines()[-1] == (
        "At least 16 runs to go (a ladder may still gain a rung past an end). The 6 "
        "finished runs took a median of 7.0 minutes each, as they ran: about 1.9 hours "
        "of runs, shared among `--jobs`.")
    study.run("all")
    assert study.progress().splitlines()[2:] == [
        "| local | 6 | 5/5 | local.lr=0.004 | done |", "| sfed | 6 | 5/5 | local.lr=0.004 | done |",
        "", "Every run has finished."]


def test_a_choice_at_an_end_extends_the_ladder_by_its_ratio_up_to_extend(tmp_path):
    study, runs = _study(tmp_path, lambda arm, lr, seed: lr, extend=1)  # lowest is best
    assert study.select("sfed")
    assert [grid["local.lr"] for _, _, grid in runs.calls] == [
        [1e-3, 4e-3, 1.6e-2], [2.5e-4, 1e-3, 4e-3, 1.6e-2]]
    assert study.choice("sfed")[0] == {"local.lr": 2.5e-4}
    runs.calls.clear()
    assert study.select("sfed")  # a rerun sweeps every rung it has, adds none
    assert [grid["local.lr"] for _, _, grid in runs.calls] == [[2.5e-4, 1e-3, 4e-3, 1.6e-2]]


def test_each_verdict_is_the_paired_interval_of_its_rule(tmp_path):
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3))
    study.run("all")
    federation, learns = (study.verdict(rule) for rule in study.plan.rules)
    # sfed - local is 0.10 on every seed: a zero-width interval at 0.10
    assert federation.mean == pytest.approx(0.10)
    assert federation.half_width == pytest.approx(0.0, abs=1e-12)
    assert federation.outcome == "sfed"
    # local against its own runs' majority baseline: paired by seed, checked with scipy
    gaps = np.array([_accuracy("local", s) - 0.55 for s in range(5)])
    half = scipy_stats.t.ppf(0.975, 4) * gaps.std(ddof=1) / math.sqrt(5)
    assert learns.mean == pytest.approx(gaps.mean())
    assert learns.half_width == pytest.approx(half)
    assert learns.outcome == "local"  # 0.16 ± 0.01 clears the 0.1 margin


def test_the_report_names_rule_interval_mechanism_and_the_plans_order(tmp_path):
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3))
    study.run("all")
    page = (study.folder / "report.md").read_text()
    assert page == study.page()  # regenerates from the run files alone
    assert "federation: sfed - local on final personalized_accuracy = +0.1000" in page
    assert "Mechanism: the shared A pools what every client learns" in page
    assert "| 3 | 0.7000 | 0.5500 | 0.1500 |" in page  # the learns rule, per seed
    assert "not committed" in page  # a plan outside git cannot show it came first


def test_the_report_says_which_commits_and_hardware_ran_each_arm(tmp_path):
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3))
    study.run("all")  # 6 selection runs and 5 reporting runs per arm

    def record(commit, started, capability=None, gpu=None):
        return {"source": {"commit": commit}, "started_at": started,
                "torch_cpu_capability": capability, "cuda_device": gpu}

    late, early = "b" * 40, "c" * 40  # listed by when they first ran, not by name
    for run in study.arm_runs("sfed"):
        records = [record(late, 10, "AVX2")]
        if run.name.endswith("seed-0"):  # resumed: begun on other hardware, at another commit
            records.insert(0, record(early, 5, "AVX512"))
        if run.name.endswith("seed-1"):
            records = [record(late, 11, gpu="NVIDIA H100 80GB HBM3")]
        if run.name.endswith("seed-2"):  # resumed where it began: still one run
            records.append(record(late, 12, "AVX2"))
        (run / "environment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = study.page()  # local's runs recorded no environment
    assert "| sfed | 11 | ccccccc (1), bbbbbbb (11) | " \
           "10 on CPU (AVX2 kernels), 1 on CPU (AVX512 kernels), " \
           "1 on NVIDIA H100 80GB HBM3 |" in page
    assert "| local | 11 | none (11) | 11 on an unrecorded machine |" in page
    assert "Every run from one commit: no, 2 commits and runs that recorded none. " \
           "On one kind of hardware: no, 3 kinds and runs that recorded none." in page

    for run in study.all_runs():
        (run / "environment.jsonl").write_text(json.dumps(record(late, 1, "AVX2")) + "\n")
    page = study.page()
    assert "| local | 11 | bbbbbbb (11) | 11 on CPU (AVX2 kernels) |" in page
    assert "Every run from one commit: yes. On one kind of hardware: yes." in page

    for run in study.all_runs():  # nothing recorded is not "one commit"
        (run / "environment.jsonl").unlink()
    assert "Every run from one commit: no, 0 commits and runs that recorded none. " \
           "On one kind of hardware: no, 0 kinds and runs that recorded none." in study.page()


def test_a_verdict_before_every_reporting_run_has_finished_is_refused(tmp_path):
    study, _ = _study(tmp_path, lambda arm, lr, seed: lr)
    study.run("select")
    with pytest.raises(PlanError, match="run them before deciding"):
        study.verdict(study.plan.rules[0])
    with pytest.raises(PlanError, match="the plan's arms are"):
        study.run("all", ["fedit"])


def test_the_report_waits_for_the_whole_selection(tmp_path):
    # a shard that finished its rungs early must not report a choice from part of them
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3))
    study.select("sfed")
    next((study.stage_dir("sfed", "select") / "runs").glob("*lr-0.016*")).joinpath(
        "summary.json").unlink()
    assert not study.selection_finished("sfed")
    with pytest.raises(PlanError, match="select stage has not finished"):
        study.report("sfed")
    # the lowest rung was best and one rung past it is due: still not finished
    (tmp_path / "end").mkdir()
    study, _ = _study(tmp_path / "end", lambda arm, lr, seed: lr)
    study._sweep("sfed", "select", {"local.lr": [1e-3, 4e-3, 1.6e-2], "seed": [100, 101]})
    assert not study.selection_finished("sfed")
    assert study.select("sfed") and study.selection_finished("sfed")


def test_a_line_below_the_control_is_drawn_per_seed_from_its_final_metric(tmp_path):
    # local's line is its final accuracy minus 0.05: it holds it only at round 4 (0.4
    # MB); sfed is above that line from round 2 (0.2 MB): 2x fewer bytes per seed
    rule = {"name": "bytes", "arm": "sfed", "control": "local", "reading": "bytes_to",
            "line_below_control": 0.05, "hold": 1, "compare": "ratio", "target": 1.5,
            "mechanism": "m"}
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3), rules=[rule])
    study.run("all")
    assert study.lines(study.plan.rules[0]) == {
        s: pytest.approx(_accuracy("local", s) - 0.05) for s in range(5)}
    assert study.paired_readings(study.plan.rules[0]) == (
        {s: 200_000 for s in range(5)}, {s: 400_000 for s in range(5)})
    verdict = study.verdict(study.plan.rules[0])
    assert verdict.outcome == "met" and verdict.interval == pytest.approx((2.0, 2.0))
    page = study.page()  # bytes per seed in MB, under headings that say so
    assert "| seed | line | sfed (MB) | local (MB) | ratio |" in page
    assert "| 0 | 0.6500 | 0.2000 | 0.4000 | 2.0000 |" in page


def test_a_line_can_be_drawn_below_a_third_arm(tmp_path):
    # both arms read at the line under sfed's final accuracy (0.75 at seed 0): local
    # never holds it, so the verdict is unresolved and says so
    rule = {"name": "at sfed's line", "arm": "sfed", "control": "local",
            "reading": "bytes_to", "line_below_control": 0.05, "line_arm": "sfed",
            "hold": 1, "mechanism": "m"}
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - 4e-3), rules=[rule])
    study.run("all")
    assert study.lines(study.plan.rules[0])[0] == pytest.approx(0.75)
    verdict = study.verdict(study.plan.rules[0])
    assert verdict.never == {"local": 5} and verdict.outcome == "unresolved"
    # sfed holds it from round 4 (0.4 MB); local's reading is said, and nothing compared
    assert "| 0 | 0.7500 | 0.4000 | never held | - |" in study.page()



def test_an_arm_can_run_the_rung_another_arm_chose(tmp_path):
    """What reusing a tuned rate costs: the borrowing arm is never tuned and reports at
    the rung its source chose, with its own settings."""
    arms = {"sfed": ["method=sfed"], "local": ["method=local"],
            "sfed-at-local-rate": {"settings": ["method=sfed"], "rung_from": "local"}}
    best = {"sfed": 1.6e-2, "local": 4e-3}
    study, _ = _study(tmp_path, lambda arm, lr, seed: abs(lr - best[arm]), arms=arms,
                         ladder={"local.lr": [1e-3, 4e-3, 1.6e-2, 6.4e-2]})
    assert study.run("all")
    assert study.choice("sfed-at-local-rate")[0] == {"local.lr": 4e-3}
    assert not study.stage_dir("sfed-at-local-rate", "select").exists()
    borrowed = study.reporting_runs("sfed-at-local-rate")
    assert sorted(borrowed) == [0, 1, 2, 3, 4]
    for run in borrowed.values():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["method"], cfg["local"]["lr"]) == ("sfed", 4e-3)
    assert "| sfed-at-local-rate | local.lr=0.004 (local's) |" in study.page()


@pytest.mark.parametrize("rung_from", ["fedit", "sfed-at-local-rate"])
def test_rung_from_must_name_an_arm_tuned_itself(tmp_path, rung_from):
    arms = {"sfed": ["method=sfed"], "local": ["method=local"],
            "sfed-at-local-rate": {"settings": ["method=sfed"], "rung_from": rung_from}}
    with pytest.raises(PlanError, match="must name an arm that is tuned itself"):
        _study(tmp_path, lambda arm, lr, seed: lr, arms=arms)
