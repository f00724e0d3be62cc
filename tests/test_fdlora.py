"""FDLoRA: the personal adapter stays home, is refreshed on schedule, and its fusion
with the global adapter minimises the held-out loss over the grid it is given."""

from __future__ import annotations

import json
import math

import torch

from sfedlora.core import codecs
from sfedlora.methods import Part
from sfedlora.methods.fdlora.fusion import choose_fusion, fuse, personal_adapter
from sfedlora.runtime import worker
from sfedlora.runtime.simulation import Simulation
from tests.conftest import assert_learns


def _run(tiny_config, *overrides):
    return Simulation(tiny_config("method=fdlora", "local.lr=0.05", "local.steps=5",
                                  *overrides))


def test_personal_adapter_is_never_sent_and_refreshes_on_schedule(tiny_config, monkeypatch):
    uploads: list[dict] = []
    real = worker.Worker.fit

    def spy(self, *args, **kwargs):
        fit = real(self, *args, **kwargs)
        uploads.append(codecs.decode(fit.upload))
        return fit

    monkeypatch.setattr(worker.Worker, "fit", spy)
    sim = _run(tiny_config, "options.sync_every=2", "clients.num=3")
    sim.run_round(1)
    first = {c: personal_adapter(s) for c, s in sim.pool.states.items()}
    uploads.clear()
    sim.run_round(2)
    second = {c: personal_adapter(s) for c, s in sim.pool.states.items()}
    sim.run_round(3)  # 3 is not divisible by 2: kept
    for c, st in sim.pool.states.items():
        assert all(torch.equal(personal_adapter(st)[n], second[c][n]) for n in second[c])
        assert any(not torch.equal(second[c][n], first[c][n]) for n in first[c])
    # round 2's messages hold the global adapter; round 1's personal copy is in none
    for message in uploads:
        for c in first:
            assert not any(torch.equal(message[n], first[c][n]) for n in message)


def test_fusion_minimises_the_held_out_loss_over_the_grid(tiny_config):
    sim = _run(tiny_config, "options.grid=[0,0.5,1,1.5]", "rounds=2")
    for r in (1, 2):
        sim.run_round(r)
    w = sim.pool.exp.worker
    sim.server.state = {n: t * 0.5 for n, t in sim.server.state.items()}  # move global
    for cid in range(4):
        own = w.inits.assemble(cid, sim.pool.states[cid], sim.server.received_state(cid))
        personal = personal_adapter(sim.pool.states[cid])
        holdout = sim.pool.exp.client_holdout[cid]
        losses = {(a, b): w.holdout_loss(fuse(own, personal, a, b), holdout)
                  for a in (0, 0.5, 1, 1.5) for b in (0, 0.5, 1, 1.5) if a or b}
        w1, w2, loss = choose_fusion(w, [0, 0.5, 1, 1.5], own, personal, holdout)
        assert loss == min(losses.values()) == losses[(w1, w2)]
        fused = sim.client_adapter(cid)
        assert all(torch.equal(fused[n], w1 * own[n] + w2 * personal[n]) for n in own)


def test_a_batched_run_scores_the_fusion_grid_in_shared_passes(tiny_config, monkeypatch):
    """With clients.parallel=3 the grid's candidates are scored three to a pass, and
    each loss is the one-at-a-time loss (independent path: ``holdout_loss``)."""
    grid = [0, 0.5, 1, 1.5]
    sim = _run(tiny_config, f"options.grid={grid}", "rounds=2", "clients.parallel=3")
    for r in (1, 2):
        sim.run_round(r)
    w = sim.pool.exp.worker
    passes = []
    shared = type(w.task).holdout_losses
    monkeypatch.setattr(type(w.task), "holdout_losses", lambda self, worker, cands, data: (
        passes.append(len(cands)) or shared(self, worker, cands, data)))
    for cid in range(4):
        own = w.inits.assemble(cid, sim.pool.states[cid], sim.server.received_state(cid))
        personal = personal_adapter(sim.pool.states[cid])
        holdout = sim.pool.exp.client_holdout[cid]
        weights = [(a, b) for a in grid for b in grid if a or b]
        alone = [w.holdout_loss(fuse(own, personal, a, b), holdout) for a, b in weights]
        together = w.holdout_losses([fuse(own, personal, a, b) for a, b in weights], holdout)
        assert all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(alone, together,
                                                                   strict=True))
        w1, w2, _ = choose_fusion(w, grid, own, personal, holdout)
        assert (w1, w2) == weights[alone.index(min(alone))]
    assert passes and set(passes) <= {3} | {len(weights) % 3}


def test_causal_lm_candidates_score_in_shared_passes(tiny_lm_config):
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(tiny_lm_config("clients.parallel=2"))
    w = exp.worker
    torch.manual_seed(0)
    candidates = [{n: t + 0.05 * torch.randn_like(t)
                   for n, t in w.slots.snapshot(set(Part)).items()} for _ in range(3)]
    data = exp.client_test[0]
    alone = [w.holdout_loss(c, data) for c in candidates]
    together = w.holdout_losses(candidates, data)
    assert len(set(alone)) == 3
    assert all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(alone, together, strict=True))


def test_fdlora_holds_out_data_learns_and_exports_fused_adapters(encoder_config, tmp_path):
    cfg = encoder_config("method=fdlora", "options.holdout=8")
    sim = Simulation(cfg)
    exp = sim.pool.exp
    for cid, part in enumerate(exp.data.clients):
        total = len(part.train)
        assert len(exp.client_holdout[cid]) == min(8, total // 5)
        assert len(exp.client_train[cid]) + len(exp.client_holdout[cid]) == total
    sim.run()
    assert_learns(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert set(lines[-1]["fusion_weights"]) == {"0", "1", "2", "3"}
    exported = sorted(p.name for p in (tmp_path / "run/adapters").iterdir())
    assert exported == ["client_0", "client_1", "client_2", "client_3", "global"]
