"""Named handles on the adapter tensors of the one model instance in this process.

Clients never rebuild or reload the model: a client's round starts by copying its
adapter tensors into these parameters and ends by reading them back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from sfedlora.methods import Part, part_of


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, tag, client, round...)."""
    import numpy as np

    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


TAG_A_INIT = 101


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


class AdapterSlots:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params: dict[str, torch.nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        if not self.params:
            raise ValueError("the model has no trainable adapter parameters")
        self.parts: dict[str, Part] = {n: part_of(n) for n in self.params}
        # Inits as loaded: every client starts from this same head (and, for VeRA, the
        # same lambda vectors, whose PEFT init is a constant, not a random draw).
        self._loaded = {n: p.detach().clone() for n, p in self.params.items()}

    def names(self, parts: Iterable[Part]) -> list[str]:
        wanted = set(parts)
        return [n for n in self.params if self.parts[n] in wanted]

    def spec(self) -> dict[str, TensorSpec]:
        """Name -> expected shape and dtype of every adapter tensor."""
        return {n: TensorSpec(tuple(p.shape), p.dtype) for n, p in self.params.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.params[name].copy_(value)

    @torch.no_grad()
    def snapshot(self, parts: Iterable[Part]) -> dict[str, torch.Tensor]:
        return {n: self.params[n].detach().clone() for n in self.names(parts)}

    def set_trainable(self, parts: Iterable[Part]) -> None:
        wanted = set(parts)
        for name, p in self.params.items():
            p.requires_grad_(self.parts[name] in wanted)

    def initial_state(self, a_seed: int) -> dict[str, torch.Tensor]:
        """A fresh adapter: A drawn from ``a_seed`` (kaiming-uniform, as PEFT does),
        B zero, the head (and VeRA's lambdas) as loaded. Drawn on the CPU so the init
        does not depend on the device."""
        gen = torch.Generator().manual_seed(a_seed)
        state: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            if ".lora_A." in name:
                t = torch.empty(p.shape, dtype=p.dtype)
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
                state[name] = t
            elif ".lora_B." in name:
                state[name] = torch.zeros(p.shape, dtype=p.dtype)
            else:
                state[name] = self._loaded[name].clone()
        return state
