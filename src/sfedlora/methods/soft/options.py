"""SOFT's and TSFA's settings: the experiment config's ``options`` block with
``method=soft`` or ``method=tsfa`` (their own models, validated when the run is
assembled)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SoftOptions(BaseModel):
    """SOFT's settings (``options.*`` with ``method=soft``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ortho_weight: float = Field(
        1e-2, ge=0, description="weight of ||A A^T - I||^2 + ||offdiag(B^T B)||^2 per layer "
        "in the local loss")
    keep: float = Field(0.5, gt=0, le=1, description="fraction of each layer's rank "
                        "components a client sends (ceil(keep * r), by importance)")
    importance: Literal["norms", "svd"] = Field(
        "norms", description="how components are ranked: norms, ||B[:, i]|| ||A[i, :]|| "
        "(no SVD; exact for orthogonal factors), or svd, each component's size inside "
        "the best rank-ceil(keep r) approximation of B A (one SVD per layer per round)")


class TsfaOptions(SoftOptions):
    """TSFA's settings (``options.*`` with ``method=tsfa``): SOFT's, the online
    schedule's (keep choices, latency budget, V) and the offline plan's."""

    keep_choices: list[float] = Field(
        [0.125, 0.25, 0.5, 1.0], min_length=1, description="the keep ratios a round may "
        "choose from, each in (0, 1]")
    latency_budget_s: float = Field(
        1.0, gt=0, description="the time-averaged round latency the virtual queue enforces")
    v: float = Field(1.0, ge=0, description="V: weight of the dropped importance share "
                     "against the queue-weighted latency (larger: more accuracy, slower "
                     "convergence to the budget)")
    ranks: list[int] = Field([4, 8, 16], min_length=1, description="tsfa-plan: the "
                             "candidate ranks its pilots compare")
    pilot_rounds: int = Field(3, ge=2, description="tsfa-plan: rounds of each rank's pilot")
    plan: str | None = Field(None, description="a plan file written by `sfedlora tsfa-plan`; "
                             "the run checks that lora.rank is the rank it chose")

    @field_validator("keep_choices")
    @classmethod
    def _keep_choices(cls, value: list[float]) -> list[float]:
        if bad := [k for k in value if not 0 < k <= 1]:
            raise ValueError(f"options.keep_choices has {bad}: every keep ratio must lie "
                             "in (0, 1], e.g. [0.125, 0.25, 0.5, 1.0]")
        return sorted(set(value))

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, value: list[int]) -> list[int]:
        if bad := [r for r in value if r < 1]:
            raise ValueError(f"options.ranks has {bad}: ranks must be positive")
        return sorted(set(value))
