"""Sequence classification: any ``AutoModelForSequenceClassification`` checkpoint,
texts with labels, scored by accuracy (plain, example-weighted and balanced) and
cross-entropy on each client's own test part and on the global test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from sfedlora.core.records import ClientScores, EvalResult, Metric, Tensors, mean_or_none
from sfedlora.data.sources import load_source
from sfedlora.modeling.client_rows import eval_passes
from sfedlora.modeling.model import eval_batches, load_tokenizer
from sfedlora.settings import ConfigError, DataConfig, ExperimentConfig
from sfedlora.tasks.base import (
    ClientSets,
    Task,
    measured_together,
    scored_sets,
    validation_metrics,
)


@dataclass(frozen=True)
class Encoded:
    """Token ids (unpadded) and labels of one set of examples."""

    input_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: np.ndarray) -> Encoded:
        return Encoded([self.input_ids[i] for i in idx], self.labels[idx])


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels, max_length: int):
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, np.asarray(labels, dtype=np.int64))


class Collator:
    """Pads a batch to its longest sequence (dynamic padding), or to ``max_length``;
    or, asked for a ``width``, to that (a batched pass pads several clients' batches
    alike, which leaves every real token's output as it was where padding is on the
    right)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pads_right = tokenizer.padding_side == "right"

    def __call__(self, data: Encoded, idx, width: int | None = None) -> dict[str, torch.Tensor]:
        length = width or self.max_length
        batch = self.tokenizer.pad(
            {"input_ids": [data.input_ids[i] for i in idx]}, return_tensors="pt",
            padding="max_length" if length else "longest", max_length=length)
        batch["labels"] = torch.from_numpy(data.labels[np.asarray(idx)])
        return dict(batch)


def load_base_model(path: str, label_names: list[str], seed: int):
    """The frozen base classifier; the head's random init is drawn from ``seed``."""
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    except OSError as exc:
        hint = "" if Path(path).exists() else (
            " If this is a hub id, this machine may have no access to the Hugging Face Hub: "
            "use a local folder (or all-MiniLM-L6-v2, shipped offline)."
        )
        raise ConfigError(f"model.name={path!r} could not be loaded: {exc}.{hint}") from None
    if model.config.pad_token_id is None:
        tokenizer_pad = load_tokenizer(path).pad_token_id
        model.config.pad_token_id = tokenizer_pad
    return model


@torch.inference_mode()
def logits(worker, tensors: Tensors, data: Encoded) -> torch.Tensor:
    """Logits of the adapter ``tensors`` on ``data`` (eval mode, in order)."""
    worker.slots.load(tensors)
    worker.model.eval()
    out = [worker.model(**worker.batch(data, idx, labels=False)).logits
           for idx in eval_batches(len(data), worker.cfg.eval.batch_size)]
    return torch.cat(out).float().cpu()


def logits_many(worker, jobs: list[tuple[Tensors, Encoded]]) -> list[torch.Tensor]:
    """:func:`logits` of each ``(tensors, data)`` job, the jobs' batches in shared
    passes (:func:`~sfedlora.modeling.client_rows.eval_passes`)."""
    out: list[list[torch.Tensor]] = [[] for _ in jobs]
    for j, _, part in eval_passes(worker, jobs, worker.cfg.eval.batch_size):
        out[j].append(part)
    return [torch.cat(parts).float().cpu() for parts in out]


def evaluate(worker, tensors: Tensors, data: Encoded) -> EvalResult:
    return result_of(logits(worker, tensors, data), data)


def result_of(scores: torch.Tensor, data: Encoded) -> EvalResult:
    """The task's counts from ``data``'s logits."""
    labels = torch.from_numpy(data.labels)
    loss = F.cross_entropy(scores, labels, reduction="sum").item()
    right = scores.argmax(-1) == labels
    classes = scores.shape[-1]
    per_class = torch.bincount(labels[right], minlength=classes)
    return EvalResult(int(right.sum()), len(data), loss, tuple(per_class.tolist()),
                      tuple(torch.bincount(labels, minlength=classes).tolist()))


def _flat(prefix: str, result: EvalResult) -> dict:
    return {f"{prefix}_correct": result.correct, f"{prefix}_count": result.count,
            f"{prefix}_loss_sum": result.loss_sum,
            f"{prefix}_class_correct": list(result.class_correct),
            f"{prefix}_class_count": list(result.class_count)}


def _result(values: dict, prefix: str) -> EvalResult | None:
    if f"{prefix}_count" not in values:
        return None
    return EvalResult(int(values[f"{prefix}_correct"]), int(values[f"{prefix}_count"]),
                      float(values[f"{prefix}_loss_sum"]),
                      tuple(int(x) for x in values.get(f"{prefix}_class_correct", [])),
                      tuple(int(x) for x in values.get(f"{prefix}_class_count", [])))


