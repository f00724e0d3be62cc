"""SOFT (Kim and Choi, arXiv 2505.00333): sparsified orthogonal fine-tuning for
wireless federated LoRA. Details reconstructed from the paper's abstract; each piece
(the penalty, the importance score, the per-component average) is a small function of
:mod:`.components` so the paper's exact versions can replace it.

- As FedIT, A, B and the head train on every client and are averaged with data-size
  weights.
- A's rows start orthonormal, and the local loss adds
  ``options.ortho_weight * sum over layers of (||A A^T - I||_F^2 + ||offdiag(B^T B)||_F^2)``,
  so ``s_i = ||B[:, i]|| ||A[i, :]||`` approximates the singular values of ``B A``
  without an SVD; ``options.importance=svd`` scores by an SVD per layer instead
  (:func:`~.components.svd_importance`), exact but dearer.
- Each client sends the change of only its ``ceil(options.keep * r)`` most important
  components per layer (row A[i, :] and column B[:, i] together; the head whole), with
  their positions; the server averages each coordinate over the clients that sent it
  (:func:`~sfedlora.aggregation.combiners.mean_over_senders`), and components nobody sent keep
  their value (under ``privacy.enabled`` the server's DP stage sums every participant's
  clipped change, unsent components counting as no change, and divides by the expected
  cohort size, which is what the DP noise is sized for; secure aggregation, whose
  masked sum cannot say who sent what, is refused).
  ``comm.up.error_feedback=true`` keeps the change of the components not
  sent on the client and adds it to the next upload: it goes out the next time its
  component is among the top (chosen by the trained factors' importance, as without
  feedback), so a round with a small keep ratio delays change instead of losing it.
"""

from __future__ import annotations

import contextlib

import torch

from sfedlora.aggregation.combiners import Combiner, mean_over_senders, weighted_mean
from sfedlora.methods.base import Choice, ClientStage, Method, Part, Tensors, Traits, Update
from sfedlora.methods.soft.components import (
    IMPORTANCE,
    component_positions,
    orthogonality_penalty,
    orthonormal_rows,
    top_components,
)
from sfedlora.methods.soft.options import SoftOptions


class SoftClient(ClientStage):
    def __init__(self, options: SoftOptions, worker):
        self.weight, self.keep = options.ortho_weight, options.keep
        self.score = IMPORTANCE[options.importance]
        params = worker.slots.params
        self.layers = [(params[a], params[a.replace(".lora_A.", ".lora_B.")])
                       for a in worker.slots.names({Part.A})]

    @contextlib.contextmanager
    def training(self, cid: int, state, round_idx: int):
        """Each local step's loss gains the orthogonality penalty (none at weight 0)."""
        yield self.penalty if self.weight != 0 else None

    def penalty(self) -> torch.Tensor:
        return self.weight * sum(orthogonality_penalty(a, b) for a, b in self.layers)

    def choose_upload(self, upload: Tensors) -> Choice:
        return Choice(positions=self.positions(upload))

    def positions(self, upload: Tensors) -> Tensors:
        """Per factor, the flat positions of the ``ceil(keep * r)`` most important rank
        components (row of A, column of B)."""
        positions = {}
        for name in [n for n in upload if ".lora_A." in n]:
            b_name = name.replace(".lora_A.", ".lora_B.")
            a, b = upload[name], upload[b_name]
            chosen = top_components(self.score(a, b, self.keep), self.keep)
            positions[name], positions[b_name] = component_positions(chosen, a.shape, b.shape)
        return positions


class Soft(Method):
    """FedIT with near-orthogonal factors; clients send only their most important rank
    components, averaged over their senders"""

    Options = SoftOptions
    traits = Traits(comm={"up": {"delta": True}}, chooses_upload_positions=True,
                    secure_aggregation_refusal="averages each rank component over the "
                    "clients that sent it, and a masked sum does not say who sent what",
                    batched_refusal="computes its orthogonality penalty on the adapter on "
                    "the model")

    def check_config(self, cfg) -> None:
        self.refuse([(cfg.lora.adapter == "vera", "lora.adapter=vera",
                      "VeRA trains no A and B factors to rank"),
                     (cfg.comm.up.density is not None and cfg.comm.up.density < 1,
                      "comm.up.density", "SOFT chooses what to send by rank component "
                      "(options.keep), not by entry")])

    def client_stage(self, cfg, worker) -> ClientStage:
        return SoftClient(self.options, worker)

    def initial_adapter(self, state: Tensors) -> Tensors:
        return {n: orthonormal_rows(t) if ".lora_A." in n else t for n, t in state.items()}

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: list[Update],
                  combine: Combiner = weighted_mean) -> dict[str, torch.Tensor]:
        # the mean of a component is over the clients that sent it; a robust
        # combiner (median, trimmed mean) already uses only the senders. Under DP this
        # is not called: the server sums clipped changes (an unsent component is no
        # change) over the expected cohort, the sum the noise is sized for
        return super().aggregate(global_state, updates,
                                 mean_over_senders if combine is weighted_mean else combine)
