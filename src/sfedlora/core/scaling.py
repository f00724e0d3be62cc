"""LoRA scaling rules: the forward multiplier gamma in ``h = W0 x + gamma * B A x``.

| rule   | gamma             | PEFT equivalent                               |
|--------|-------------------|-----------------------------------------------|
| lora   | alpha / r         | lora_alpha = alpha                            |
| rslora | alpha / sqrt(r)   | use_rslora=True, lora_alpha = alpha           |
| sfed   | alpha * sqrt(N/r) | use_rslora=True, lora_alpha = alpha * sqrt(N) |
| fixed  | alpha             | lora_alpha = alpha * r                        |

``fixed`` is FLoRA's official setting (``lora_alpha = 2 * r_i``: gamma = 2 at every
client rank), so its default alpha is 2; every other rule defaults to alpha = 16.

gamma is the same at training, evaluation and export, so an exported PEFT adapter
reproduces the outputs seen in evaluation. N is the number of clients aggregated per
round (kept fixed under partial participation so gamma does not jump).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("lora", "rslora", "sfed", "fixed")
DEFAULT_ALPHA = 16.0
DEFAULT_ALPHA_OF = {"fixed": 2.0}


def default_alpha(rule: str) -> float:
    """alpha when the config leaves ``lora.alpha`` unset."""
    return DEFAULT_ALPHA_OF.get(rule, DEFAULT_ALPHA)


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
    if rule == "fixed":
        return alpha
    raise ValueError(f"unknown scaling rule {rule!r}; choose one of {', '.join(RULES)}")


def peft_scale(rule: str, alpha: float, num_clients: int = 1, rank: int | None = None
               ) -> PeftScale:
    """The LoraConfig settings whose scaling equals :func:`gamma` (for every rank, or
    for the adapter's ``rank`` where the rule's PEFT form depends on it)."""
    if rule == "lora":
        return PeftScale(alpha, use_rslora=False)
    if rule == "rslora":
        return PeftScale(alpha, use_rslora=True)
    if rule == "sfed":
        return PeftScale(alpha * math.sqrt(num_clients), use_rslora=True)
    if rule == "fixed":
        if rank is None:
            raise ValueError("the fixed rule's lora_alpha depends on the rank: pass rank")
        return PeftScale(alpha * rank, use_rslora=False)
    raise ValueError(f"unknown scaling rule {rule!r}; choose one of {', '.join(RULES)}")