class ClassificationTask(Task):
    name = "classification"
    default_model = "all-MiniLM-L6-v2"
    peft_task_type = "SEQ_CLS"

    def load_pools(self, cfg: DataConfig):
        train, test = load_source(cfg)
        return train, test, train.label_names

    def partition_labels(self, pool) -> np.ndarray:
        return pool.labels

    def load_base_model(self, path: str, cfg: ExperimentConfig, label_names: list[str]):
        return load_base_model(path, label_names, cfg.seed)

    def encode(self, cfg: ExperimentConfig, tokenizer, data) -> ClientSets:
        train = encode(tokenizer, data.train.texts, data.train.labels, cfg.model.max_length)
        test = data.global_test
        return ClientSets(
            train=[train.subset(s.train) for s in data.clients],
            test=[train.subset(s.test) for s in data.clients],
            val=[train.subset(s.val) for s in data.clients],
            global_test=encode(tokenizer, test.texts, test.labels, cfg.model.max_length))

    def collator(self, tokenizer, cfg: ExperimentConfig):
        fixed = cfg.model.max_length if cfg.model.padding == "max_length" else None
        return Collator(tokenizer, fixed)

    def score(self, exp, tensors: Tensors, cid: int | None, global_part: bool
              ) -> ClientScores:
        sets = scored_sets(exp, cid, global_part)
        return self._scores(exp, tensors, cid, global_part, {
            prefix: evaluate(exp.worker, tensors, data) for prefix, data in sets.items()})

    def score_many(self, exp, items: list[tuple[Tensors, int | None, bool]]
                   ) -> list[ClientScores]:
        """Every adapter's sets in shared passes (:func:`logits_many`)."""
        sets = [scored_sets(exp, cid, global_part) for _, cid, global_part in items]
        results = measured_together(items, sets, lambda jobs: [
            result_of(scores, data)
            for scores, (_, data) in zip(logits_many(exp.worker, jobs), jobs, strict=True)])
        return [self._scores(exp, tensors, cid, global_part, found)
                for (tensors, cid, global_part), found in zip(items, results, strict=True)]

    def _scores(self, exp, tensors: Tensors, cid: int | None, global_part: bool,
                results: dict[str, EvalResult]) -> ClientScores:
        values = {}
        for prefix, result in results.items():
            values |= _flat(prefix, result)
        if "own" in results:
            # what predicting the client's most frequent training label scores on its
            # own test part: under Dirichlet splits, far above chance
            own = exp.data.train.labels[exp.data.clients[cid].train]
            if len(own):
                majority = np.bincount(own).argmax()
                values["majority"] = float(np.mean(exp.client_test[cid].labels == majority))
        if global_part:
            values["norm"] = exp.worker.adapter_output_norm(tensors, exp.probe)
        return ClientScores(values)

    def combine(self, clients: Sequence[ClientScores], global_: ClientScores | None
                ) -> tuple[dict, list[dict]]:
        every = [*clients, *([global_] if global_ is not None else [])]
        own = [r for s in clients if (r := _result(s.values, "own")) is not None]
        on_global = [r for s in every if (r := _result(s.values, "global")) is not None]
        val = [r for s in clients if (r := _result(s.values, "val")) is not None]
        losses = [r.loss for r in own]
        personal = {
            Metric.PERSONALIZED_ACCURACY: float(np.mean([r.accuracy for r in own])),
            Metric.PERSONALIZED_ACCURACY_WEIGHTED: sum(r.correct for r in own)
            / sum(r.count for r in own),
            Metric.PERSONALIZED_BALANCED_ACCURACY: mean_or_none(
                [r.balanced_accuracy for r in own]),
            Metric.PERSONALIZED_LOSS: float(np.mean(losses)),
            # the spread over clients: a client's test part may hold only a few examples
            Metric.PERSONALIZED_LOSS_STD: float(np.std(losses)),
            Metric.PERSONALIZED_LOSS_MIN: float(np.min(losses)),
            Metric.PERSONALIZED_LOSS_MAX: float(np.max(losses)),
            Metric.MAJORITY_BASELINE_ACCURACY: mean_or_none(
                [s.values.get("majority") for s in clients]),
        } if own else {}
        metrics = {
            **validation_metrics([r.loss for r in val], [r.accuracy for r in val]),
            **personal,
            Metric.GLOBAL_ACCURACY: mean_or_none([r.accuracy for r in on_global]),
            Metric.GLOBAL_LOSS: mean_or_none([r.loss for r in on_global]),
            Metric.ADAPTER_OUTPUT_NORM: float(np.mean(
                [s.values["norm"] for s in every if "norm" in s.values])),
        }
        return {str(k): v for k, v in metrics.items()}, []

    def holdout_loss(self, worker, tensors: Tensors, data) -> float:
        return evaluate(worker, tensors, data).loss

    def holdout_losses(self, worker, candidates: list[Tensors], data) -> list[float]:
        return [result_of(scores, data).loss
                for scores in logits_many(worker, [(t, data) for t in candidates])]

    def train_loss(self, model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # transformers' single-label classification loss: the mean cross-entropy
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
