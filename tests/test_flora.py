"""FLoRA: exact stacking with mixed ranks, merging into the base, growing downloads,
resume and PEFT export."""

from __future__ import annotations

import json

import pytest
import torch

from sfedlora.config import ConfigError
from sfedlora.core import codecs
from sfedlora.core.ranks import pad, truncate
from sfedlora.methods import Update
from sfedlora.methods.flora import stack
from sfedlora.methods.merging import split_merges
from sfedlora.runtime.simulation import Simulation
from sfedlora.runtime.worker import Worker
from sfedlora.tasks.classification import logits
from tests.conftest import assert_learns

A, B = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"


def test_stacked_product_is_the_weighted_sum_of_scaled_client_products():
    gen = torch.Generator().manual_seed(0)
    ranks, scales, counts = [2, 4, 3], [8.0, 4.0, 16 / 3], [5, 20, 15]
    full = {A: (4, 6), B: (5, 4)}
    updates = []
    for cid, r in enumerate(ranks):  # zero-padded to rank 4, as the server holds them
        t = {n: torch.randn(s, generator=gen) for n, s in full.items()}
        updates.append(Update(cid, counts[cid], pad(truncate(t, r), {n: _spec(s)
                                                                     for n, s in full.items()})))
    p = [n / sum(counts) for n in counts]
    out = stack(updates, p, ranks, scales)
    assert out[A].shape == (sum(ranks), 6) and out[B].shape == (5, sum(ranks))
    expected = sum(pi * g * u.tensors[B].double() @ u.tensors[A].double()
                   for pi, g, u in zip(p, scales, updates, strict=True))
    torch.testing.assert_close(out[B].double() @ out[A].double(), expected, rtol=0, atol=1e-5)


def _spec(shape):
    from sfedlora.core.adapters import TensorSpec

    return TensorSpec(shape, torch.float32)


def _base_weights(worker: Worker) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight.detach().clone()
            for n, m in worker.stage.base.layers.items()}


@pytest.mark.parametrize(("scaling", "gammas"), [
    ([], [2.0, 2.0, 2.0, 2.0]),  # the official code's lora_alpha = 2 * r_i (the default)
    (["lora.scaling=lora", "lora.alpha=16"], [16.0, 8.0, 16 / 3, 4.0]),  # alpha / r_i
])
def test_a_round_merges_exactly_the_weighted_scaled_products(scaling, gammas, tiny_config,
                                                             monkeypatch):
    uploads: dict[int, dict[str, torch.Tensor]] = {}
    real = Worker.fit

    def spy(self, cid, *args, **kwargs):
        fit = real(self, cid, *args, **kwargs)
        uploads[cid] = (fit.num_examples, codecs.decode(fit.upload))
        return fit

    monkeypatch.setattr(Worker, "fit", spy)
    cfg = tiny_config("method=flora", "lora.rank=4", "lora.client_ranks=[1,2,3,4]",
                      "local.lr=0.05", *scaling)
    sim = Simulation(cfg)
    worker = sim.pool.exp.worker
    before = _base_weights(worker)
    sim.run_round(1)
    sim.evaluate()  # brings the model's base up to the last merge
    after = _base_weights(worker)
    total = sum(n for n, _ in uploads.values())
    for layer in before:
        a, b = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        expected = sum(n / total * gammas[c] * t[b].double() @ t[a].double()
                       for c, (n, t) in uploads.items())
        assert expected.abs().max() > 0
        torch.testing.assert_close((after[layer] - before[layer]).double(), expected,
                                   rtol=0, atol=1e-6)
    # each client trained and sent its own rank, at the scale of that rank
    assert [uploads[c][1][f"{layer}.lora_A.default.weight"].shape[0] for c in range(4)] == \
        [1, 2, 3, 4]
    assert [cfg.client_gamma(c) for c in range(4)] == pytest.approx(gammas, rel=1e-12)


