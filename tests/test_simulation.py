"""End-to-end behaviour of the in-process runtime on a tiny model."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from sfedlora.core import wire
from sfedlora.methods import Part, part_of
from sfedlora.runtime.simulation import Simulation
from sfedlora.runtime.worker import Worker
from sfedlora.tasks import classification
from tests.conftest import assert_learns


def _messages(monkeypatch):
    """Record the tensor names of every message that is serialised."""
    sent: list[set[str]] = []
    real = wire.encode

    def spy(tensors, meta=None):
        sent.append(set(tensors))
        return real(tensors, meta)

    monkeypatch.setattr(wire, "encode", spy)
    return sent


@pytest.mark.parametrize("method", ["fedsa", "sfed"])
def test_fedsa_family_never_sends_b_or_head(method, tiny_config, monkeypatch):
    sent = _messages(monkeypatch)
    sim = Simulation(tiny_config(f"method={method}", "clients.per_round=3"))
    sim.run()
    names = set().union(*sent)
    assert names, "no message was sent"
    assert {part_of(n) for n in names} == {Part.A}


def test_ffa_a_is_bit_identical_on_every_client_forever(tiny_config):
    sim = Simulation(tiny_config("method=ffa", "rounds=4"))
    a_names = sim.pool.exp.worker.slots.names({Part.A})
    init = {n: sim.pool.exp.worker.shared_init[n].clone() for n in a_names}
    for r in range(1, 5):
        sim.run_round(r)
        for cid in range(sim.cfg.clients.num):
            adapter = sim.client_adapter(cid)
            assert all(torch.equal(adapter[n], init[n]) for n in a_names)
        # and what the model holds after the last client's training
        assert all(torch.equal(sim.pool.exp.worker.slots.params[n], init[n]) for n in a_names)


def test_rolora_uploads_b_first_then_a(tiny_config, monkeypatch):
    sent = _messages(monkeypatch)
    sim = Simulation(tiny_config("method=rolora", "clients.num=2"))
    uploads = []
    for r in range(1, 5):
        before = len(sent)
        sim.run_round(r)
        ups = sent[before + 1:]  # the first message of a round is the download
        uploads.append({part_of(n) for names in ups for n in names})
    assert uploads == [{Part.B, Part.HEAD}, {Part.A, Part.HEAD}] * 2


def test_same_config_and_seed_give_bit_identical_metrics(tiny_config, tmp_path):
    outs = []
    for i in range(2):
        cfg = tiny_config("method=sfed", "clients.per_round=3", f"output_dir={tmp_path}/r{i}")
        Simulation(cfg).run()
        outs.append((tmp_path / f"r{i}" / "metrics.jsonl").read_bytes())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 3


def test_run_directory_contract(tiny_config, tmp_path):
    cfg = tiny_config("method=fedit", "eval.every=2", "rounds=3")
    summary = Simulation(cfg).run()
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]  # a line for every round,
    evaluated = [x["round"] for x in lines if "personalized_accuracy" in x]
    assert evaluated == [2, 3]  # the evaluation every 2 rounds, plus the last
    for key in ("round", "train_loss", "personalized_accuracy", "global_accuracy",
                "bytes_up", "bytes_down"):
        assert key in lines[-1] and summary[key] == lines[-1][key]
    assert summary["wall_seconds"] > 0
    assert (out / "config.yaml").is_file() and (out / "adapters/global").is_dir()
    assert len((out / "timings.jsonl").read_text().splitlines()) == 3


def test_byte_counts_are_real_payload_lengths(tiny_config):
    sim = Simulation(tiny_config("method=fedit"))
    rec = sim.run_round(1).metrics
    shapes = [s.shape for s in sim.pool.exp.worker.slots.spec().values()]
    payload_floats = sum(torch.Size(s).numel() for s in shapes)
    for n in rec["bytes_up_per_client"].values():
        # float32 payload plus a safetensors header (JSON, a few hundred bytes per tensor)
        assert payload_floats * 4 < n < payload_floats * 4 + 200 * len(shapes) + 200
    assert rec["bytes_up"] == sum(rec["bytes_up_per_client"].values())


def test_unsampled_clients_keep_their_private_state(tiny_config):
    sim = Simulation(tiny_config("method=fedsa", "clients.per_round=2", "rounds=4"))
    seen: dict[int, dict] = {}
    for r in range(1, 5):
        sampled = set(sim.run_round(r).metrics["clients"])
        for cid, state in sim.pool.states.items():
            if cid in seen and cid not in sampled:
                assert all(torch.equal(state.private[k], v) for k, v in seen[cid].items())
            if state.private:
                seen[cid] = {k: v.clone() for k, v in state.private.items()}
    assert len(seen) >= 3  # several clients took part and kept B and head


def test_optimizer_state_kept_across_rounds_when_configured(tiny_config):
    sim = Simulation(tiny_config("method=fedsa", "local.keep_optimizer_state=true"))
    sim.run_round(1)
    state = sim.pool.states[0].optimizer
    steps = [s["step"].item() for s in state["state"].values()]
    sim.run_round(2)
    steps2 = [s["step"].item() for s in sim.pool.states[0].optimizer["state"].values()]
    assert steps2 == [s + 3 for s in steps]  # AdamW continued, 3 more local steps


def test_one_model_instance_per_process(tiny_config, monkeypatch):
    calls = []
    real = classification.load_base_model
    monkeypatch.setattr(classification, "load_base_model",
                        lambda *a: calls.append(1) or real(*a))
    Simulation(tiny_config("method=sfed", "rounds=2")).run()
    assert len(calls) == 1


@pytest.mark.parametrize("overrides", [
    ["method=fedit"], ["method=ffa", "local.lr=0.01"], ["method=fedsa"], ["method=rolora"],
    ["method=sfed"],
])
def test_every_method_learns_the_tiny_task(overrides, encoder_config, tmp_path):
    cfg = encoder_config(*overrides)  # FFA trains B alone: twice the learning rate
    Simulation(cfg).run()
    assert_learns(cfg, tmp_path / "run")


def test_bad_update_is_rejected_and_the_round_goes_on(tiny_config, caplog):
    sim = Simulation(tiny_config("method=fedit", "clients.num=3"))
    worker = sim.pool.exp.worker
    real_fit = worker.fit

    def poisoned(cid, *args):
        result = real_fit(cid, *args)
        if cid == 1:
            tensors = wire.decode(result.upload)
            name = next(iter(tensors))
            tensors[name] = torch.full_like(tensors[name], float("nan"))
            return type(result)(**{**result.__dict__, "upload": wire.encode(tensors)})
        return result

    worker.fit = poisoned
    rec = sim.run_round(1).metrics
    assert rec["aggregated"] and "non-finite" in rec["rejected"]["1"]
    assert all(torch.isfinite(t).all() for t in sim.server.state.values())
    assert "rejected update of client 1" in caplog.text


def test_evaluation_off_still_summarises_training(tiny_config, tmp_path):
    summary = Simulation(tiny_config("eval.every=0", "rounds=2")).run()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]  # training figures, every round
    assert not any("personalized_accuracy" in x for x in lines)
    assert summary["round"] == 2 and summary["train_loss"] > 0
    assert summary["personalized_accuracy"] is None and summary["bytes_up_total"] > 0


def test_global_metrics_off_skips_the_global_test_set(tiny_config, monkeypatch):
    sim = Simulation(tiny_config("method=fedsa", "eval.global_metrics=false", "rounds=1"))
    sim.run_round(1)
    scored = []
    real = classification.evaluate
    monkeypatch.setattr(classification, "evaluate",
                        lambda w, t, data: scored.append(data) or real(w, t, data))
    metrics = sim.evaluate()
    assert metrics["global_accuracy"] is None and metrics["global_loss"] is None
    assert metrics["personalized_accuracy"] > 0 and metrics["adapter_output_norm"] > 0
    assert all(data is not sim.pool.exp.global_test for data in scored) and len(scored) == 4


@pytest.mark.parametrize("method", ["fedsa", "sfed"])
def test_a_returning_client_starts_from_exactly_the_b_and_head_it_kept(method, tiny_config,
                                                                       monkeypatch):
    """Per-client B, not the 'relay' of FedSA's public code (one model object passing B
    from client to client): whenever a client trains again, its B and head at the first
    step are bit for bit what it held at the end of its previous round."""
    starts, ends = {}, {}
    real_train, real_fit = Worker._train, Worker.fit

    def train(self, run, *rest):  # the adapter on the model as the local steps begin
        starts[run.cid, run.round_idx] = self.slots.snapshot({Part.B, Part.HEAD})
        return real_train(self, run, *rest)

    def fit(self, cid, state, download, data, round_idx):
        out = real_fit(self, cid, state, download, data, round_idx)
        ends[cid, round_idx] = {n: t.clone() for n, t in state.private.items()}
        return out

    monkeypatch.setattr(Worker, "_train", train)
    monkeypatch.setattr(Worker, "fit", fit)
    sim = Simulation(tiny_config(f"method={method}", "clients.per_round=2", "rounds=5"))
    initial = sim.pool.exp.worker.shared_init
    for r in range(1, 6):
        sim.run_round(r)
    returns = 0
    for cid in range(4):
        rounds = sorted(r for c, r in starts if c == cid)
        first = starts[cid, rounds[0]]
        assert all(torch.equal(first[n], initial[n]) for n in first)  # B zero, head as loaded
        for prev, nxt in itertools.pairwise(rounds):
            kept, begun = ends[cid, prev], starts[cid, nxt]
            assert set(kept) == set(begun)
            assert all(torch.equal(begun[n], kept[n]) for n in kept)
            returns += 1
    assert returns >= 3  # the check ran on clients that came back, some after a gap


def test_independent_a_draws_differ_and_their_first_average_shrinks_by_sqrt_n(tiny_config,
                                                                              monkeypatch):
    """sfed's default a_init=independent: each client's round-1 A is its own draw, so the
    first average has about 1/sqrt(N) of their norm (the loss the sqrt(N) factor undoes)."""
    starts = {}
    real_train = Worker._train

    def train(self, run, *rest):
        starts[run.cid] = self.slots.snapshot({Part.A})
        return real_train(self, run, *rest)

    monkeypatch.setattr(Worker, "_train", train)
    n = 4
    sim = Simulation(tiny_config("method=sfed", "local.lr=1e-4", f"clients.num={n}"))
    sim.run_round(1)
    names = sorted(starts[0])
    flat = {c: torch.cat([starts[c][k].flatten() for k in names]) for c in range(n)}
    for c in range(1, n):
        assert not torch.allclose(flat[0], flat[c])
    mean_norm = torch.stack([flat[c].norm() for c in range(n)]).mean()
    averaged = torch.cat([sim.server.state[k].flatten() for k in names]).norm()
    ratio = float(averaged / mean_norm) * n**0.5  # 1 for independent draws
    assert 0.9 < ratio < 1.1, ratio
    shared = Simulation(tiny_config("method=sfed", "lora.a_init=shared", "local.lr=1e-4"))
    shared.run_round(1)
    same = torch.cat([shared.server.state[k].flatten() for k in names]).norm()
    start = torch.cat([shared.pool.exp.worker.shared_init[k].flatten() for k in names]).norm()
    assert 0.99 < float(same / start) < 1.01  # a shared A does not shrink


def test_classification_metrics_include_balanced_accuracy_spread_baseline_and_norm_a(
        tiny_config, tmp_path):
    """Each figure recomputed from the run's own adapters and data."""
    import numpy as np

    sim = Simulation(tiny_config("method=sfed", "rounds=2", "clients.num=3"))
    rec = sim.run_round(1).metrics
    a_names = [n for n in sim.server.state if part_of(n) is Part.A]
    expected_norm = float(sum(sim.server.state[n].double().pow(2).sum() for n in a_names))
    assert rec["norm_A_mean"] == pytest.approx(expected_norm**0.5, rel=1e-12)
    metrics = sim.evaluate()
    exp, worker = sim.pool.exp, sim.pool.exp.worker
    losses, balanced, majority = [], [], []
    for cid in range(3):
        logits = classification.logits(worker, sim.client_adapter(cid), exp.client_test[cid])
        labels = torch.from_numpy(exp.client_test[cid].labels)
        losses.append(torch.nn.functional.cross_entropy(logits, labels).item())
        pred = logits.argmax(-1)
        balanced.append(np.mean([float((pred[labels == c] == c).float().mean())
                                 for c in labels.unique()]))
        top = np.bincount(exp.client_train[cid].labels).argmax()
        majority.append(float(np.mean(exp.client_test[cid].labels == top)))
    assert metrics["personalized_loss_std"] == pytest.approx(np.std(losses), rel=1e-5)
    assert metrics["personalized_loss_min"] == pytest.approx(min(losses), rel=1e-5)
    assert metrics["personalized_loss_max"] == pytest.approx(max(losses), rel=1e-5)
    assert metrics["personalized_balanced_accuracy"] == pytest.approx(np.mean(balanced))
    assert metrics["majority_baseline_accuracy"] == pytest.approx(np.mean(majority))


