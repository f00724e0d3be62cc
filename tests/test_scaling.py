"""The forward pass of every scaling rule adds exactly gamma * B A x."""

from __future__ import annotations

import math

import pytest
import torch

from sfedlora.config import load_config
from sfedlora.core.scaling import gamma, peft_scale
from sfedlora.modeling.model import build_model
from sfedlora.tasks import get_task


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("lora", 16 / 8), ("rslora", 16 / math.sqrt(8)), ("sfed", 16 * math.sqrt(5 / 8)),
     ("fixed", 16)],
)
def test_gamma_formulas(rule, expected):
    assert gamma(rule, 16, 8, 5) == pytest.approx(expected, rel=1e-15)


def test_default_alpha_is_flora_officials_under_fixed_and_16_otherwise():
    flora = load_config(None, ["method=flora"])
    assert flora.scaling == "fixed" and flora.alpha == 2.0
    assert flora.client_gamma(0) == 2.0
    assert load_config(None, ["method=flora", "lora.scaling=lora"]).alpha == 16.0
    assert load_config(None, ["method=sfed"]).alpha == 16.0
    assert load_config(None, ["method=fedit", "lora.alpha=4"]).alpha == 4.0


@pytest.mark.parametrize("rule", ["lora", "rslora", "sfed", "fixed"])
@pytest.mark.parametrize("rank", [1, 4, 64])
def test_peft_scale_reproduces_gamma(rule, rank):
    s = peft_scale(rule, 16, num_clients=7, rank=rank)
    peft_gamma = s.lora_alpha / (math.sqrt(rank) if s.use_rslora else rank)
    assert peft_gamma == pytest.approx(gamma(rule, 16, rank, 7), rel=1e-12)


@pytest.mark.parametrize("rule", ["lora", "rslora", "sfed", "fixed"])
def test_forward_adds_gamma_b_a_x(rule, tiny_model_dir):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"lora.scaling={rule}",
                             "lora.rank=4", "lora.alpha=8", "clients.num=6",
                             "clients.per_round=3", "method=fedsa"])
    model, _ = build_model(cfg, get_task(cfg.task), ["x", "y"])
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(4, 32, generator=gen))
        layer.lora_B["default"].weight.copy_(torch.randn(32, 4, generator=gen))
    x = torch.randn(2, 5, 32, generator=gen)
    g = gamma(rule, 8, 4, 3)  # N = clients per round
    assert layer.scaling["default"] == pytest.approx(g, rel=1e-12)
    model.eval()
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(delta, g * (x @ a.T @ b.T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("optimizer", "power"), [("adamw", 1), ("sgd", 2)])
def test_scale_is_a_learning_rate_of_b_in_disguise(optimizer, power, tiny_config, tmp_path):
    """B starts at zero, the optimizer is rebuilt every round, no weight decay, one shared
    A: scale c*gamma at learning rate eta trains what scale gamma does with B's learning
    rate c*eta (AdamW) or c^2*eta (SGD), since c*gamma*B = gamma*(c*B). So a comparison
    of scales at one learning rate compares B learning rates. Exact under SGD; under
    AdamW up to its eps (1e-8) against B's smallest gradients (1.2e-5 in the loss after
    3 rounds here), while leaving B's learning rate at eta is off by far more."""
    import json

    from sfedlora.runtime.simulation import Simulation
    from sfedlora.tasks.classification import logits

    c, eta = (4.0, 0.01) if optimizer == "adamw" else (2.0, 0.5)
    common = ("method=fedsa", "lora.a_init=shared", "lora.scaling=lora",
              f"local.optimizer={optimizer}", f"local.lr={eta}", "rounds=3")
    arms = {"scaled": [f"lora.alpha={8 * c}"],
            "lr_B": ["lora.alpha=8", f"local.lr_B={eta * c**power}"],
            "unadjusted": ["lora.alpha=8"]}
    runs = {}
    for arm, extra in arms.items():
        cfg = tiny_config(*common, *extra, f"output_dir={tmp_path / arm}")
        sim = Simulation(cfg)
        sim.run()
        lines = [json.loads(x) for x in (tmp_path / arm / "metrics.jsonl").read_text()
                 .splitlines()]
        exp = sim.pool.exp
        runs[arm] = (lines, logits(exp.worker, sim.client_adapter(0), exp.global_test))
    (scaled, out_scaled), (moved, out_moved) = runs["scaled"], runs["lr_B"]
    tol = 1e-6 if optimizer == "sgd" else 1e-4
    keys = ["train_loss", "personalized_loss", "personalized_accuracy", "grad_norm_A"]
    if optimizer == "sgd":
        # Not under AdamW: entries of B with gradients near eps are directions the loss
        # hardly sees (the classifier reads one token) but the probe norm over every
        # token does (~2%).
        keys.append("adapter_output_norm")
    for a, b in zip(scaled, moved, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=tol), key
        assert a["grad_norm_B"] == pytest.approx(c * b["grad_norm_B"], rel=100 * tol)
    torch.testing.assert_close(out_scaled, out_moved, rtol=0, atol=tol)
    # B's own learning rate left at eta: the adapter moves c (AdamW) or c^2 (SGD) times less
    unadjusted = runs["unadjusted"][0][-1]["adapter_output_norm"]
    ratio = scaled[-1]["adapter_output_norm"] / unadjusted
    assert ratio == pytest.approx(c**power, rel=0.25)  # measured 3.68 (AdamW), 4.00 (SGD)
