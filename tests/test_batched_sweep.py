"""Batched sweeps (``sfedlora sweep --batched R``): R runs in one process, their
clients trained in shared passes, leave the run directories the runs leave alone
(issue 39, item 3)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sfedlora.config import load_config
from sfedlora.runtime.batched.lockstep import Lockstep, SweepPool, share_frozen_base
from sfedlora.runtime.batched.training import BatchedTrainer
from sfedlora.runtime.experiment import build_experiment
from sfedlora.studies.sweep import run_sweep
from tests.conftest import assert_same_run, metric_lines, tiny_base

# What a rank part of the learning-rate study varies (rank with its scale rule,
# learning rate, seed), and a method that cannot train batched (FedEx-LoRA merges into
# the base), which then trains one client at a time in its turn.
GRID = {"method+lora.rank+lora.scaling+local.lr+seed": [
    ("sfed", 4, "lora", 0.01, 0), ("sfed", 8, "sfed", 0.003, 1),
    ("fedex", 4, "lora", 0.01, 0)]}


@pytest.fixture(scope="module")
def sweeps(tiny_model_dir, tiny_data_file, tmp_path_factory):
    """The same grid swept one run after another and all three runs in one process;
    and how many runs each shared training call held."""
    root = tmp_path_factory.mktemp("batched-sweep")
    base = [*tiny_base(tiny_model_dir, tiny_data_file, root / "unused"),
            "rounds=2", "clients.num=4", "clients.per_round=3", "local.max_grad_norm=0.5",
            "local.keep_optimizer_state=true", "checkpoint.every=0"]
    dirs, runs_per_pass = {}, []
    original = BatchedTrainer.train_jobs

    def counting(self, jobs):
        runs_per_pass.append(len({id(worker) for worker, _ in jobs}))
        return original(self, jobs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BatchedTrainer, "train_jobs", counting)
        for batched in (1, 3):
            out = root / f"batched-{batched}"
            assert run_sweep(None, dict(GRID), out, batched=batched,
                             load=lambda items: load_config(None, base + items))
            dirs[batched] = out
    dirs["runs_per_pass"] = runs_per_pass
    return dirs


def test_a_batched_sweep_leaves_the_run_directories_of_runs_alone(sweeps):
    runs = sorted(p.name for p in (sweeps[1] / "runs").iterdir())
    assert len(runs) == 3
    assert sorted(p.name for p in (sweeps[3] / "runs").iterdir()) == runs
    for name in runs:
        alone, together = sweeps[1] / "runs" / name, sweeps[3] / "runs" / name
        assert_same_run(alone, together)
        configs = [(d / "config.yaml").read_text().replace(str(d), "RUN")
                   for d in (alone, together)]
        assert configs[0] == configs[1]
    assert (sweeps[1] / "table.md").is_file() and (sweeps[3] / "table.md").is_file()


def test_a_batched_causal_lm_sweep_leaves_the_run_directories_of_runs_alone(
        tiny_lm_config, tmp_path):
    """The tiny Llama with LoRA dropout: clients' batches of different widths, each
    run's own rate, rank, scale and seed."""
    grid = {"lora.rank+lora.scaling+local.lr+seed": [(4, "lora", 0.01, 0),
                                                     (8, "sfed", 0.003, 1)]}
    dirs = []
    for batched in (1, 2):
        out = tmp_path / f"batched-{batched}"
        assert run_sweep(None, dict(grid), out, batched=batched, load=lambda items: (
            tiny_lm_config("method=sfed", "rounds=1", "local.steps=2", "local.batch_size=2",
                           "lora.dropout=0.1", "eval.generate=0", "checkpoint.every=0",
                           *items)))
        dirs.append(out)
    names = sorted(p.name for p in (dirs[0] / "runs").iterdir())
    assert len(names) == 2
    for name in names:
        assert_same_run(dirs[0] / "runs" / name, dirs[1] / "runs" / name)


def test_the_batchable_runs_trained_in_shared_passes(sweeps):
    """The two sfed runs (ranks, scales, rates and seeds all differ) share every
    round's passes; FedEx-LoRA's run trains one client at a time, in no shared pass."""
    assert sweeps["runs_per_pass"] == [2, 2]  # 2 rounds


def test_runs_of_a_batched_sweep_differ_as_their_settings_say(sweeps):
    """Independent values the equality above cannot see: a run's own seed and rate
    reach its clients (no run's clients trained with another run's tensors)."""
    names = sorted(p.name for p in (sweeps[3] / "runs").iterdir())
    finals = {n: metric_lines(sweeps[3] / "runs" / n)[-1]["train_loss"] for n in names}
    assert len(set(finals.values())) == len(names)


def test_a_batched_sweep_records_how_it_ran(sweeps):
    for run in (sweeps[3] / "runs").iterdir():
        record = json.loads((run / "environment.jsonl").read_text().splitlines()[-1])
        assert record["execution"] == {"batched_sweep_runs": 3}
    alone = next((sweeps[1] / "runs").iterdir())
    assert "execution" not in json.loads((alone / "environment.jsonl").read_text())


