"""FDLoRA (Qi et al., arXiv 2406.07925): a personal and a global adapter per client.

The global adapter (A, B, head) is trained locally, sent and averaged as in FedIT. Each
client also keeps a personal adapter that never leaves it: a copy of its locally
trained global adapter, refreshed in rounds divisible by ``personal.sync_every`` (and
on the client's first round). For personalised evaluation a gradient-free grid search
(as LoraHub does for module composition) picks weights (w1, w2) from ``personal.grid``
that minimise the loss of ``w1 * global + w2 * personal`` (elementwise on every adapter
tensor) on a held-out slice of the client's training data (``personal.holdout``
examples, kept out of training).

The paper's exact schedule is not confirmed (METHODS.md); this is the reading above.
"""

from dataclasses import replace

from sfedlora.methods.base import LocalData, Roles, Traits
from sfedlora.methods.fedit import FedIT


class FDLoRA(FedIT):
    """global adapter averaged; personal copy kept; fused by held-out grid search"""

    roles = Roles(personal=True)  # every client's fusion is its own
    traits = Traits(a_init_note="the global adapter starts from one shared A")

    def local_data(self, cfg, splits: list) -> LocalData:
        return replace(super().local_data(cfg, splits), holdout=cfg.personal.holdout)

    def client_stage(self, cfg, worker):
        from sfedlora.methods.fdlora.fusion import PersonalCopy

        return PersonalCopy(cfg, worker)
