"""The task interface (see :mod:`sfedlora.tasks`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from sfedlora.core.records import ClientScores, Tensors

if TYPE_CHECKING:
    from sfedlora.core.adapters import AdapterSlots
    from sfedlora.settings import DataConfig, ExperimentConfig


class Worker(Protocol):
    """What a task may use of the runtime's worker (the runtime layer implements it;
    tasks never import the runtime)."""

    cfg: ExperimentConfig
    model: torch.nn.Module
    slots: AdapterSlots
    device: torch.device
    tokenizer: Any

    def batch(self, data: Any, idx: Any, labels: bool = True) -> dict[str, torch.Tensor]:
        """Examples ``idx`` of ``data``, collated and on the model's device."""

    def adapter_output_norm(self, tensors: Tensors, probe: Any) -> float:
        """The norm of the adapter's contribution to the outputs on ``probe``."""


class Experiment(Protocol):
    """What a task's scoring may use of the runtime's experiment: the config, the
    worker, and each client's encoded test and validation parts."""

    cfg: ExperimentConfig
    worker: Worker
    data: Any  # the federated data (label names, the pools)
    client_test: list
    client_val: list
    global_test: Any
    probe: Any  # the examples the adapter's output norm is measured on

    def client_test_pairs(self, cid: int) -> Any:
        """Client ``cid``'s test part as (prompt, answer) pairs (causal LM)."""

    def shots(self) -> list[tuple[str, str]]:
        """The few-shot examples prompts carry (causal LM)."""


@dataclass
class ClientSets:
    """Every client's encoded sets (lists indexed by client id) and the global test set."""

    train: list[Any]
    test: list[Any]
    val: list[Any]  # empty sets without data.validation_fraction
    global_test: Any


class Task:
    name: ClassVar[str]
    default_model: ClassVar[str]  # the offline default base model
    peft_task_type: ClassVar[str]  # PEFT's TaskType

    def check_config(self, cfg: ExperimentConfig) -> None:
        """Refuse settings this task cannot run with (``ValueError`` naming the fix)."""

    # --- data and model --------------------------------------------------------------

    def load_pools(self, cfg: DataConfig) -> tuple[Any, Any | None, list[str]]:
        """The training pool, the global test pool where the source has one, and the
        names of what clients are partitioned by (labels, metadata groups)."""
        raise NotImplementedError

    def partition_labels(self, pool) -> np.ndarray:
        """Per example of a pool, the id clients are partitioned by."""
        raise NotImplementedError

    def load_base_model(self, path: str, cfg: ExperimentConfig, label_names: list[str]):
        raise NotImplementedError

    def default_targets(self, model_type: str) -> list[str] | None:
        """LoRA targets for an architecture; None: PEFT's per-architecture default."""
        return None

    def encode(self, cfg: ExperimentConfig, tokenizer, data) -> ClientSets:
        raise NotImplementedError

    def collator(self, tokenizer, cfg: ExperimentConfig):
        """``collate(encoded, indices) -> batch`` with ``labels`` for the model's loss.
        A collator with ``pads_right = True`` also takes ``width=``: the batch padded on
        the right to that many positions, which changes no real token's output (a
        batched pass then pads several clients' batches alike)."""
        raise NotImplementedError

    # --- evaluation --------------------------------------------------------------------

    def score(self, exp: Experiment, tensors: Tensors, cid: int | None,
              global_part: bool) -> ClientScores:
        """Client ``cid``'s adapter on its own test (and validation) part; with
        ``global_part`` also on the global test set and its output norm. The global
        adapter is scored with ``cid=None``. Runs where the adapter lives."""
        raise NotImplementedError

    def score_many(self, exp: Experiment, items: list[tuple[Tensors, int | None, bool]]
                   ) -> list[ClientScores]:
        """:meth:`score` of each ``(tensors, cid, global_part)``: a task may score many
        adapters in shared passes (the batched pool asks it to)."""
        return [self.score(exp, tensors, cid, global_part)
                for tensors, cid, global_part in items]

    def combine(self, clients: Sequence[ClientScores], global_: ClientScores | None
                ) -> tuple[dict, list[dict]]:
        """The round's metrics from every scored client (client-id order) and the
        global adapter's scores where the method has one; and the samples to log."""
        raise NotImplementedError

    def holdout_loss(self, worker: Worker, tensors: Tensors, data) -> float:
        """Mean loss of an adapter on a held-out set (a method's own search)."""
        raise NotImplementedError

    def holdout_losses(self, worker: Worker, candidates: list[Tensors], data) -> list[float]:
        """:meth:`holdout_loss` of each candidate adapter on the same data: a task may
        score them in shared passes (FDLoRA's fusion grid in a batched run)."""
        return [self.holdout_loss(worker, tensors, data) for tensors in candidates]

    def train_loss(self, model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss ``model(**batch).loss`` is, from the model's ``logits`` on
        the batch and its ``labels``: a batched pass scores each client's rows with it."""
        raise NotImplementedError

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the model's training loss on ``batch`` averages over (its
        rows by default), so that a batch split into parts is the parts' losses
        weighted by their counts (:mod:`sfedlora.runtime.client_group`)."""
        return len(batch["labels"])


def validation_metrics(losses: list[float], accuracies: list[float] | None = None) -> dict:
    """Mean (and spread over clients) of the clients' validation figures: what
    learning rates are chosen on. Empty without a validation split."""
    if not losses:
        return {}
    out = {"personalized_val_loss": float(np.mean(losses)),
           "personalized_val_loss_std": float(np.std(losses))}
    if accuracies:
        out["personalized_val_accuracy"] = float(np.mean(accuracies))
    return out


def scored_sets(exp: Experiment, cid: int | None, global_part: bool,
                own_needs_examples: bool = True) -> dict[str, Any]:
    """What an adapter is scored on, by name: its client's test part ("own") and
    validation part ("val"), and with ``global_part`` the global test set ("global").
    With ``own_needs_examples``, a client a skewed partition left without test examples
    has no personalised score (the means are over those that have one)."""
    sets: dict[str, Any] = {}
    if cid is not None and (len(exp.client_test[cid]) or not own_needs_examples):
        sets["own"] = exp.client_test[cid]
        if len(exp.client_val[cid]):
            sets["val"] = exp.client_val[cid]
    if global_part and exp.cfg.eval.global_metrics:
        sets["global"] = exp.global_test
    return sets


def measured_together(items: Sequence[tuple[Tensors, int | None, bool]],
                      sets: Sequence[dict[str, Any]], measure_many) -> list[dict[str, Any]]:
    """Each item's sets measured with its adapter, every ``(tensors, data)`` pair in one
    call of ``measure_many`` (which returns their measurements in order)."""
    jobs = [(tensors, data) for (tensors, _, _), named in zip(items, sets, strict=True)
            for data in named.values()]
    found = iter(measure_many(jobs))
    return [{name: next(found) for name in named} for named in sets]