def test_downloads_carry_every_unseen_rounds_stacked_factors_capped_at_dense(
        tiny_config, monkeypatch):
    """A download carries every merge the client has not received: the stacked factors
    of each, or, where those are larger than the dense matrices they add up to, one
    refresh holding ``sum_s B_s A_s`` over every merge so far (checked against the
    server's record by hand)."""
    downloads: dict[tuple[int, int], bytes] = {}
    real = Worker.fit

    def spy(self, cid, state, download, data, round_idx):
        downloads[round_idx, cid] = download
        return real(self, cid, state, download, data, round_idx)

    monkeypatch.setattr(Worker, "fit", spy)
    sim = Simulation(tiny_config("method=flora", "lora.client_ranks=[2,4]",
                                 "clients.per_round=2", "rounds=5"))
    seen: dict[int, int] = {}
    kinds = set()
    for r in range(1, 6):
        rec = sim.run_round(r).metrics
        record = sim.server.stage.merges  # merge number -> stacked factors
        for cid in rec["clients"]:
            shared, merges = split_merges(codecs.decode(downloads[r, cid]))
            assert shared and not any(".lora_" in n for n in shared)  # only the head
            unseen = list(range(seen.get(cid, 0) + 1, r))
            stacked = sum(t.numel() * 4 for s in unseen for t in record[s].values())
            dense = sum(record[1][n.replace("_A.", "_B.")].shape[0] * a.shape[1] * 4
                        for n, a in record[1].items() if ".lora_A." in n)
            if stacked <= dense:
                kinds.add("factors")
                assert sorted(merges) == unseen
                for m in merges.values():  # stacked rank = the sum of that round's ranks
                    a = next(t for n, t in m.items() if ".lora_A." in n)
                    assert a.shape[0] in (4, 6, 8)
            else:
                kinds.add("refresh")
                assert list(merges) == [(1, r - 1)]
                (refresh,) = merges.values()
                for name, total in refresh.items():
                    b_name = name.replace(".lora_A.", ".lora_B.")
                    want = sum(record[s][b_name].double() @ record[s][name].double()
                               for s in range(1, r))
                    torch.testing.assert_close(total.double(), want, rtol=0, atol=1e-6)
                assert sum(t.numel() * 4 for t in refresh.values()) == dense
            seen[cid] = r - 1
    assert kinds == {"factors", "refresh"}  # both kinds of download were checked
    # the download of a round grows with the clients merged since the client last came
    first = [len(downloads[k]) for k in downloads if k[0] == 1]
    assert min(len(d) for k, d in downloads.items() if k[0] > 1) > max(first)


def test_resume_is_bit_identical(tiny_config, tmp_path):
    full = Simulation(tiny_config("method=flora", "lora.client_ranks=[2,4]", "rounds=3",
                                  f"output_dir={tmp_path / 'full'}"))
    full.run()
    part = Simulation(tiny_config("method=flora", "lora.client_ranks=[2,4]", "rounds=3",
                                  f"output_dir={tmp_path / 'part'}"))
    part.cfg = part.cfg.model_copy(update={"rounds": 3})
    from sfedlora.runtime.results import RunDir

    run_dir = RunDir(tmp_path / "part")
    run_dir.start(part.cfg, part.info.label_names)
    for r in (1, 2):
        rec = part.run_round(r)
        if part.should_evaluate(r):
            rec.metrics.update(part.evaluate())
        run_dir.log_metrics(rec.metrics)
        part.done_rounds = r
    run_dir.save_checkpoint(part.checkpoint(2, 0.0, run_dir.metrics_lines()))
    run_dir.close()
    resumed = Simulation.resume(tmp_path / "part")
    assert resumed.pool.exp.worker.stage.base.round == 0  # a fresh process: pretrained weights
    resumed.run()
    a = (tmp_path / "full/metrics.jsonl").read_text()
    b = (tmp_path / "part/metrics.jsonl").read_text()
    assert a == b


def test_exported_adapter_reproduces_the_merged_model_in_peft(tiny_config, tmp_path,
                                                              peft_logits):
    sim = Simulation(tiny_config("method=flora", "lora.client_ranks=[2,4]", "rounds=2",
                                 "local.lr=0.05"))
    sim.run()
    ours = logits(sim.pool.exp.worker, sim.global_adapter(), sim.pool.exp.global_test)
    out = tmp_path / "run/adapters/global"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 24  # 2 rounds x (2+2+4+4), below 32 dims
    labels = json.loads((tmp_path / "run/labels.json").read_text())
    theirs = peft_logits(out, labels, sim.pool.exp)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_flora_learns_the_tiny_task(encoder_config, tmp_path):
    # gamma = 2 (the official scale) instead of the others' 16/4: a 4x learning rate
    cfg = encoder_config("method=flora", "lora.client_ranks=[1,2,4]", "local.lr=0.02")
    Simulation(cfg).run()
    assert_learns(cfg, tmp_path / "run")


@pytest.mark.parametrize("override,match", [
    ("comm.down.bits=8", "comm.down"),
    ("comm.up.delta=true", "comm.up.delta"),
    ("server.optimizer=adamw", "server.optimizer"),
    ("server.aggregation=median", "server.aggregation"),
    ("local.keep_optimizer_state=true", "keep_optimizer_state"),
    ("lora.a_init=shared", "fresh A every round"),
])
def test_settings_that_break_merging_are_refused(override, match, tiny_config):
    with pytest.raises(ConfigError, match=match):
        tiny_config("method=flora", override)


