"""Mixed ranks on one model: a client of rank r uses the leading r components.

The model is built at the largest rank r_max. A client of rank r receives and sends
only ``A[:r]`` and ``B[:, :r]`` (so messages are really smaller), and trains inside the
r_max slots with the rest zero. Zero rows of A and columns of B stay exactly zero under
training (their gradients are products with the other factor's zero part, and Adam's
or SGD's step of a zero gradient is zero), so the client trains a rank-r adapter. For
HetLoRA one scale (that of r_max) serves every client, so a truncated adapter is exactly
the leading r components of the full one; FLoRA, whose clients' products are merged and
never averaged, trains each client at the scale of its own rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sfedlora.core.adapters import TensorSpec
from sfedlora.core.parts import Part, part_of

Tensors = dict[str, torch.Tensor]


def truncate(tensors: Mapping[str, torch.Tensor], rank: int) -> Tensors:
    """The leading ``rank`` components (other tensors unchanged)."""
    out = {}
    for name, t in tensors.items():
        part = part_of(name)
        out[name] = t[:rank] if part is Part.A else t[:, :rank] if part is Part.B else t
    return out


def truncated_spec(spec: Mapping[str, TensorSpec], rank: int) -> dict[str, TensorSpec]:
    """Shapes a client of ``rank`` sends."""
    out = {}
    for name, s in spec.items():
        part = part_of(name)
        shape = ((min(rank, s.shape[0]), *s.shape[1:]) if part is Part.A else
                 (s.shape[0], min(rank, s.shape[1])) if part is Part.B else s.shape)
        out[name] = TensorSpec(tuple(shape), s.dtype)
    return out


def pad(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> Tensors:
    """Zero-pad truncated tensors back to the full shapes of ``spec``."""
    out = {}
    for name, t in tensors.items():
        full = spec[name].shape
        if tuple(t.shape) == full:
            out[name] = t
            continue
        padded = torch.zeros(full, dtype=t.dtype)
        padded[tuple(slice(0, n) for n in t.shape)] = t
        out[name] = padded
    return out
