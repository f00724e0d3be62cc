"""FedEx-LoRA, FlexLoRA, FedSVD and the central reference (issue 20): each method's
server step equals its formula, computed here independently from the clients' uploads."""

from __future__ import annotations

import pytest
import torch

from sfedlora.config import ConfigError
from sfedlora.methods import Part
from sfedlora.runtime.simulation import Simulation


def _spy_updates(sim) -> dict[int, list]:
    """The accepted updates of every round, as the server combined them."""
    seen: dict[int, list] = {}
    stage, original = sim.server.stage, sim.server.stage.after_combine

    def spy(round_idx, state, updates):
        seen[round_idx] = list(updates)
        return original(round_idx, state, updates)

    stage.after_combine = spy
    return seen


def _pairs(tensors):
    return [(n, n.replace(".lora_A.", ".lora_B.")) for n in tensors if ".lora_A." in n]


def _products(updates, weights):
    """Per layer (by its lora_A name), sum_i p_i B_i A_i in float64."""
    return {a: sum(p * (u.tensors[b].double() @ u.tensors[a].double())
                   for p, u in zip(weights, updates, strict=True))
            for a, b in _pairs(updates[0].tensors)}


def _mean(updates, weights, name):
    return sum(p * u.tensors[name].double() for p, u in zip(weights, updates, strict=True))


def _layer(name: str) -> str:
    return name.split(".lora_A.")[0]


def test_fedex_merged_model_is_the_exact_average_of_the_clients_models(tiny_config):
    sim = Simulation(tiny_config("method=fedex", "clients.num=3", "rounds=2",
                                 "local.lr=0.05"))
    exp, gamma = sim.pool.exp, sim.cfg.gamma
    base = exp.worker.stage.base  # the base weights the clients merge into
    w0 = {n: m.get_base_layer().weight.detach().double().clone()
          for n, m in base.layers.items()}
    seen = _spy_updates(sim)
    sim.run_round(1)
    sim.run_round(2)
    # the residual of round 1, from the round-1 uploads alone
    u1, u2 = seen[1], seen[2]
    p1, p2 = sim.method.weights(u1), sim.method.weights(u2)
    exact1 = _products(u1, p1)
    exact2 = _products(u2, p2)
    # every client's model after round 2 is w0 + residual_1 + gamma B_i A_i
    shared, extras = sim.server.evaluation_request(0)
    exp.adapter(None, None, shared, extras)  # the worker's base catches up to round 2
    assert base.round == 2
    state = sim.server.state
    worst = 0.0
    for a, b in _pairs(state):
        layer = _layer(a)
        residual1 = gamma * (exact1[a] - _mean(u1, p1, b) @ _mean(u1, p1, a))
        average = w0[layer] + residual1 + gamma * exact2[a]
        ours = (base.layers[layer].get_base_layer().weight.double()
                + gamma * state[b].double() @ state[a].double())
        worst = max(worst, float((ours - average).abs().max()))
    assert float(sum(exact2[a].abs().sum() for a in exact2)) > 0
    assert worst < 1e-6, worst


def test_fedex_export_is_the_whole_change_as_one_lora(tiny_config):
    sim = Simulation(tiny_config("method=fedex", "clients.num=3", "rounds=2",
                                 "clients.per_round=2"))
    exp = sim.pool.exp
    base = exp.worker.stage.base  # the base weights the clients merge into
    w0 = {n: m.get_base_layer().weight.detach().double().clone()
          for n, m in base.layers.items()}
    seen = _spy_updates(sim)
    sim.run_round(1)
    sim.run_round(2)
    shared, extras = sim.server.evaluation_request(0)
    exp.adapter(None, None, shared, extras)
    factors, _ = sim.server.stage.export_lora(sim.server.state)
    state, gamma = sim.server.state, sim.cfg.gamma
    u1, u2 = seen[1], seen[2]
    p1, p2 = sim.method.weights(u1), sim.method.weights(u2)
    for a, b in _pairs(state):
        layer = _layer(a)
        total = (base.layers[layer].get_base_layer().weight.double() - w0[layer]
                 + gamma * state[b].double() @ state[a].double())
        exported = factors[b].double() @ factors[a].double()
        assert torch.allclose(exported, total, rtol=0, atol=1e-6)
        # and from the uploads alone, without the merge code: each round adds the exact
        # mean of its clients' gamma B_i A_i and takes back what the round before had
        # put in the factors (gamma times the mean B times the mean A)
        by_formula = gamma * (_products(u1, p1)[a] + _products(u2, p2)[a]
                              - _mean(u1, p1, b) @ _mean(u1, p1, a))
        assert torch.allclose(exported, by_formula, rtol=0, atol=1e-6)


