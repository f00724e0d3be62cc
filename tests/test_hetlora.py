"""Mixed ranks and HetLoRA: truncation and padding, the norm weights, real sizes."""

from __future__ import annotations

import pytest
import torch

from sfedlora.aggregation.weighting import product_norm
from sfedlora.config import ConfigError
from sfedlora.core import codecs
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.ranks import pad, truncate, truncated_spec
from sfedlora.methods import Update, get_method
from sfedlora.runtime.simulation import Simulation
from sfedlora.runtime.worker import Worker
from tests.conftest import assert_learns

A, B, H = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.classifier.weight"
SPEC = {A: TensorSpec((4, 6), torch.float32), B: TensorSpec((5, 4), torch.float32),
        H: TensorSpec((3, 5), torch.float32)}


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s.shape, generator=gen) for n, s in SPEC.items()}


def test_truncate_and_pad_round_trip():
    t = _adapter(0)
    short = truncate(t, 2)
    assert {n: tuple(v.shape) for n, v in short.items()} == {
        n: s.shape for n, s in truncated_spec(SPEC, 2).items()} == {A: (2, 6), B: (5, 2),
                                                                   H: (3, 5)}
    back = pad(short, SPEC)
    assert torch.equal(back[A][:2], t[A][:2]) and back[A][2:].abs().sum() == 0
    assert torch.equal(back[B][:, :2], t[B][:, :2]) and back[B][:, 2:].abs().sum() == 0
    assert torch.equal(back[H], t[H])
    # the truncated product is the leading components of the full one
    assert torch.allclose(back[B] @ back[A], t[B][:, :2] @ t[A][:2])


def test_hetlora_weights_are_proportional_to_the_product_norm():
    clients = [pad(truncate(_adapter(s), r), SPEC) for s, r in ((1, 2), (2, 4), (3, 3))]
    updates = [Update(i, 10, c) for i, c in enumerate(clients)]
    norms = [torch.linalg.matrix_norm(c[B].double() @ c[A].double()).item() for c in clients]
    assert [product_norm(c) for c in clients] == pytest.approx(norms, rel=1e-12)
    method = get_method("hetlora")
    weights = method.weights(updates)
    assert weights == pytest.approx([n / sum(norms) for n in norms], rel=1e-12)
    new = method.aggregate({}, updates)
    for name in SPEC:
        expected = sum(w * c[name].double() for w, c in zip(weights, clients, strict=True))
        torch.testing.assert_close(new[name].double(), expected, rtol=0, atol=1e-6)
    # rows beyond a client's rank get only the other clients' (weighted) share
    assert torch.allclose(new[A][3].double(), weights[1] * clients[1][A][3].double())


def test_hetlora_run_trains_and_sends_only_each_clients_rank(tiny_config, monkeypatch):
    after_fit: dict[int, dict[str, torch.Tensor]] = {}
    real = Worker.fit

    def spy(self, cid, *args, **kwargs):
        fit = real(self, cid, *args, **kwargs)
        after_fit[cid] = {**self.slots.snapshot(self.method.roles.shared),
                          "_upload": codecs.decode(fit.upload)}
        return fit

    monkeypatch.setattr(Worker, "fit", spy)
    cfg = tiny_config("method=hetlora", "lora.rank=4", "lora.client_ranks=[2,4]",
                      "rounds=3", "local.lr=0.05", "local.steps=5")
    sim = Simulation(cfg)
    sim.run_round(1)
    rec = sim.run_round(2).metrics
    a_names = [n for n in after_fit[0] if ".lora_A." in n]
    for n in a_names:
        assert after_fit[0]["_upload"][n].shape[0] == 2  # clients 0, 1 have rank 2
        assert after_fit[3]["_upload"][n].shape[0] == 4
        assert after_fit[0][n][2:].abs().sum() == 0  # trained inside rank 2 only
        assert after_fit[0][n][:2].abs().sum() > 0
    for key in ("bytes_up_per_client", "bytes_down_per_client"):
        assert rec[key]["0"] == rec[key]["1"] < rec[key]["2"] == rec[key]["3"]
    own = sim.client_adapter(0)
    assert all(own[n][2:].abs().sum() == 0 for n in a_names)  # evaluated at its rank


def test_hetlora_learns_the_tiny_task(encoder_config, tmp_path):
    cfg = encoder_config("method=hetlora", "lora.client_ranks=[1,2,4]")
    Simulation(cfg).run()
    assert_learns(cfg, tmp_path / "run")


@pytest.mark.parametrize("overrides,match", [
    (["method=fedit", "lora.client_ranks=[2,4]"], "method=hetlora"),
    (["method=hetlora", "lora.rank=4", "lora.client_ranks=[2,8]"], "each between"),
    (["method=hetlora", "lora.client_ranks=[1,1,1,1,1]"], "each between"),
])
def test_bad_client_ranks_are_refused(overrides, match, tiny_config):
    with pytest.raises(ConfigError, match=match):
        tiny_config(*overrides)
