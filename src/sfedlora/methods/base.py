"""The method interface: a small, pure description of one federated LoRA algorithm.

A method says, and only says:

* which parts of the adapter exist on the server (``shared``: downloaded every round),
  stay with each client across rounds (``private``: never sent), or are fixed at one
  seeded init on every client (``fixed``: never trained, never sent);
* which parts train and which are sent up in a given round (:meth:`Method.plan`);
* how the server combines the uploads (:meth:`Method.aggregate`);
* which scale it uses by default and which ``a_init`` modes make sense.

Runtimes (the in-process simulator, later Flower) execute a method; they never branch
on its name. The parts are A (``lora_A``), B (``lora_B``) and the task head.

How the other methods fit:

* **Compressed messages (top-k, quantisation, casting).** Messages are dicts of
  tensors that a codec (:mod:`sfedlora.codecs`) turns into bytes per direction, by
  config; any method composes with any codec. A method may carry a preset (``comm``).
  FLoCoRA is FedIT with the preset "8-bit uploads".
* **FLASC.** Its preset masks the download and sparsifies the uploaded change (both
  top-k), and it names a server optimizer (``server_optimizer = "adamw"``): the
  runtime feeds the mean client change to AdamW as a gradient instead of replacing the
  global state. Evaluation uses what clients receive, i.e. the masked model.
* **FLoRA.** ``merge_into_base = True``: A and B are ``fresh`` (re-initialised every
  round, never held by the server); :meth:`Method.merge` turns the round's uploads into
  stacked factors that the server records and every client merges into its base
  weights, receiving the factors of each round it has not seen with its next download.
* **FDLoRA.** ``personal_adapter = True``: each client keeps a personal copy of the
  adapter next to the global one (refreshed from its locally trained global adapter),
  never sent; a gradient-free search fuses the two for personalised evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import torch

from sfedlora.aggregation import Combiner, weighted_mean


class Part(StrEnum):
    A = "A"
    B = "B"
    HEAD = "head"


A_MARKERS = (".lora_A.", ".lora_embedding_A.", ".vera_lambda_d.")
B_MARKERS = (".lora_B.", ".lora_embedding_B.", ".vera_lambda_b.")


def part_of(name: str) -> Part:
    """Which part an adapter tensor belongs to, from its PEFT name. PEFT's embedding
    LoRA (``lora_embedding_A/B``) has the same roles as A and B (the runtimes refuse
    embedding targets, see :func:`sfedlora.task.refuse_non_linear_targets`, but a name
    is never mistaken for the head). VeRA's lambda_d scales the (shared, frozen)
    down-projection like A, lambda_b the up-projection like B, so FedSA semantics carry
    over: lambda_d is shared, lambda_b stays local."""
    if any(m in name for m in A_MARKERS):
        return Part.A
    if any(m in name for m in B_MARKERS):
        return Part.B
    return Part.HEAD


@dataclass(frozen=True)
class RoundPlan:
    """What a client does in one round."""

    train: frozenset[Part]
    upload: frozenset[Part]


@dataclass(frozen=True)
class Update:
    """One client's upload as the server decoded it."""

    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor]
    # Per tensor, the coordinates the client really sent, where it sent fewer than all
    # (a sparse upload, a lower rank's zero padding); robust combiners use only those.
    present: dict[str, torch.Tensor] = field(default_factory=dict)


ALL_PARTS = frozenset(Part)


class Method:
    """Base description; subclasses override class attributes and rarely methods."""

    name: ClassVar[str]
    summary: ClassVar[str]
    shared: ClassVar[frozenset[Part]] = ALL_PARTS
    private: ClassVar[frozenset[Part]] = frozenset()
    fixed: ClassVar[frozenset[Part]] = frozenset()
    default_scaling: ClassVar[str] = "lora"
    weighting: ClassVar[str] = "examples"  # "examples": p_i ~ n_i; "uniform": p_i = 1/m
    # First entry is the default; a_init is an error for methods with one mode.
    a_init_modes: ClassVar[tuple[str, ...]] = ("shared",)
    a_init_note: ClassVar[str] = "every client starts from one shared A"
    # Whether each client also keeps a personal copy of the adapter (FDLoRA).
    personal_adapter: ClassVar[bool] = False
    # Whether clients may hold different ranks (lora.client_ranks).
    mixed_ranks: ClassVar[bool] = False
    # Codec settings per direction ("up", "down") that config fields left unset take.
    comm: ClassVar[dict[str, dict]] = {}
    # "none": the combined uploads become the global state; "sgd" / "adamw": their
    # mean change is the gradient of a server optimizer step (FedOpt).
    server_optimizer: ClassVar[str] = "none"
    # Parts re-initialised every round (never held by the server), and whether the
    # round's uploads are merged into the base weights (FLoRA, see :meth:`merge`).
    fresh: ClassVar[frozenset[Part]] = frozenset()
    merge_into_base: ClassVar[bool] = False

    @property
    def has_global_adapter(self) -> bool:
        """True when the server's state alone is a complete adapter."""
        return not self.private

    def plan(self, round_idx: int) -> RoundPlan:
        """Default: everything that is not fixed trains; the shared parts go up."""
        trainable = (self.shared | self.private) - self.fixed
        return RoundPlan(train=frozenset(trainable), upload=frozenset(self.shared - self.fixed))

    def weights(self, updates: Sequence[Update]) -> list[float]:
        if self.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = sum(u.num_examples for u in updates)
        return [u.num_examples / total for u in updates]

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: Sequence[Update],
        combine: Combiner = weighted_mean,
    ) -> dict[str, torch.Tensor]:
        """New global state: every uploaded tensor combined across clients with the
        method's weights (by default their weighted mean; the server may pass a robust
        combiner). Tensors nobody uploaded keep their global value. Updates are taken in
        client-id order so the result does not depend on arrival order.
        """
        updates = sorted(updates, key=lambda u: u.client_id)
        new_state = dict(global_state)
        if not updates:
            return new_state
        weights = self.weights(updates)
        for name in updates[0].tensors:
            new_state[name] = combine([u.tensors[name] for u in updates], weights,
                                      [u.present.get(name) for u in updates])
        return new_state

    def merge(self, updates: Sequence[Update], ranks: Sequence[int],
              scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """Factors to merge into the base weights, ``{lora_A name: A_s, lora_B name:
        B_s}`` with ``B_s A_s`` the change; ``ranks`` and ``scales`` give each update's
        rank and LoRA scale (in client-id order). Only for ``merge_into_base`` methods."""
        raise NotImplementedError(f"{self.name} does not merge into the base weights")
