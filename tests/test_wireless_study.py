"""The wireless study (benchmarks/wireless.py): how it chooses TSFA's V, and that its
committed table regenerates from what git holds.

docs/results/wireless.md quotes ``docs/results/wireless/sst2-cpu/table.md``; the runs
behind it are committed without weights or checkpoints (.gitignore). The report stage
on a copy of only those files must train nothing and give back the committed table
exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import copy_tracked_runs, import_benchmark

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs/results/wireless/sst2-cpu"


@pytest.fixture(scope="module")
def wireless():
    return import_benchmark("wireless")


def test_latency_target_is_five_percent_either_side(wireless):
    assert [wireless.within_budget(r) for r in (0.94, 0.96, 1.0, 1.04, 1.06)] == [
        False, True, True, True, False]
    # the one-sided reading the report checks against admits any run under budget
    assert [wireless.at_most_over_budget(r) for r in (0.5, 0.94, 1.04, 1.06)] == [
        True, True, True, False]


def test_tsfa_arm_is_the_lowest_validation_loss_within_the_latency_target(wireless):
    c = wireless.Candidate
    candidates = [c("tsfa", 8, 1.0, False, 2e-3, 0.44, 0.98),
                  c("tsfa-v4", 8, 4.0, False, 2e-3, 0.41, 1.02),
                  c("tsfa-v16", 8, 16.0, False, 8e-3, 0.30, 1.20)]  # best loss, over budget
    assert wireless.pick_tsfa(candidates) == "tsfa-v4"
    # under budget by more than 5%: not admitted, unless the target is read one-sided
    candidates.append(c("tsfa-plan", 4, 1.0, False, 8e-3, 0.40, 0.84))
    assert wireless.pick_tsfa(candidates) == "tsfa-v4"
    assert wireless.pick_tsfa(candidates, wireless.at_most_over_budget) == "tsfa-plan"
    # a loss that is missing or not finite never wins
    candidates[0] = c("tsfa", 8, 1.0, False, 2e-3, math.nan, 1.0)
    candidates[1] = c("tsfa-v4", 8, 4.0, False, 2e-3, None, 1.0)
    assert wireless.pick_tsfa(candidates) is None
    assert wireless.pick_tsfa([]) is None


def test_time_to_the_line_is_the_first_evaluation_at_or_above_it(tmp_path):
    from sfedlora.studies import readings

    # evaluated rounds only; a round without an evaluation cannot cross the line
    rows = [{"round": 1, "simulated_seconds": 2.0, "personalized_accuracy": 0.80},
            {"round": 2, "simulated_seconds": 4.5},
            {"round": 3, "simulated_seconds": 6.5, "personalized_accuracy": 0.8549},
            {"round": 4, "simulated_seconds": 8.0, "personalized_accuracy": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert readings.time_to(tmp_path, 0.8548) == 6.5
    assert readings.reached(tmp_path, 6.5, 0.8548) == "6.5 s (0.8549, line 0.8548)"
    assert readings.time_to(tmp_path, 0.95) == math.inf
    # a miss names the best evaluation to 4 decimals: the margin can be that thin
    assert (readings.reached(tmp_path, math.inf, 0.95)
            == "never (best 0.9000 at 8.0 s, line 0.9500)")
    # bytes to the line read the same way
    assert readings.bytes_to(tmp_path, 0.8548) == math.inf  # these rows log no bytes


def test_committed_table_regenerates_from_tracked_files(wireless, tmp_path, monkeypatch):
    from sfedlora.runtime.simulation import Simulation

    def refuse(*args, **kwargs):
        raise AssertionError("regenerating the table must not train")

    monkeypatch.setattr(Simulation, "run", refuse)
    runs = sorted(p.parent for p in STUDY.glob("*/*/runs/*/summary.json"))
    assert copy_tracked_runs(runs, STUDY.parent, tmp_path) >= 7 * 3  # 7+ arms x 3 seeds
    plan = STUDY / wireless.PLAN  # the offline stage's choice, which the report prints
    (tmp_path / "sst2-cpu" / wireless.PLAN).write_bytes(plan.read_bytes())
    assert wireless.main(["--stage", "report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sst2-cpu/table.md").read_text() == (STUDY / "table.md").read_text()
    assert (tmp_path / "sst2-cpu/accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_runs_names_each_metric_that_differs_and_by_how_much():
    from sfedlora.studies import compare

    old = [{"round": 1, "bytes_up": 100, "acc": 0.5, "keep": {"0": 1, "1": 3}},
           {"round": 2, "bytes_up": 200, "acc": 0.6, "keep": {"0": 1}, "mode": "a"}]
    new = [{"round": 1, "bytes_up": 107, "acc": 0.5, "keep": {"0": 1, "1": 7}},
           {"round": 2, "bytes_up": 230, "acc": 0.6, "keep": {"0": 2}, "extra": 1,
            "mode": "b"}]
    # a per-client dict: the largest gap over its clients and rounds (4, then 1)
    assert compare.differences(old, new) == {"bytes_up": 30, "keep": 4,
                                             "extra": "differs", "mode": "differs"}
    assert compare.differences(old, old) == {}
    # other clients, or a value that is not a number, cannot be compared as numbers
    assert compare.gap({"0": 1}, {"1": 1}) is None
    assert compare.gap({"0": 1}, {"0": "x"}) is None


def test_compare_runs_names_what_changed_in_the_environment():
    from sfedlora.studies import compare

    old = [{"from_round": 1, "started_at": 1.0, "argv": ["a"], "cpu": "X",
            "packages": {"torch": "2.13.0", "transformers": "5.24.0"}}]
    new = [{"from_round": 1, "started_at": 2.0, "argv": ["b"], "cpu": "X",
            "packages": {"torch": "2.13.0", "transformers": "5.25.0"}},
           {"from_round": 7, "started_at": 3.0, "argv": ["b"], "cpu": "Y",  # a resume
            "packages": {"torch": "2.13.0", "transformers": "5.25.0"}}]
    # when and how a process started is not its environment; a resume's is
    assert compare.environment_changes(old, new) == \
        'cpu "X" -> "X"/"Y"; packages.transformers "5.24.0" -> "5.25.0"'
    assert compare.environment_changes(old, old) == "same"
    assert compare.environment_changes([], new) == "not recorded in the old run"
    assert compare.environment_changes([], []) == "not recorded in either run"


def test_planned_arms_read_the_offline_stages_rank_and_the_report_never_plans(wireless,
                                                                             tmp_path):
    import argparse

    args = argparse.Namespace(out=str(tmp_path), dataset="sst2", size="cpu", stage="report",
                              overrides=[])
    # no plan yet: the report stage must not run the pilots (they train)
    assert wireless.planned_overrides(args, "options.latency_budget_s=1.0") == []
    path = tmp_path / "sst2-cpu" / wireless.PLAN
    path.parent.mkdir()
    path.write_text(json.dumps({"rank": 4, "pilots": []}))
    for stage in ("report", "ladder"):  # a plan that exists is read, never made again
        args.stage = stage
        assert wireless.planned_overrides(args, "options.latency_budget_s=1.0") == [
            "lora.rank=4", f"options.plan={path}"]


def _write_run(path: Path, latencies: list[float], budget: float = 1.0) -> Path:
    """A run folder with only what the latency verdict reads."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"round": i, "latency_seconds": t}) + "\n"
        for i, t in enumerate(latencies, start=1)))
    (path / "config.yaml").write_text(
        f"rounds: {len(latencies)}\ntsfa:\n  latency_budget_s: {budget}\n")
    return path


