"""The adapter's layout, and named handles on the adapter tensors of the one model.

Clients never rebuild or reload the model: a client's round starts by copying its
adapter tensors into these parameters (:class:`AdapterSlots`) and ends by reading them
back. :class:`AdapterLayout` is what a process that holds no model (a Flower
ServerApp) needs to know of the adapter: names, shapes and dtypes, and the values the
head starts from; every seeded init is drawn from it alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from safetensors.torch import save

from sfedlora.core import wire
from sfedlora.core.parts import Part, part_of


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


class AdapterLayout:
    """Every adapter tensor's name, part, shape and dtype, and the loaded values of
    those that are not drawn (the head; VeRA's lambdas, whose init is a constant)."""

    def __init__(self, spec: dict[str, TensorSpec], loaded: dict[str, torch.Tensor]):
        self.spec = spec
        self.parts: dict[str, Part] = {n: part_of(n) for n in spec}
        self.loaded = loaded

    def names(self, parts: Iterable[Part]) -> list[str]:
        wanted = set(parts)
        return [n for n in self.spec if self.parts[n] in wanted]

    def initial_state(self, a_seed: int) -> dict[str, torch.Tensor]:
        """A fresh adapter: A drawn from ``a_seed`` (kaiming-uniform, as PEFT does),
        B zero, the head (and VeRA's lambdas) as loaded. Drawn on the CPU so the init
        does not depend on the device."""
        gen = torch.Generator().manual_seed(a_seed)
        state: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in self.spec.items():
            if ".lora_A." in name:
                t = torch.empty(shape, dtype=dtype)
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
                state[name] = t
            elif ".lora_B." in name:
                state[name] = torch.zeros(shape, dtype=dtype)
            else:
                state[name] = self.loaded[name].clone()
        return state

    def encode(self, meta: dict | None = None) -> bytes:
        """As safetensors: the loaded values, the spec (and ``meta``) in the metadata.
        Written even with no loaded values (a causal LM has no head), unlike a
        message, whose empty form is zero bytes."""
        # a list, not a mapping: the order of the tensors is the order of the draws
        spec = [[n, list(s.shape), str(s.dtype).removeprefix("torch.")]
                for n, s in self.spec.items()]
        doc = json.dumps({"spec": spec, **(meta or {})}, sort_keys=True)
        return save({n: t.contiguous() for n, t in self.loaded.items()},
                    metadata={"sfedlora": doc})

    @classmethod
    def decode(cls, data: bytes) -> tuple[AdapterLayout, dict]:
        meta = dict(wire.read_meta(data))
        spec = {n: TensorSpec(tuple(shape), getattr(torch, dtype))
                for n, shape, dtype in meta.pop("spec")}
        return cls(spec, wire.decode(data)), meta


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
        self.layout = AdapterLayout(
            {n: TensorSpec(tuple(p.shape), p.dtype) for n, p in self.params.items()},
            {n: p.detach().cpu().clone() for n, p in self.params.items()
             if ".lora_A." not in n and ".lora_B." not in n})

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
        """Copies of the adapter tensors of ``parts``, on the CPU wherever the model
        runs: client state, uploads and the codecs' references all live there, so a
        method never meets tensors of two devices."""
        return {n: self.params[n].detach().to("cpu", copy=True) for n in self.names(parts)}

    def set_trainable(self, parts: Iterable[Part]) -> None:
        wanted = set(parts)
        for name, p in self.params.items():
            p.requires_grad_(self.parts[name] in wanted)

    def initial_state(self, a_seed: int) -> dict[str, torch.Tensor]:
        return self.layout.initial_state(a_seed)
