"""The records every layer passes around, and the names of the metrics a run writes.

Kept apart from the code that produces them so that runtimes, tasks, checkpoints and
the Flower messages can all import them without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientState:
    """What a client keeps across rounds, also while it is not sampled."""

    private: Tensors = field(default_factory=dict)
    optimizer: dict | None = None
    residual: Tensors | None = None  # upload error feedback
    method: Tensors | None = None  # owned by the method's client stage (FDLoRA's copy)
    # with delta downloads: the published version this client holds and its tensors
    # ({"version": int, "tensors": ...}; sfedlora.comm.downlink)
    held: dict | None = None


@dataclass(frozen=True)
class FitResult:
    upload: bytes
    num_examples: int
    train_loss: float | None  # None: no local steps (a client without training data)
    grad_norm_A: float | None
    grad_norm_B: float | None
    steps: int
    tokens: int = 0  # token positions the local steps processed (for compute time)
    # the method's numbers about this fit for its server stage (TSFA: importance
    # profiles); see ClientStage.choose_upload
    report: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class StageRequest:
    """A message for one of a client's stages, which the pool delivers without reading
    it: ``stage`` names the client stage that answers (:mod:`sfedlora.privacy.stages`),
    ``step`` which of its exchanges this is, ``body`` the stage's own bytes. A pool's
    ``exchange`` returns the stage's reply; with ``fit`` the stage's ``after_fit``
    turns the client's fit into what is sent (secure aggregation: its masked vector)."""

    stage: str
    step: str
    body: bytes


@dataclass
class AggregationReport:
    """What became of a round's uploads: whose were combined, whose were rejected (and
    why), and whether the global state changed."""

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    applied: bool = False


@dataclass(frozen=True)
class ClientScores:
    """One adapter's evaluation, computed where the adapter lives (this process or a
    Flower node) as flat numbers, so that it crosses the wire unchanged and every
    runtime combines exactly the same values. ``values`` is the task's (see
    :meth:`sfedlora.tasks.Task.combine`); ``extras`` are the method's per-client
    values (FDLoRA's fusion weights); ``samples`` are generated answers to log."""

    values: dict[str, float | int | list[int]]
    extras: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    correct: int
    count: int
    loss_sum: float
    # per label id: examples of that label, and how many of them were right
    class_correct: tuple[int, ...] = ()
    class_count: tuple[int, ...] = ()

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    @property
    def balanced_accuracy(self) -> float | None:
        """Mean over the labels present of the accuracy on that label (a head that
        always predicts its client's majority label scores 1 / #labels present)."""
        recalls = [c / n for c, n in zip(self.class_correct, self.class_count, strict=True)
                   if n > 0]
        return float(np.mean(recalls)) if recalls else None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count


