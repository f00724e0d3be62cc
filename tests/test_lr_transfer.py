"""The learning-rate transfer study regenerates from what git holds.

docs/results/scaling.md quotes tables and figures of benchmarks/lr_transfer.py; the
study's runs are committed without weights or checkpoints (.gitignore). Rerunning the
study's commands on a copy of the committed runs must train nothing and give back the
committed tables exactly, and the figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import copy_tracked_runs, import_benchmark

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs/results/lr_transfer/rank-adamw-cpu"


@pytest.fixture(scope="module")
def lr_transfer():
    return import_benchmark("lr_transfer")


def _copy_runs(stage: str, out: Path) -> int:
    return copy_tracked_runs(sorted((STUDY / stage / "runs").iterdir()), STUDY, out)


def test_the_committed_rank_study_regenerates_its_tables_and_figure(lr_transfer, tmp_path,
                                                                    monkeypatch):
    from sfedlora.runtime.simulation import Simulation

    def refuse(*args, **kwargs):
        raise AssertionError("regenerating the tables must not train")

    monkeypatch.setattr(Simulation, "run", refuse)
    out = tmp_path / "rank-adamw-cpu"
    assert _copy_runs("ladder", out) == 120  # 5 rules x 3 ranks x 8 learning rates
    seeds = sorted(pd.read_csv(STUDY / "seeds/results.csv")["seed"].unique())
    assert _copy_runs("seeds", out) == 15 * len(seeds)
    common = ["--part", "rank", "--optimizer", "adamw", "--size", "cpu",
              "--seeds", ",".join(map(str, seeds)), "--out", str(tmp_path)]
    for stage in ("ladder", "seeds", "report"):
        assert lr_transfer.main([*common, "--stage", stage]) == 0
    for table in ("ladder/results.csv", "ladder/best_lr.csv", "seeds/results.csv",
                  "final.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / table), pd.read_csv(STUDY / table))
    for page in ("final.md", "transfer.md", "paired.md", "trend.md"):
        assert (out / page).read_text() == (STUDY / page).read_text()
    assert (out / "figures/lr_transfer.png").read_bytes()[:4] == b"\x89PNG"
