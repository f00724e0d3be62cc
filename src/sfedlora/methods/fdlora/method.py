"""FDLoRA (Qi et al., arXiv 2406.07925): a personal and a global adapter per client.

The global adapter (A, B, head) is trained locally, sent and averaged as in FedIT. Each
client also keeps a personal adapter that never leaves it: a copy of its locally
trained global adapter, refreshed in rounds divisible by ``options.sync_every`` (and
on the client's first round). For personalised evaluation a gradient-free grid search
(as LoraHub does for module composition) picks weights (w1, w2) from ``options.grid``
that minimise the loss of ``w1 * global + w2 * personal`` (elementwise on every adapter
tensor) on a held-out slice of the client's training data (``options.holdout``
examples, kept out of training).

The paper's exact schedule is not spelled out in what we could read; this is the reading above.
"""

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sfedlora.methods.base import LocalData, Roles, Traits
from sfedlora.methods.fedit import FedIT


class FDLoRAOptions(BaseModel):
    """FDLoRA's settings (``options.*`` with ``method=fdlora``): each client's personal
    adapter and its fusion with the global one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sync_every: int = Field(
        1, gt=0, description="refresh the personal adapter from the locally trained global "
        "one in rounds divisible by this (and on the client's first round)")
    holdout: int = Field(
        32, gt=0, description="examples of each client's training data kept out of "
        "training to choose the fusion weights (at most a fifth of the client's data)")
    grid: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
        description="values tried for each of w1 (global) and w2 (personal)")

    @field_validator("grid")
    @classmethod
    def _some_weight(cls, grid: list[float]) -> list[float]:
        if not any(grid):
            raise ValueError("options.grid needs a non-zero weight, e.g. [0, 0.5, 1]")
        return grid


class FDLoRA(FedIT):
    """global adapter averaged; personal copy kept; fused by held-out grid search"""

    Options = FDLoRAOptions
    roles = Roles(personal=True)  # every client's fusion is its own
    traits = Traits(a_init_note="the global adapter starts from one shared A")

    def local_data(self, cfg, splits: list) -> LocalData:
        return replace(super().local_data(cfg, splits), holdout=self.options.holdout)

    def client_stage(self, cfg, worker):
        from sfedlora.methods.fdlora.fusion import PersonalCopy

        return PersonalCopy(self.options, worker)
