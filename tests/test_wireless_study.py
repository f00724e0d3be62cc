"""The wireless study (benchmarks/wireless.py): how it chooses TSFA's V, and that its
committed table regenerates from what git holds.

docs/results/wireless.md quotes ``docs/results/wireless/sst2-cpu/table.md``; the runs
behind it are committed without weights or checkpoints (.gitignore). The report stage
on a copy of only those files must give back the committed table exactly."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs/results/wireless/sst2-cpu"
KEPT = ("config.yaml", "metrics.jsonl", "summary.json", "timings.jsonl", "labels.json")


@pytest.fixture(scope="module")
def wireless():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import wireless
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return wireless


def test_latency_target_is_five_percent_either_side(wireless):
    assert [wireless.within_budget(r) for r in (0.94, 0.96, 1.0, 1.04, 1.06)] == [
        False, True, True, True, False]


def test_v_is_the_lowest_validation_loss_within_the_latency_target(wireless):
    c = wireless.Candidate
    candidates = [c("tsfa", 1.0, 2e-3, 0.44, 0.98),
                  c("tsfa-v4", 4.0, 2e-3, 0.41, 1.02),
                  c("tsfa-v16", 16.0, 8e-3, 0.30, 1.20)]  # best loss, over budget
    assert wireless.pick_v(candidates) == "tsfa-v4"
    # a loss that is missing or not finite never wins
    candidates[0] = c("tsfa", 1.0, 2e-3, math.nan, 1.0)
    candidates[1] = c("tsfa-v4", 4.0, 2e-3, None, 1.0)
    assert wireless.pick_v(candidates) is None
    assert wireless.pick_v([]) is None


def test_committed_table_regenerates_from_tracked_files(wireless, tmp_path):
    runs = sorted(STUDY.glob("*/*/runs/*/summary.json"))
    assert runs, "the wireless study's runs are committed"
    for summary in runs:
        run = summary.parent
        dest = tmp_path / run.relative_to(STUDY.parent)
        dest.mkdir(parents=True)
        for name in KEPT:
            if (run / name).is_file():
                shutil.copy2(run / name, dest / name)
    assert wireless.main(["--stage", "report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sst2-cpu/table.md").read_text() == (STUDY / "table.md").read_text()
    assert (tmp_path / "sst2-cpu/accuracy_vs_time.png").stat().st_size > 0
