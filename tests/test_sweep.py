"""Sweeps: the cross product runs once, resumes, and is summarised over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sfedlora.config import ConfigError, to_yaml
from sfedlora.runtime.simulation import Simulation
from sfedlora.studies.sweep import parse_grid, run_sweep


@pytest.fixture
def base_config(tiny_config, tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(to_yaml(tiny_config("method=fedsa", "rounds=2", "checkpoint.every=1")))
    return str(path)


def test_sweep_runs_the_cross_product_and_averages_over_seeds(base_config, tmp_path):
    out = tmp_path / "sweep"
    started: list[str] = []
    run_sweep(base_config, parse_grid(["lora.rank=2,4", "seed=0,1"]), out,
              on_start=started.append)
    assert len(started) == 4
    results = pd.read_csv(out / "results.csv")
    assert sorted(zip(results["lora.rank"], results["seed"], strict=True)) == [
        (2, 0), (2, 1), (4, 0), (4, 1)]
    table = pd.read_csv(out / "table.csv").set_index("lora.rank")
    for rank in (2, 4):
        rows = results[results["lora.rank"] == rank]["personalized_accuracy"]
        assert table.loc[rank, "personalized_accuracy_mean"] == pytest.approx(rows.mean())
        assert table.loc[rank, "personalized_accuracy_std"] == pytest.approx(rows.std())
        assert table.loc[rank, "personalized_accuracy_count"] == 2
    assert "±" in (out / "table.md").read_text()

    # finished runs are never redone; an interrupted one is resumed from its checkpoint
    run_dir = out / "runs" / "lora.rank-4__seed-1"
    (run_dir / "summary.json").unlink()
    started.clear()
    run_sweep(base_config, parse_grid(["lora.rank=2,4", "seed=0,1"]), out,
              on_start=started.append)
    assert started == ["lora.rank-4__seed-1"]
    assert pd.read_csv(out / "results.csv").equals(results)
    with pytest.raises(ConfigError, match=r"local\.lr: 0\.01 -> 0\.5.*another --out"):
        run_sweep(base_config, parse_grid(["lora.rank=2,4", "seed=0,1"]), out,
                  overrides=["local.lr=0.5"])

    from sfedlora.cli import main

    assert main(["plot", "--sweep", str(out)]) == 0
    assert main(["plot", "--sweep", str(out), "--out", str(tmp_path / "figs")]) == 0
    for folder in (out / "figures", tmp_path / "figs"):
        for name in ("curves", "final_vs_rank", "stability"):
            assert (folder / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_shards_split_the_grid_and_the_last_writes_the_tables(base_config, tmp_path):
    from sfedlora.studies.sweep import parse_shard

    out, grid = tmp_path / "sweep", parse_grid(["lora.rank=2,4", "seed=0,1,2"])
    seen: dict[int, list[str]] = {}
    for k in (1, 0):  # the shard that finishes last writes the tables
        seen[k] = []
        done = run_sweep(base_config, grid, out, ["rounds=1"], on_start=seen[k].append,
                         shard=parse_shard(f"{k}/2"))
        assert done is (k == 0)
        assert (out / "results.csv").is_file() is (k == 0)
    assert len(seen[0]) == len(seen[1]) == 3
    assert not set(seen[0]) & set(seen[1])
    assert len(pd.read_csv(out / "results.csv")) == 6
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="K/M"):
            parse_shard(bad)


def test_grid_values_in_exponent_notation_are_numbers():
    """YAML 1.1 reads 1e-3 as text; a learning-rate ladder must sort as numbers."""
    grid = parse_grid(["local.lr=1e-3,4e-3,1.6e-2,0.1", "lora.scaling=lora,sfed",
                       "model.name=e5,nan"])
    assert grid["local.lr"] == [0.001, 0.004, 0.016, 0.1]
    assert all(isinstance(v, float) for v in grid["local.lr"])
    assert grid["lora.scaling"] == ["lora", "sfed"] and grid["model.name"] == ["e5", "nan"]


def test_joint_keys_vary_together():
    from sfedlora.studies.sweep import expand, grid_keys

    grid = parse_grid(["lora.scaling+lora.a_init=lora+shared,sfed+independent",
                       "lora.rank=4,16"])
    runs = expand(grid)
    assert grid_keys(grid) == ["lora.scaling", "lora.a_init", "lora.rank"]
    assert [(r.values["lora.scaling"], r.values["lora.a_init"], r.values["lora.rank"])
            for r in runs] == [("lora", "shared", 4), ("lora", "shared", 16),
                               ("sfed", "independent", 4), ("sfed", "independent", 16)]
    with pytest.raises(ConfigError, match="needs 2 parts"):
        parse_grid(["lora.scaling+lora.a_init=lora"])


def test_bad_grid_fails_before_any_run(base_config, tmp_path, monkeypatch):
    monkeypatch.setattr(Simulation, "run", lambda self: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        run_sweep(base_config, parse_grid(["lora.rank=4,banana"]), tmp_path / "s")
    # 6 or 7 clients of 20 + 8 examples, of the 192 the tiny data keeps for clients
    fixed = ["data.partition=iid", "data.examples_per_client=20", "data.client_test_examples=8"]
    with pytest.raises(ConfigError, match=r"the clients of 1 run\(s\) cannot be built, so "
                       r"no run was started:\n- clients\.num-7: .* client 6 needs 10 "):
        run_sweep(base_config, parse_grid(["clients.num=6,7"]), tmp_path / "s", fixed)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match=r"dotted\.key=v1,v2"):
        parse_grid(["lora.rank"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_grid([])


def test_overrides_may_follow_options(monkeypatch, tmp_path):
    from sfedlora import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_sweep", lambda args: seen.update(vars(args)) or 0)
    parser_args = ["sweep", "base.yaml", "--grid", "seed=0,1", "local.lr=0.01", "--out",
                   str(tmp_path), "rounds=2"]
    assert cli.main(parser_args) == 0
    assert seen["overrides"] == ["local.lr=0.01", "rounds=2"]
    assert seen["grid"] == ["seed=0,1"] and seen["config"] == "base.yaml"


def test_best_lr_table_chooses_on_validation_loss_and_reports_intervals(tiny_config, tmp_path):
    """A learning-rate ladder: per cell the learning rate with the lowest mean
    validation loss over seeds, flagged when it is an end of the ladder, and each metric
    at it as mean and 95% t-interval over seeds (recomputed here from results.csv)."""
    from scipy import stats

    base = tmp_path / "base.yaml"
    base.write_text(to_yaml(tiny_config("method=fedsa", "rounds=1",
                                        "data.validation_fraction=0.25")))
    out = tmp_path / "sweep"
    run_sweep(str(base), parse_grid(["lora.rank=2,4", "local.lr=0.001,0.01,0.1",
                                     "seed=0,1,2"]), out)
    results = pd.read_csv(out / "results.csv")
    assert results["personalized_val_loss"].notna().all()
    best = pd.read_csv(out / "best_lr.csv").set_index("lora.rank")
    for rank in (2, 4):
        rows = results[results["lora.rank"] == rank]
        curve = rows.groupby("local.lr")["personalized_val_loss"].mean()
        assert best.loc[rank, "best_lr"] == curve.idxmin()
        assert bool(best.loc[rank, "lr_at_ladder_end"]) == (curve.idxmin() in (0.001, 0.1))
        chosen = rows[rows["local.lr"] == curve.idxmin()]["personalized_accuracy"]
        half = stats.t.ppf(0.975, 2) * chosen.std(ddof=1) / 3**0.5
        assert best.loc[rank, "personalized_accuracy_mean"] == pytest.approx(chosen.mean())
        assert best.loc[rank, "personalized_accuracy_ci95"] == pytest.approx(half)
        assert best.loc[rank, "seeds"] == 3
    assert "±" in (out / "best_lr.md").read_text()

    from sfedlora.cli import main

    # the same sweep from the command line, chosen on validation accuracy: no run reruns,
    # the tables are rewritten (the choice recomputed here from results.csv)
    assert main(["sweep", str(base), "--grid", "lora.rank=2,4", "--grid",
                 "local.lr=0.001,0.01,0.1", "--grid", "seed=0,1,2", "--out", str(out),
                 "--tune-on", "accuracy"]) == 0
    best = pd.read_csv(out / "best_lr.csv").set_index("lora.rank")
    for rank in (2, 4):
        curve = results[results["lora.rank"] == rank].groupby("local.lr")[
            "personalized_val_accuracy"].mean()
        assert best.loc[rank, "best_lr"] == curve[curve == curve.max()].index.min()
    assert "by mean personalized_val_accuracy (the highest)" in (out / "best_lr.md").read_text()

    assert main(["plot", "--sweep", str(out), "--lr-transfer"]) == 0
    assert (out / "figures" / "lr_transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_best_lr_chooses_the_lowest_loss_or_the_highest_accuracy_lowest_rate_on_ties():
    from sfedlora.studies.sweep import best_learning_rates

    rows = [(lr, seed, loss, acc) for lr, loss, acc in
            [(1e-3, 0.50, 0.70), (1e-2, 0.40, 0.80), (1e-1, 0.90, 0.80)] for seed in (0, 1)]
    results = pd.DataFrame(rows, columns=["local.lr", "seed", "personalized_val_loss",
                                          "personalized_val_accuracy"])
    keys, metrics = ["local.lr", "seed"], ["personalized_val_accuracy"]
    by_loss, _ = best_learning_rates(results, keys, metrics)
    by_accuracy, _ = best_learning_rates(results, keys, metrics, tune_on="accuracy")
    assert by_loss["best_lr"].tolist() == [1e-2]
    assert by_accuracy["best_lr"].tolist() == [1e-2]  # 1e-1 ties at 0.80: the lower rate
    results.loc[results["local.lr"] == 1e-3, "personalized_val_accuracy"] = 0.85
    by_accuracy, _ = best_learning_rates(results, keys, metrics, tune_on="accuracy")
    assert by_accuracy["best_lr"].tolist() == [1e-3]
    assert bool(by_accuracy["lr_at_ladder_end"].iloc[0])
    with pytest.raises(ConfigError, match="tune_on='f1'"):
        run_sweep(None, {"local.lr": [1e-3]}, Path("unused"), tune_on="f1")


def test_best_lr_table_is_refused_without_a_validation_part(base_config, tmp_path, caplog):
    out = tmp_path / "sweep"
    run_sweep(base_config, parse_grid(["local.lr=0.001,0.01"]), out, ["rounds=1"])
    assert (out / "table.csv").is_file() and not (out / "best_lr.csv").exists()
    assert "set data.validation_fraction" in caplog.text


def test_validation_part_is_held_out_of_training(tiny_config):
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(tiny_config("data.validation_fraction=0.25"))
    for split in exp.data.clients:
        assert len(split.val) > 0
        parts = [set(split.train.tolist()), set(split.val.tolist()), set(split.test.tolist())]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    sizes = [len(t) for t in exp.client_train]
    assert sizes == [len(s.train) for s in exp.data.clients]


def test_a_sweep_without_its_runs_still_draws_final_values(tmp_path):
    """A sweep shared as results.csv alone (a committed study whose runs are elsewhere):
    the final-value figures come from results.csv; the curves, which need each run's
    metrics.jsonl, are skipped rather than failing."""
    import shutil
    from pathlib import Path

    from sfedlora.cli import main

    committed = Path(__file__).resolve().parents[1] / "docs/results/lr_transfer/rank-adamw-cpu"
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copy2(committed / "ladder/results.csv", sweep / "results.csv")
    assert main(["plot", "--sweep", str(sweep), "--out", str(tmp_path / "figures")]) == 0
    drawn = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert drawn and all(name.startswith("final_vs_rank") for name in drawn)
    assert (tmp_path / "figures" / drawn[0]).read_bytes()[:4] == b"\x89PNG"


def test_fitted_best_lr_recovers_an_optimum_between_rungs():
    """A loss exactly quadratic in log lr with its minimum at 3e-3, sampled on a 4x ladder
    that misses it: the fit finds 3e-3; a minimum at a ladder end gives nan."""
    import math

    from sfedlora.studies.sweep import fitted_best_lr

    rungs = [1e-4, 4e-4, 1.6e-3, 6.4e-3, 2.56e-2]
    curve = pd.Series([(math.log(lr) - math.log(3e-3)) ** 2 + 0.2 for lr in rungs],
                      index=rungs)
    assert fitted_best_lr(curve) == pytest.approx(3e-3, rel=1e-9)
    assert math.isnan(fitted_best_lr(pd.Series([0.1, 0.2, 0.3], index=rungs[:3])))