def test_flexlora_downloads_are_the_truncated_svd_of_the_weighted_sum(tiny_config):
    sim = Simulation(tiny_config("method=flexlora", "clients.num=3",
                                 "lora.client_ranks=[1,2,4]", "rounds=1", "local.lr=0.05"))
    seen = _spy_updates(sim)
    sim.run_round(1)
    updates = seen[1]
    product = _products(updates, sim.method.weights(updates))
    from sfedlora.core import codecs

    for cid, rank in enumerate((1, 2, 4)):
        got = codecs.decode(sim.server.download(cid))
        for a, b in _pairs(product):
            assert got[a].shape[0] == rank and got[b].shape[1] == rank
            u, s, vh = torch.linalg.svd(product[a])
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young
            ours = got[b].double() @ got[a].double()
            assert torch.allclose(ours, best, rtol=0, atol=1e-6)
            eye = torch.eye(rank, dtype=torch.float64)
            assert torch.allclose(got[a].double() @ got[a].double().T, eye, atol=1e-5)


def test_fedsvd_refactorises_the_mean_b_times_the_old_a(tiny_config):
    sim = Simulation(tiny_config("method=fedsvd", "clients.num=3", "rounds=2",
                                 "local.lr=0.05"))
    seen = _spy_updates(sim)
    for r in (1, 2):
        old = dict(sim.server.state)
        sim.run_round(r)
        updates, new = seen[r], sim.server.state
        assert not any(".lora_A." in n for n in updates[0].tensors)  # A is never sent
        weights = sim.method.weights(updates)
        for a, b in _pairs(old):
            target = _mean(updates, weights, b) @ old[a].double()
            assert float(target.abs().max()) > 0
            assert torch.allclose(new[b].double() @ new[a].double(), target, rtol=0,
                                  atol=1e-5)
            eye = torch.eye(new[a].shape[0], dtype=torch.float64)
            assert torch.allclose(new[a].double() @ new[a].double().T, eye, rtol=0,
                                  atol=1e-5)


@pytest.mark.parametrize("train_head", [True, False])
def test_fedsvd_trains_the_head_unless_told_to_freeze_it(tiny_config, train_head):
    """options.train_head=false (the official code): the head is neither trained nor
    sent, and the server's head stays at its seeded initialisation; by default it is
    sent with B and averaged."""
    from sfedlora.methods import part_of

    sim = Simulation(tiny_config("method=fedsvd", "clients.num=3", "rounds=2",
                                 "local.lr=0.05", f"options.train_head={train_head}"))
    seen = _spy_updates(sim)
    heads = [n for n in sim.server.state if part_of(n) is Part.HEAD]
    start = {n: sim.server.state[n].clone() for n in heads}
    assert heads
    for r in (1, 2):
        sim.run_round(r)
        sent = {part_of(n) for u in seen[r] for n in u.tensors}
        assert sent == ({Part.B, Part.HEAD} if train_head else {Part.B})
    moved = [n for n in heads if not torch.equal(sim.server.state[n], start[n])]
    assert moved == (heads if train_head else [])