def test_each_runs_log_holds_its_own_records_only(tiny_config, tmp_path, monkeypatch):
    from sfedlora.runtime import simulation

    original = simulation.Simulation.run_round

    def noisy(self, round_idx):  # a record each run logs from its own turn
        logging.getLogger("sfedlora.test").warning("round %d of %s", round_idx,
                                                   self.cfg.output_dir)
        return original(self, round_idx)

    monkeypatch.setattr(simulation.Simulation, "run_round", noisy)
    grid = {"seed": [0, 1]}
    assert run_sweep(None, grid, tmp_path, batched=2, load=lambda items: tiny_config(
        "rounds=2", "checkpoint.every=0", "eval.every=2", *items))
    for run in (tmp_path / "runs").iterdir():
        lines = [x for x in (run / "run.log").read_text().splitlines() if "round " in x]
        assert len(lines) == 2 and all(str(run) in x for x in lines), lines


def test_runs_with_equal_frozen_bases_share_its_storage(tiny_config):
    """Two seeds and ranks of one base share it (the heads the seeds initialise stay
    each run's own); a base whose frozen tensors differ does not."""
    one = build_experiment(tiny_config("seed=0")).worker
    two = build_experiment(tiny_config("seed=1", "lora.rank=8")).worker
    three = build_experiment(tiny_config("seed=2")).worker
    frozen = next(n for n, p in two.model.named_parameters() if not p.requires_grad
                  and n not in two.slots.params)
    with torch.no_grad():
        dict(three.model.named_parameters())[frozen].add_(1.0)
    assert share_frozen_base(one, two)
    ours, theirs = (dict(w.model.named_parameters())[frozen] for w in (one, two))
    assert ours.data_ptr() == theirs.data_ptr()
    assert not share_frozen_base(one, three)
    assert dict(three.model.named_parameters())[frozen].data_ptr() != ours.data_ptr()


def test_a_failed_run_is_reported_and_the_others_finish(tiny_config, tmp_path, caplog):
    lockstep = Lockstep()
    for name in ("ok", "broken"):
        cfg = tiny_config("rounds=2", "checkpoint.every=0", f"output_dir={tmp_path / name}")
        from sfedlora.runtime.simulation import Simulation

        pool = SweepPool(build_experiment(cfg))
        sim = Simulation(cfg, pool)
        if name == "broken":
            def fail(*_args, **_kwargs):
                raise ValueError("a client's data is corrupt")
            sim.server.download = fail
        lockstep.add(name, pool, sim.run)
    with caplog.at_level(logging.ERROR):
        outcomes = lockstep.run()
    assert isinstance(outcomes["broken"], ValueError)
    assert isinstance(outcomes["ok"], dict)
    assert len(metric_lines(Path(tmp_path / "ok"))) >= 2


class _FakeWorker:  # hashable by identity, as a Worker is
    def __init__(self, seed: int):
        self.seed, self.device = seed, torch.device("cpu")


class _FakeTrainer:
    """A shared trainer that trains nothing: each worker's generator is left where a
    seed of its own puts it, as the real one leaves each run's last client's stream."""

    def __init__(self, worker):
        self.worker = worker

    def train_jobs(self, jobs):
        left = {}
        for worker, _ in jobs:
            left[worker] = torch.Generator().manual_seed(1000 + worker.seed).get_state()
        return [f"fit {run}" for _, run in jobs], left


def _draws_of(seeds: list[int], monkeypatch) -> dict[int, list[float]]:
    """Each seed's run drawing from the default generator before, between and after
    two shared trainings, all run together."""
    from types import SimpleNamespace

    from sfedlora.runtime.batched import lockstep as module

    monkeypatch.setattr(module, "share_frozen_base", lambda host, other: True)
    steps, draws = Lockstep(), {}
    for seed in seeds:
        worker = _FakeWorker(seed)
        pool = SimpleNamespace(exp=SimpleNamespace(worker=worker),
                               trainer=_FakeTrainer(worker))

        def body(seed=seed, pool=pool):
            torch.manual_seed(seed)
            mine = draws.setdefault(seed, [])
            mine.append(torch.rand(()).item())
            for _ in range(2):
                assert pool.trainer.train([seed]) == [f"fit {seed}"]
                mine += torch.rand(2).tolist()
            return {}

        steps.add(f"seed {seed}", pool, body)
    assert all(out == {} for out in steps.run().values())
    return draws


def test_each_run_draws_as_if_no_other_run_shared_its_turns(monkeypatch):
    """The default generator is each run's own between turns, and after a shared
    training it is where the trainer leaves that run's (independent value: run alone)."""
    together = _draws_of([0, 1, 2], monkeypatch)
    for seed in (0, 1, 2):
        assert together[seed] == _draws_of([seed], monkeypatch)[seed]
    torch.manual_seed(0)
    first = torch.rand(()).item()
    after = torch.Generator().manual_seed(1000).get_state()
    torch.set_rng_state(after)
    assert together[0][:2] == [first, torch.rand(()).item()]