def test_latency_verdict_reads_the_first_rounds_and_both_readings(wireless, tmp_path):
    # 12 rounds at 0.85 s then 6 at 1.3: 0.85 over the tuned length, 1.0 over all 18
    # (both far from the 5% edges, so no rounding can flip a verdict)
    runs = {s: _write_run(tmp_path / str(s), [0.85] * 12 + [1.3] * 6) for s in (3, 4)}
    tuned_length = wireless.latency_verdict("confirm", runs, 1.0, 12, wireless.BOTH_READINGS)
    assert tuned_length == ("TSFA's mean round latency over its confirm runs (12 rounds) "
                            "0.850 s / budget 1.000 s = 0.850 (target within 5%: MISSED; "
                            "at most 5% over: met)")
    assert wireless.latency_verdict("confirm", runs, 1.0).endswith(
        "(18 rounds) 1.000 s / budget 1.000 s = 1.000 (target within 5%: met)")


def test_confirmation_uses_fresh_seeds_and_the_arms_each_reading_chose(wireless):
    import argparse

    from sfedlora.studies.tuning import SEEDS

    assert not set(wireless.CONFIRM_SEEDS) & {0, *SEEDS}
    args = argparse.Namespace(out=str(STUDY.parent), dataset="sst2", size="cpu",
                              stage="report", overrides=[], arms=list(wireless.ARMS))
    # the committed study: two-sided rule tsfa-ef, one-sided reading tsfa-plan
    assert wireless.confirmed_arms(args) == ["fedit-dense", "tsfa-ef", "tsfa-plan"]
