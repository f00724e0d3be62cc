"""FedSA-VeRA: PEFT's VeRA under FedSA semantics (lambda_d shared, lambda_b local)."""

from __future__ import annotations

import json

import pytest
import torch

from sfedlora.config import ConfigError
from sfedlora.core import wire
from sfedlora.runtime.simulation import Simulation
from sfedlora.tasks.classification import logits


def test_fedsa_vera_sends_only_lambda_d_and_exports_to_peft(tiny_config, tmp_path,
                                                            peft_logits, monkeypatch):
    sent: list[set[str]] = []
    real = wire.encode
    monkeypatch.setattr(wire, "encode", lambda t, meta=None: sent.append(set(t)) or real(t, meta))
    cfg = tiny_config("method=fedsa", "lora.adapter=vera", "lora.rank=8", "rounds=3",
                      "local.lr=0.05", "local.steps=5")
    sim = Simulation(cfg)
    summary = sim.run()
    names = set().union(*sent)
    assert names and all(".vera_lambda_d." in n for n in names)

    lam_b = [{n: t for n, t in sim.client_adapter(c).items() if "vera_lambda_b" in n}
             for c in range(4)]
    lam_d = [{n: t for n, t in sim.client_adapter(c).items() if "vera_lambda_d" in n}
             for c in range(4)]
    assert all(t.abs().sum() > 0 for t in lam_b[0].values())  # trained from zero
    assert any(not torch.equal(lam_b[0][n], lam_b[1][n]) for n in lam_b[0])  # private
    assert all(torch.equal(lam_d[0][n], lam_d[3][n]) for n in lam_d[0])  # shared
    assert summary["gamma"] is None and summary["scaling"] == "vera"

    adapter = tmp_path / "run/adapters/client_1"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "VERA"
    labels = json.loads((tmp_path / "run/labels.json").read_text())
    ours = logits(sim.pool.exp.worker, sim.client_adapter(1), sim.pool.exp.global_test)
    theirs = peft_logits(adapter, labels, sim.pool.exp)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (["method=sfed"], "only fedit, fedsa"),
    (["method=fedsa", "lora.scaling=rslora"], "lora.scaling does not apply"),
    (["method=fedsa", "lora.a_init=independent"], "lora.a_init does not apply"),
])
def test_vera_refuses_settings_that_do_not_apply(overrides, match, tiny_config):
    with pytest.raises(ConfigError, match=match):
        tiny_config("lora.adapter=vera", *overrides)
