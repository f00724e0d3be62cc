"""Exported adapters load in Hugging Face PEFT and reproduce sfedlora's logits."""

from __future__ import annotations

import json

import pytest
import torch

from sfedlora.runtime.simulation import Simulation
from sfedlora.tasks.classification import logits


@pytest.mark.parametrize(
    ("method", "scaling", "adapter"),
    [("fedit", "lora", "global"), ("sfed", "sfed", "client_2"), ("ffa", "rslora", "global"),
     ("local", "lora", "client_2"), ("fedex", "lora", "global"),
     ("flexlora", "lora", "global"), ("fedsvd", "lora", "global"),
     ("central", "lora", "global"), ("soft", "lora", "global")],
)
def test_peft_reproduces_evaluation_logits(method, scaling, adapter, tiny_config, tmp_path,
                                           peft_logits):
    cfg = tiny_config(f"method={method}", f"lora.scaling={scaling}", "rounds=2",
                      "clients.per_round=3", "local.lr=0.05")
    sim = Simulation(cfg)
    sim.run()
    ours = logits(sim.pool.exp.worker,
        sim.global_adapter() if adapter == "global" else sim.client_adapter(2),
        sim.pool.exp.global_test,
    )
    labels = json.loads((tmp_path / "run/labels.json").read_text())
    theirs = peft_logits(tmp_path / "run/adapters" / adapter, labels, sim.pool.exp)
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_every_client_gets_an_adapter_when_b_is_private(tiny_config, tmp_path):
    Simulation(tiny_config("method=fedsa", "rounds=1")).run()
    names = sorted(p.name for p in (tmp_path / "run/adapters").iterdir())
    assert names == [f"client_{i}" for i in range(4)]
    cfg = json.loads((tmp_path / "run/adapters/client_0/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