def test_central_equals_one_client_training_on_the_pooled_data(tiny_config):
    central = Simulation(tiny_config("method=central", "clients.num=3",
                                     "clients.per_round=2", "rounds=2", "local.steps=2"))
    records = [central.run_round(r).metrics for r in (1, 2)]
    assert all(m["clients"] == [0] for m in records)
    exp = central.pool.exp
    pooled = exp.client_train[0]
    assert len(pooled) == sum(len(s.train) for s in exp.data.clients)
    assert all(len(exp.client_train[c]) == 0 for c in (1, 2))
    # one client, the pooled data, 2 clients x 2 steps per round, the same seed
    alone = Simulation(tiny_config("method=fedit", "clients.num=1", "rounds=2",
                                   "local.steps=4"))
    alone.pool.exp.client_train[0] = pooled
    for r in (1, 2):
        alone.run_round(r)
    ours, theirs = central.global_adapter(), alone.global_adapter()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert not torch.equal(ours[next(n for n in ours if ".lora_B." in n)],
                           torch.zeros_like(ours[next(n for n in ours if ".lora_B." in n)]))
    # every client is scored with the one adapter on its own test part
    metrics = central.evaluate()
    assert metrics["personalized_accuracy"] is not None


@pytest.mark.parametrize(("method", "override", "match"), [
    ("fedex", "server.aggregation=median", "method=fedex does not work"),
    ("fedex", "privacy.enabled=true", "method=fedex does not work"),
    ("flexlora", "privacy.enabled=true", "method=flexlora does not work"),
    ("fedsvd", "server.optimizer=adamw", "method=fedsvd does not work"),
    ("central", "privacy.enabled=true", "method=central does not work"),
])
def test_settings_a_method_cannot_run_with_are_refused(method, override, match,
                                                      tiny_config):
    with pytest.raises(ConfigError, match=match):
        tiny_config(f"method={method}", override)


def test_central_under_epochs_trains_on_as_many_examples_as_the_sampled_clients_hold(
        tiny_config):
    """4 clients, 2 per round, one local epoch: a federated round trains on the sampled
    clients' examples, so central must too (over the whole pool it saw twice that)."""
    from sfedlora.privacy.sampling import sample_clients

    cfg = tiny_config("method=central", "clients.num=4", "clients.per_round=2",
                      "rounds=3", "local.steps=null", "local.epochs=1",
                      "data.partition=dirichlet", "data.dirichlet_alpha=0.5")
    central = Simulation(cfg)
    fit = central.pool.fit
    seen = []
    central.pool.fit = lambda r, d, then=None: seen.append(fit(r, d, then)[0]) or {
        0: seen[-1]}
    splits = central.pool.exp.data.clients
    for r in (1, 2, 3):
        central.run_round(r)
        sampled = sample_clients(4, 2, cfg.seed, r)
        assert seen[-1].num_examples == sum(len(splits[c].train) for c in sampled)
    assert len({f.num_examples for f in seen}) > 1  # the budget follows the sample


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_fedex_averages_as_server_weighting_says(tiny_config, weighting):
    """FedEx-LoRA's official code averages A and B uniformly; ours weights by examples
    unless server.weighting=uniform. Checked against the decoded uploads, with clients
    of unequal size."""
    from sfedlora.core import wire

    sim = Simulation(tiny_config("method=fedex", "clients.num=3", "rounds=1",
                                 "data.partition=dirichlet", "data.dirichlet_alpha=0.3",
                                 f"server.weighting={weighting}"))
    fit, fits = sim.pool.fit, {}
    sim.pool.fit = lambda r, d, then=None: fits.update(fit(r, d, then)) or dict(fits)
    sim.run_round(1)
    sizes = {c: f.num_examples for c, f in fits.items()}
    assert len(set(sizes.values())) > 1
    weights = ({c: 1 / len(sizes) for c in sizes} if weighting == "uniform"
               else {c: n / sum(sizes.values()) for c, n in sizes.items()})
    uploads = {c: wire.decode(f.upload) for c, f in fits.items()}
    for name, value in sim.server.state.items():
        if ".lora_A." in name or ".lora_B." in name:
            by_hand = sum(weights[c] * uploads[c][name].double() for c in uploads)
            assert torch.allclose(value.double(), by_hand, rtol=0, atol=1e-6), name
