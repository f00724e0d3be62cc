"""sfedlora.studies: the one reader of run directories and the statistics studies
report, against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sfedlora.studies import runs, stats

T_975_2DF = 4.302652729749464  # the t table: two-sided 95%, 2 degrees of freedom


def test_ci95_is_the_t_interval_half_width():
    assert stats.ci95([1.0, 2.0, 3.0]) == pytest.approx(T_975_2DF / math.sqrt(3), rel=1e-12)
    assert math.isnan(stats.ci95([1.0]))
    # a pandas Series (what a groupby aggregation passes) is taken as is
    assert stats.ci95(pd.Series([1.0, 2.0, 3.0])) == stats.ci95(np.array([1.0, 2.0, 3.0]))


def test_paired_difference_pairs_by_position():
    mean, half = stats.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # 2, 3, 4
    assert mean == 3.0 and half == pytest.approx(T_975_2DF / math.sqrt(3), rel=1e-12)
    with pytest.raises(ValueError, match="differ in number"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_the_reader_lists_finished_runs_and_reads_their_files(tmp_path):
    for name, finished in (("b", True), ("a", True), ("c", False)):
        run = tmp_path / name
        run.mkdir()
        (run / runs.METRICS).write_text(json.dumps({"round": 1}) + "\n\n")
        (run / runs.TIMINGS).write_text(json.dumps({"round": 1, "train": 0.5}) + "\n")
        if finished:
            (run / runs.SUMMARY).write_text(json.dumps({"round": 1, "name": name}))
    assert runs.finished_runs(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert runs.summary(tmp_path / "a") == {"round": 1, "name": "a"}
    assert runs.metrics(tmp_path / "c") == [{"round": 1}]  # blank lines skipped
    assert runs.timings(tmp_path / "c") == [{"round": 1, "train": 0.5}]
    assert not runs.is_finished(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"has no metrics\.jsonl"):
        runs.metrics(tmp_path)


def test_a_cell_is_mean_plus_minus_its_interval_in_one_spelling():
    from sfedlora.studies.tables import markdown_table, mean_pm, values_pm

    assert mean_pm(0.84567, 0.0123) == "0.846 ± 0.012"
    assert mean_pm(0.84567, float("nan")) == "0.846"  # one seed: no interval
    assert mean_pm(float("nan"), 0.1) == "-" and mean_pm(None, 0.1) == "-"
    assert mean_pm(-0.01234, 0.005, "+.4f", ".2g") == "-0.0123 ± 0.005"
    # t(0.975, 2) * std / sqrt(3) of (1, 2, 3): 4.302653 * 1 / 1.732051 = 2.484
    assert values_pm([1.0, 2.0, 3.0], 2) == "2.00 ± 2.48"
    assert values_pm([1.0, float("inf"), float("inf")]) == "not reached in 2 of 3"
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_a_choice_takes_the_lowest_validation_loss_among_the_admissible():
    from types import SimpleNamespace as C

    from sfedlora.studies.verdicts import at_most_over, lowest_admissible, within

    assert [within(r, 0.05) for r in (0.94, 0.96, 1.04, 1.06)] == [False, True, True, False]
    assert [at_most_over(r, 0.05) for r in (0.5, 1.04, 1.06)] == [True, True, False]
    cands = [C(arm="a", val_loss=0.4, latency_ratio=1.0),
             C(arm="b", val_loss=0.3, latency_ratio=1.2),  # best loss, over budget
             C(arm="c", val_loss=float("nan"), latency_ratio=1.0)]
    assert lowest_admissible(cands, lambda r: within(r, 0.05)) == "a"
    assert lowest_admissible(cands, lambda r: True) == "b"
    assert lowest_admissible(cands[2:], lambda r: True) is None
