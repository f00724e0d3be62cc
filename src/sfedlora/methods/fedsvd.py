"""FedSVD (arXiv 2505.12805): train only B, re-factorise the global update by SVD.

Clients train B (and the head) with A frozen at what they downloaded; the server
averages B and then re-factorises each layer's ``B_mean A`` by SVD
(:func:`~sfedlora.methods.factorize.svd_factors`): the new A holds the top-r right
singular vectors (orthonormal rows) and the new B = U Sigma, so ``B_new A_new = B_mean
A_old`` exactly (its rank is at most r). A therefore adapts across rounds although no
client ever trains or sends it, and every client receives the new A with B.

Designed with DP in mind: only B is released, so clipping and noise apply to B's mean
alone, and the re-factorisation runs on the noised mean (:meth:`Method.finalize`), a
post-processing step that costs no privacy.
"""

from __future__ import annotations

import torch

from sfedlora.methods.base import Method, Part, RoundPlan
from sfedlora.methods.factorize import lora_pairs, svd_factors

TRAINED = frozenset({Part.B, Part.HEAD})


class FedSVD(Method):
    name = "fedsvd"
    summary = "clients train B only; the server re-factorises B_mean A by SVD (new A orthonormal)"

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(train=TRAINED, upload=TRAINED)

    def finalize(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        new = dict(state)
        for a_name, b_name in lora_pairs(state):
            a, b = state[a_name], state[b_name]
            new[a_name], new[b_name] = svd_factors(b.double() @ a.double(), a.shape[0],
                                                   a.dtype)
        return new

    def check_config(self, cfg) -> None:
        refused = [
            (cfg.server_optimizer != "none", "server.optimizer",
             "the re-factorised A is not a step of the mean change"),
            (not cfg.codec("down").lossless, "comm.down",
             "the SVD's A must reach the clients as computed (B is trained against it)"),
        ]
        self.refuse(refused)