def test_personalized_accuracy_is_the_mean_over_clients_of_their_own_accuracy(tiny_config):
    """Each evaluated client's accuracy recomputed here from its adapter's predictions
    (model forward, argmax, compare) and averaged with equal weight per client, as the
    README promises; the pooled accuracy (over examples) is the weighted metric."""
    sim = Simulation(tiny_config("method=fedsa", "rounds=1", "data.partition=dirichlet",
                                 "data.dirichlet_alpha=0.3"))
    sim.run_round(1)
    metrics = sim.evaluate()
    exp = sim.pool.exp
    per_client, right, count = [], 0, 0
    for cid in sim.evaluator.scored:
        test = exp.client_test[cid]
        if not len(test):
            continue
        exp.worker.slots.load(sim.client_adapter(cid))
        exp.worker.model.eval()
        with torch.no_grad():
            batch = exp.worker.batch(test, list(range(len(test))), labels=False)
            predicted = exp.worker.model(**batch).logits.argmax(-1).cpu()
        hits = (predicted == torch.as_tensor(test.labels)).sum().item()
        per_client.append(hits / len(test))
        right, count = right + hits, count + len(test)
    assert len({len(exp.client_test[c]) for c in sim.evaluator.scored}) > 1  # unequal
    assert metrics["personalized_accuracy"] == pytest.approx(
        sum(per_client) / len(per_client), abs=1e-12)
    assert metrics["personalized_accuracy_weighted"] == pytest.approx(right / count,
                                                                      abs=1e-12)
