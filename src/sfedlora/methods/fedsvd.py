"""FedSVD (arXiv 2505.12805): train only B, re-factorise the global update by SVD.

Clients train B (and the head, unless ``options.train_head=false``, the official
code's choice) with A frozen at what they downloaded; the server
averages B and then re-factorises each layer's ``B_mean A`` by SVD
(:func:`~sfedlora.methods.factorize.svd_factors`): the new A holds the top-r right
singular vectors (orthonormal rows) and the new B = U Sigma, so ``B_new A_new = B_mean
A_old`` exactly (its rank is at most r). A therefore adapts across rounds although no
client ever trains or sends it, and every client receives the new A with B.

Designed with DP in mind: only B is released, so clipping and noise apply to B's mean
alone, and the re-factorisation runs on the noised mean (:class:`Refactorise`), a
post-processing step that costs no privacy.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sfedlora.methods.base import Method, Part, RoundPlan, ServerStage, Tensors
from sfedlora.methods.factorize import lora_pairs, svd_factors


class FedSVDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train_head: bool = Field(
        True, description="train and average the task head with B; false keeps it at its "
        "seeded initialisation, as the official code does")


class Refactorise(ServerStage):
    """After every combine (and any DP noise): ``B_new A_new = B_mean A_old`` by SVD."""

    def after_combine(self, round_idx: int, state: Tensors, updates) -> Tensors:
        new = dict(state)
        for a_name, b_name in lora_pairs(state):
            a, b = state[a_name], state[b_name]
            new[a_name], new[b_name] = svd_factors(b.double() @ a.double(), a.shape[0],
                                                   a.dtype)
        return new


class FedSVD(Method):
    """clients train B only; the server re-factorises B_mean A by SVD (new A orthonormal)"""

    Options = FedSVDOptions

    def plan(self, round_idx: int) -> RoundPlan:
        trained = frozenset({Part.B, Part.HEAD} if self.options.train_head else {Part.B})
        return RoundPlan(train=trained, upload=trained)

    def server_stage(self, cfg, layout, network) -> ServerStage:
        return Refactorise()

    def check_config(self, cfg) -> None:
        refused = [
            (cfg.server_optimizer != "none", "server.optimizer",
             "the re-factorised A is not a step of the mean change"),
            (not cfg.codec("down").lossless, "comm.down",
             "the SVD's A must reach the clients as computed (B is trained against it)"),
        ]
        self.refuse(refused)
