"""TSFA (issue 18): the drift-plus-penalty choice, the virtual queue, the run that follows
them, the offline rank plan, and the settings it refuses."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
import torch

from sfedlora.config import ConfigError
from sfedlora.methods.soft.schedule import (
    drift_plus_penalty,
    dropped_share,
    mean_dropped_share,
    next_queue,
    upload_values,
)
from sfedlora.runtime.simulation import Simulation

WIRELESS = ("method=tsfa", "network.model=wireless", "network.allocation=min_max")


def test_dropped_share_is_the_mass_outside_the_top_components():
    assert dropped_share([4.0, 1.0, 3.0, 2.0], 0.5) == 3 / 10  # keeps 4 and 3
    assert dropped_share([4.0, 1.0, 3.0, 2.0], 0.3) == 3 / 10  # ceil(1.2) = 2 kept
    assert dropped_share([4.0, 1.0, 3.0, 2.0], 0.25) == 6 / 10  # keeps 4
    assert dropped_share([4.0, 1.0, 3.0, 2.0], 1.0) == 0.0
    assert dropped_share([0.0, 0.0], 0.5) == 0.0
    assert mean_dropped_share([[1.0, 1.0], [3.0, 1.0]], 0.5) == (0.5 + 0.25) / 2


def test_drift_plus_penalty_equals_a_brute_force_minimum():
    rng = random.Random(0)
    for _ in range(500):
        choices = sorted(rng.sample([0.1, 0.2, 0.25, 0.5, 0.75, 1.0], rng.randint(1, 6)))
        e = {k: rng.random() for k in choices}
        t = {k: rng.uniform(0.1, 5) for k in choices}
        v, q = rng.choice([0.0, 0.5, 3.0]), rng.choice([0.0, 0.2, 7.0])
        best, objective = drift_plus_penalty(choices, e.__getitem__, t.__getitem__, v, q)
        brute = min(v * e[k] + q * t[k] for k in choices)
        assert objective[best] == brute
        assert best == max(k for k in choices if objective[k] == brute)  # ties: larger keep


def test_the_virtual_queue_follows_its_recursion():
    latencies, budget, q = [3.0, 0.5, 0.5, 4.0, 0.0, 0.0], 1.0, 0.0
    expected = [2.0, 1.5, 1.0, 4.0, 3.0, 2.0]
    for t, want in zip(latencies, expected, strict=True):
        q = next_queue(q, t, budget)
        assert q == want
    assert next_queue(0.5, 0.2, 1.0) == 0.0


def test_upload_values_count_whole_components_and_the_head():
    layers = [(8, 100), (4, 50)]
    assert upload_values(0.25, layers, always=7) == 7 + 2 * 100 + 1 * 50
    assert upload_values(1.0, layers, always=0) == 8 * 100 + 4 * 50


@pytest.fixture(scope="module")
def tsfa_run(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """A TSFA run whose budget binds: the keep ratio must fall below 1 (shared by the
    module's tests)."""
    from sfedlora.config import load_config
    from tests.conftest import tiny_base

    out = tmp_path_factory.mktemp("tsfa") / "run"
    cfg = load_config(None, [*tiny_base(tiny_model_dir, tiny_data_file, out), *WIRELESS,
                             "rounds=6", "clients.per_round=3", "network.bandwidth_hz=2e3",
                             "options.latency_budget_s=3", "options.keep_choices=[0.25,0.5,1.0]",
                             "options.v=0.01"])
    sim = Simulation(cfg)
    return cfg, [sim.run_round(r).metrics for r in range(1, cfg.rounds + 1)]


def test_a_run_logs_its_keep_ratio_queue_and_latency_and_follows_the_recursion(tsfa_run):
    cfg, rounds = tsfa_run
    budget = cfg.options["latency_budget_s"]
    assert rounds[0]["tsfa_keep"] == 1.0 and rounds[0]["tsfa_queue"] == 0.0  # no profile yet
    for before, after in itertools.pairwise(rounds):
        assert after["tsfa_queue"] == max(0.0, before["tsfa_queue"]
                                          + before["latency_seconds"] - budget)
    for m in rounds[1:]:
        assert m["tsfa_keep"] in cfg.options["keep_choices"]
        assert math.isfinite(m["tsfa_predicted_latency_seconds"])
    keeps = [m["tsfa_keep"] for m in rounds]
    assert min(keeps) < 1.0  # the queue grew and the schedule sparsified


def test_clients_send_the_keep_ratio_the_server_chose(tsfa_run):
    _, rounds = tsfa_run
    per_keep = {}
    for m in rounds:
        per_keep.setdefault(m["tsfa_keep"], []).extend(m["bytes_up_per_client"].values())
    sizes = sorted((k, max(v)) for k, v in per_keep.items())
    assert len(sizes) >= 2
    for (_, small), (_, large) in itertools.pairwise(sizes):
        assert small < large  # a smaller keep ratio: a smaller upload, every client


def test_the_predicted_latency_is_the_realised_one_once_tokens_are_known(tsfa_run):
    # payload sizes are those of payloads of the same shape encoded with the run's
    # codecs, exact but for the few bytes by which the deflated layout and index move
    # with the components chosen (0.4% of the latency here); the tokens are last
    # round's mean, the same every round here (every batch is padded to
    # model.max_length)
    _, rounds = tsfa_run
    for m in rounds[1:]:
        assert m["tsfa_predicted_latency_seconds"] == pytest.approx(m["latency_seconds"],
                                                                    rel=0.05)


@pytest.mark.parametrize(("overrides", "field"), [
    (("method=tsfa",), "network.model"),
    (("method=tsfa", "network.model=wireless"), "network.allocation"),
    ((*WIRELESS, "options.keep_choices=[0, 0.5]"), "options.keep_choices"),
    ((*WIRELESS, "options.keep_choices=[0.5, 1.5]"), "options.keep_choices"),
    ((*WIRELESS, "options.latency_budget_s=-1"), "options.latency_budget_s"),
    ((*WIRELESS, "network.tx_power_dbm=-40"), "network.tx_power_dbm"),
    ((*WIRELESS, "network.bandwidth_hz=-5"), "network.bandwidth_hz"),
    (("method=soft", "options.keep=1.5"), "options.keep: Input should be less than or equal to 1"),
    (("network.bandwidth_hz=1e6",), "network.bandwidth_hz"),  # with network.model=none
])
def test_bad_settings_are_refused_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        tiny_config(*overrides)


def test_a_budget_no_client_can_meet_is_refused_before_the_run(tiny_config):
    cfg = tiny_config(*WIRELESS, "options.latency_budget_s=1e-6")
    with pytest.raises(ConfigError, match=r"options\.latency_budget_s=1e-06 is below"):
        Simulation(cfg)


def test_the_plan_chooses_the_feasible_rank_of_least_bound_and_the_run_checks_it(
        tiny_config, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    """Through the command TSFA owns (``sfedlora tsfa-plan``, Method.commands)."""
    from sfedlora.cli import main
    from tests.conftest import tiny_base

    path = tmp_path / "plan.json"
    assert main(["tsfa-plan", *tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "run"),
                 *WIRELESS, "options.ranks=[1,2]", "options.pilot_rounds=2",
                 "options.latency_budget_s=100", "rounds=10", "--out", str(path)]) == 0
    plan = json.loads(path.read_text())
    assert f"chosen rank {plan['rank']}" in capsys.readouterr().out
    pilots = {p["rank"]: p for p in plan["pilots"]}
    assert set(pilots) == {1, 2}
    for p in pilots.values():
        assert p["feasible"] and p["variance"] >= 0 and 0 < p["loss_ratio_per_round"] <= 1
        q = p["loss_ratio_per_round"]
        assert p["bound"] == pytest.approx(p["last_loss"] * q ** 8 + p["variance"], rel=1e-12)
    assert plan["rank"] == min(pilots.values(), key=lambda p: (p["bound"], p["rank"]))["rank"]
    other = 3 - plan["rank"]
    with pytest.raises(ConfigError, match=f"chose rank {plan['rank']}"):
        tiny_config(*WIRELESS, f"options.plan={path}", f"lora.rank={other}")
    tiny_config(*WIRELESS, f"options.plan={path}", f"lora.rank={plan['rank']}")  # accepted


def test_an_svd_profile_scores_every_component_so_the_schedule_can_raise_keep(tiny_config):
    """Under options.importance=svd a client's report at keep 1/4 must still say what keep
    1/2 and 1 would add: the singular values of B A (computed here from the product
    itself), not the SVD score within the current keep ratio, which is 0 beyond it and
    made every larger keep ratio look worthless (so a positive queue never raised keep)."""
    from sfedlora.methods.soft.tsfa import IMPORTANCE, KeepChoice

    cfg = tiny_config(*WIRELESS, "options.importance=svd", "lora.rank=4",
                      "options.keep_choices=[0.25,0.5,1.0]", "options.v=10")
    sim = Simulation(cfg)
    stage = sim.pool.exp.worker.stage
    stage.receive(KeepChoice(0).extras())  # the server chose keep 1/4
    assert stage.keep == 0.25
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=gen), torch.randn(16, 4, generator=gen)
    name = "m.l0.q.lora_A.default.weight"
    chosen = stage.choose_upload({name: a, name.replace(".lora_A.", ".lora_B."): b})
    profile = chosen.report[IMPORTANCE]
    want = torch.linalg.svdvals(b.double() @ a.double())[:4]
    assert profile == pytest.approx(want.tolist(), rel=1e-5)
    dropped = [dropped_share(profile, k) for k in (0.25, 0.5, 1.0)]
    assert dropped[0] > dropped[1] > dropped[2] == 0.0
    # with this profile, a queue that is positive but small lets V raise keep above 1/4
    best, _ = drift_plus_penalty([0.25, 0.5, 1.0], lambda k: dropped_share(profile, k),
                                 {0.25: 1.0, 0.5: 1.1, 1.0: 1.3}.__getitem__, v=10,
                                 queue=0.5)
    assert best > 0.25
