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
