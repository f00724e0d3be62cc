"""LoRA scaling rules: the forward multiplier gamma in ``h = W0 x + gamma * B A x``.

| rule   | gamma             | PEFT equivalent                               |
|--------|-------------------|-----------------------------------------------|
| lora   | alpha / r         | lora_alpha = alpha                            |
| rslora | alpha / sqrt(r)   | use_rslora=True, lora_alpha = alpha           |
| sfed   | alpha * sqrt(N/r) | use_rslora=True, lora_alpha = alpha * sqrt(N) |

gamma is the same at training, evaluation and export, so an exported PEFT adapter
reproduces the outputs seen in evaluation. N is the number of clients aggregated per
round (kept fixed under partial participation so gamma does not jump).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PeftScale:
    """How PEFT's LoraConfig expresses a gamma: ``lora_alpha`` and ``use_rslora``."""

    lora_alpha: float
    use_rslora: bool


def gamma(rule: str, alpha: float, rank: int, num_clients: int = 1) -> float:
    """The forward multiplier of a scaling rule."""
    if rule == "lora":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    if rule == "sfed":
        return alpha * math.sqrt(num_clients / rank)
    raise ValueError(f"unknown scaling rule {rule!r}; choose lora, rslora or sfed")


def peft_scale(rule: str, alpha: float, num_clients: int = 1) -> PeftScale:
    """The LoraConfig settings whose scaling equals :func:`gamma` for every rank."""
    if rule == "lora":
        return PeftScale(alpha, use_rslora=False)
    if rule == "rslora":
        return PeftScale(alpha, use_rslora=True)
    if rule == "sfed":
        return PeftScale(alpha * math.sqrt(num_clients), use_rslora=True)
    raise ValueError(f"unknown scaling rule {rule!r}; choose lora, rslora or sfed")