@pytest.mark.parametrize("args", [("method=flora", "lora.client_ranks=[2,4]"),
                                  ("method=fedex", "clients.num=3")])
def test_a_skipped_round_leaves_no_gap_in_the_merges(tiny_config, args):
    """Round 2 of a merging method is skipped (every sampled client drops before
    training): the run goes on, and ends where a run that never had round 2 ends. The
    merges are then numbered 1, 2, though they come from rounds 1 and 3. Before, the
    merge history had no entry for round 2 and every later download raised MergeGap."""
    skipped = Simulation(tiny_config(*args, "rounds=3"))
    fit = skipped.pool.fit
    skipped.pool.fit = lambda r, d, then=None: {} if r == 2 else fit(r, d, then)
    never = Simulation(tiny_config(*args, "rounds=3"))
    for r in (1, 2, 3):
        record = skipped.run_round(r)
        if r != 2:
            never.run_round(r)
    assert record.metrics["aggregated"]  # round 3
    assert sorted(skipped.server.stage.merges) == [1, 2]
    for number in (1, 2):
        got, want = skipped.server.stage.merges[number], never.server.stage.merges[number]
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want)
    assert all(torch.equal(skipped.server.state[n], never.server.state[n])
               for n in never.server.state)
    for cid in range(2):  # clients' scored adapters agree too (base weights merged alike)
        a, b = skipped.client_adapter(cid), never.client_adapter(cid)
        assert all(torch.equal(a[n], b[n]) for n in b)


def test_a_refresh_brings_a_model_at_any_round_to_the_merged_weights(tiny_config):
    """A model behind by several merges takes the refresh when it lacks their factors
    (its base becomes pretrained + the sum, computed here by hand) and the factors
    when it has them; either way bit-identically to a model that applied every merge
    in turn, so processes that caught up differently still agree exactly."""
    import copy
    from types import SimpleNamespace

    from sfedlora.core.stores import MemoryStore
    from sfedlora.methods.merging import BaseMerger
    from sfedlora.methods.merging.factors import BaseWeights

    sim = Simulation(tiny_config("method=fedex", "clients.num=4", "clients.per_round=2",
                                 "rounds=4"))
    for r in range(1, 5):
        sim.run_round(r)
    history = sim.server.stage
    refresh = history.catch_up(0)
    assert list(split_merges(refresh)[1]) == [(1, 4)]  # the factors are the larger

    def fresh_merger(store):
        """A merger on a model holding the pretrained weights (base at round 0)."""
        model = copy.deepcopy(sim.pool.exp.worker.model)
        base = BaseWeights(model)
        pretrained = sim.pool.exp.worker.stage.base.pretrained
        for name, layer in base.layers.items():
            layer.get_base_layer().weight.data.copy_(pretrained[name])
        merger = BaseMerger(sim.cfg, SimpleNamespace(model=model, shared_store=store))
        return merger, pretrained

    def weights(merger):
        return {n: m.get_base_layer().weight.detach().clone()
                for n, m in merger.base.layers.items()}

    def factors(rounds):
        return {f"merge.{r}.{n}": t for r in rounds for n, t in history.merges[r].items()}

    sequential, pretrained = fresh_merger(MemoryStore())
    for r in range(1, 5):
        sequential.receive(factors([r]))
    for behind_at in (0, 2):  # a model still pretrained, and one at merge 2
        merger, _ = fresh_merger(MemoryStore())
        merger.receive(factors(range(1, behind_at + 1)))
        assert merger.base.round == behind_at
        merger.receive(refresh)
        assert merger.base.round == 4
        for name, w in weights(merger).items():
            b_name = f"{name}.lora_B.default.weight"
            a_name = f"{name}.lora_A.default.weight"
            total = sum(history.merges[s][b_name].double() @ history.merges[s][a_name].double()
                        for s in range(1, 5))
            assert total.abs().max() > 1e-3  # the residuals are not vanishingly small
            torch.testing.assert_close(w.double(), pretrained[name].double() + total,
                                       rtol=0, atol=1e-6)
            assert torch.equal(w, weights(sequential)[name])
    # a process whose store holds every merge's factors ignores the refresh: exact
    store = MemoryStore()
    for r in range(1, 5):
        store.put(f"flora-merge-{r}", history.merges[r])
    merger, _ = fresh_merger(store)
    merger.receive(refresh)
    for name, w in weights(merger).items():
        assert torch.equal(w, weights(sequential)[name])