@dataclass(frozen=True)
class LMEvalResult:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def mean_or_none(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


class Metric(StrEnum):
    """Every key the runtimes and tasks write to ``metrics.jsonl`` (and
    ``summary.json``); a method's own round metrics are named in its folder. A StrEnum,
    so a member is its own name wherever a string is expected (JSON keys, columns)."""

    ROUND = "round"
    CLIENTS = "clients"
    TRAIN_LOSS = "train_loss"
    GRAD_NORM_A = "grad_norm_A"
    GRAD_NORM_B = "grad_norm_B"
    NORM_A_MEAN = "norm_A_mean"
    AGGREGATED = "aggregated"
    REJECTED = "rejected"
    DROPPED = "dropped"
    UNSCORED = "unscored"
    EVAL_CLIENTS = "eval_clients"
    DP_EPSILON = "dp_epsilon"  # PLD accountant
    DP_EPSILON_RDP = "dp_epsilon_rdp"
    BYTES_UP = "bytes_up"
    BYTES_DOWN = "bytes_down"
    BYTES_UP_PER_CLIENT = "bytes_up_per_client"
    BYTES_DOWN_PER_CLIENT = "bytes_down_per_client"
    BYTES_UP_TOTAL = "bytes_up_total"
    BYTES_DOWN_TOTAL = "bytes_down_total"
    BYTES_TOTAL = "bytes_total"
    BYTES_UP_TOTAL_PER_CLIENT = "bytes_up_total_per_client"
    BYTES_DOWN_TOTAL_PER_CLIENT = "bytes_down_total_per_client"
    # network.model=wireless (sfedlora.comm.network)
    BANDWIDTH_HZ_PER_CLIENT = "bandwidth_hz_per_client"
    RATE_BPS_PER_CLIENT = "rate_bps_per_client"
    UPLOAD_SECONDS_PER_CLIENT = "upload_seconds_per_client"
    COMPUTE_SECONDS_PER_CLIENT = "compute_seconds_per_client"
    DOWNLOAD_SECONDS_PER_CLIENT = "download_seconds_per_client"
    ENERGY_JOULES_PER_CLIENT = "energy_joules_per_client"
    LATENCY_SECONDS = "latency_seconds"
    SIMULATED_SECONDS = "simulated_seconds"
    # evaluation, both tasks
    PERSONALIZED_ACCURACY = "personalized_accuracy"
    PERSONALIZED_LOSS = "personalized_loss"
    PERSONALIZED_VAL_LOSS = "personalized_val_loss"
    PERSONALIZED_VAL_LOSS_STD = "personalized_val_loss_std"
    PERSONALIZED_VAL_ACCURACY = "personalized_val_accuracy"
    GLOBAL_ACCURACY = "global_accuracy"
    GLOBAL_LOSS = "global_loss"
    ADAPTER_OUTPUT_NORM = "adapter_output_norm"
    # classification
    PERSONALIZED_ACCURACY_WEIGHTED = "personalized_accuracy_weighted"
    PERSONALIZED_BALANCED_ACCURACY = "personalized_balanced_accuracy"
    PERSONALIZED_LOSS_STD = "personalized_loss_std"
    PERSONALIZED_LOSS_MIN = "personalized_loss_min"
    PERSONALIZED_LOSS_MAX = "personalized_loss_max"
    MAJORITY_BASELINE_ACCURACY = "majority_baseline_accuracy"
    # causal-lm
    PERSONALIZED_PERPLEXITY = "personalized_perplexity"
    GLOBAL_PERPLEXITY = "global_perplexity"
    PERSONALIZED_EXACT_MATCH = "personalized_exact_match"
    GLOBAL_EXACT_MATCH = "global_exact_match"


# What depends on who took part in a round: kept out of the released artefacts where
# the sampling is secret (under DP), since amplification by subsampling holds only
# while nobody outside knows who took part. Evaluation metrics stay: they score the
# released state (and clients' own adapters) on every evaluated client, sampled or not.
PARTICIPATION_METRICS = frozenset({
    Metric.CLIENTS, Metric.DROPPED, Metric.REJECTED, Metric.TRAIN_LOSS,
    Metric.GRAD_NORM_A, Metric.GRAD_NORM_B, Metric.BYTES_UP, Metric.BYTES_DOWN,
    Metric.BYTES_UP_PER_CLIENT, Metric.BYTES_DOWN_PER_CLIENT, Metric.BYTES_UP_TOTAL,
    Metric.BYTES_DOWN_TOTAL, Metric.BYTES_TOTAL, Metric.BYTES_UP_TOTAL_PER_CLIENT,
    Metric.BYTES_DOWN_TOTAL_PER_CLIENT, Metric.BANDWIDTH_HZ_PER_CLIENT,
    Metric.RATE_BPS_PER_CLIENT, Metric.UPLOAD_SECONDS_PER_CLIENT,
    Metric.COMPUTE_SECONDS_PER_CLIENT, Metric.DOWNLOAD_SECONDS_PER_CLIENT,
    Metric.ENERGY_JOULES_PER_CLIENT, Metric.LATENCY_SECONDS, Metric.SIMULATED_SECONDS,
})  # plus every metric a method's server stage reports (ServerRound.metrics)

# What summary.json keeps of the last evaluated round.
SUMMARY_METRICS = (
    Metric.ROUND, Metric.TRAIN_LOSS, Metric.PERSONALIZED_VAL_LOSS,
    Metric.PERSONALIZED_VAL_ACCURACY, Metric.PERSONALIZED_ACCURACY,
    Metric.PERSONALIZED_ACCURACY_WEIGHTED, Metric.PERSONALIZED_BALANCED_ACCURACY,
    Metric.MAJORITY_BASELINE_ACCURACY, Metric.GLOBAL_ACCURACY, Metric.PERSONALIZED_LOSS,
    Metric.PERSONALIZED_LOSS_STD, Metric.GLOBAL_LOSS, Metric.GRAD_NORM_A, Metric.GRAD_NORM_B,
    Metric.NORM_A_MEAN, Metric.ADAPTER_OUTPUT_NORM, Metric.BYTES_UP, Metric.BYTES_DOWN,
    Metric.BYTES_UP_TOTAL, Metric.BYTES_DOWN_TOTAL, Metric.BYTES_TOTAL,
    Metric.BYTES_UP_TOTAL_PER_CLIENT, Metric.BYTES_DOWN_TOTAL_PER_CLIENT, Metric.DP_EPSILON,
    Metric.DP_EPSILON_RDP,
    Metric.PERSONALIZED_PERPLEXITY, Metric.GLOBAL_PERPLEXITY, Metric.PERSONALIZED_EXACT_MATCH,
    Metric.GLOBAL_EXACT_MATCH, Metric.SIMULATED_SECONDS,
)
