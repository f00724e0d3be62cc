"""The forward pass of every scaling rule adds exactly gamma * B A x."""

from __future__ import annotations

import math

import pytest
import torch

from sfedlora.config import load_config
from sfedlora.scaling import gamma, peft_scale
from sfedlora.task import build_model


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
    model, _ = build_model(cfg, ["x", "y"])
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
