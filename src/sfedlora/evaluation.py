"""Evaluation of a federated run's adapters, per task.

Personalised figures score each client's own adapter (global parts + its private
parts) on its own test split; global figures score the global adapter on the global
test set where the method has one, and otherwise the mean over clients of each
client's adapter there. ``adapter_output_norm`` is the paper's stability signal,
``||gamma B A x||`` on a fixed probe batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sfedlora import lm
from sfedlora.experiment import Experiment
from sfedlora.worker import EvalResult, mean_or_none

Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterView:
    """What evaluation may look at: the experiment and the current adapters."""

    exp: Experiment
    has_global_adapter: bool
    client_adapter: Callable[[int], Adapter]
    global_adapter: Callable[[], Adapter]


@dataclass(frozen=True)
class Scores:
    """One adapter's evaluation: on its client's own test part (``own``), on the
    global test set (``on_global``) and its output norm on the probe batch. Computed
    where the adapter lives (this process, or a Flower node) and combined by
    :func:`combine_classification`."""

    own: EvalResult | None
    on_global: EvalResult | None
    norm: float | None
    val: EvalResult | None = None  # on the client's validation part, where it has one


def score_adapter(exp: Experiment, tensors: Adapter, cid: int | None,
                  global_part: bool) -> Scores:
    """Client ``cid``'s adapter on its own test part; with ``global_part`` also on the
    global test set (when ``eval.global_metrics``) and its output norm. The global
    adapter is scored with ``cid=None`` (no own part)."""
    worker = exp.worker
    own = worker.evaluate(tensors, exp.client_test[cid]) if cid is not None else None
    val = (worker.evaluate(tensors, exp.client_val[cid])
           if cid is not None and len(exp.client_val[cid]) else None)
    if not global_part:
        return Scores(own, None, None, val)
    on_global = (worker.evaluate(tensors, exp.global_test) if exp.cfg.eval.global_metrics
                 else None)
    return Scores(own, on_global, worker.adapter_output_norm(tensors, exp.probe), val)


def combine_classification(clients: list[Scores], global_: Scores | None) -> dict:
    """The metrics from every client's scores (in client-id order) and the global
    adapter's, where the method has one."""
    every = [*clients, *([global_] if global_ is not None else [])]
    own = [s.own for s in clients]
    on_global = [s.on_global for s in every if s.on_global is not None]
    losses = [r.loss for r in own]
    val = [s.val for s in clients if s.val is not None]
    return {
        **validation_metrics([r.loss for r in val], [r.accuracy for r in val]),
        "personalized_accuracy": float(np.mean([r.accuracy for r in own])),
        "personalized_accuracy_weighted": sum(r.correct for r in own)
        / sum(r.count for r in own),
        "personalized_balanced_accuracy": mean_or_none([r.balanced_accuracy for r in own]),
        "personalized_loss": float(np.mean(losses)),
        # the spread over clients: a client's test part may hold only a few examples
        "personalized_loss_std": float(np.std(losses)),
        "personalized_loss_min": float(np.min(losses)),
        "personalized_loss_max": float(np.max(losses)),
        "global_accuracy": mean_or_none([r.accuracy for r in on_global]),
        "global_loss": mean_or_none([r.loss for r in on_global]),
        "adapter_output_norm": float(np.mean([s.norm for s in every if s.norm is not None])),
    }


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


def evaluate_classification(view: AdapterView) -> dict:
    """Personalised accuracy (each client's adapter on its own test part) and
    global accuracy (the global adapter where the method has one, else the mean
    over clients of each client's adapter on the global test set)."""
    clients = [score_adapter(view.exp, view.client_adapter(cid), cid,
                             global_part=not view.has_global_adapter)
               for cid in range(view.exp.cfg.clients.num)]
    global_ = (score_adapter(view.exp, view.global_adapter(), None, global_part=True)
               if view.has_global_adapter else None)
    return combine_classification(clients, global_)


def evaluate_lm(view: AdapterView) -> tuple[dict, list[dict]]:
    """Perplexity on response tokens (each client's adapter on its own test part, and
    the global adapter or the mean over clients on the global test set), plus exact
    match of greedy answers on the first ``eval.generate`` examples of each."""
    exp = view.exp
    worker, cfg = exp.worker, exp.cfg
    shots = exp.shots()
    n = cfg.eval.generate
    own, own_em, samples = [], [], []

    def exact_match(tensors, pairs, who: str) -> float | None:
        if n == 0 or len(pairs) == 0:
            return None
        pairs = pairs.subset(np.arange(min(n, len(pairs))))
        prompts = [lm.prompt_text(worker.tokenizer, p, shots) for p in pairs.prompts]
        answers = worker.generate(tensors, prompts)
        hits = []
        for q, ref, out in zip(pairs.prompts, pairs.responses, answers, strict=True):
            want, got = lm.parse_answer(ref), lm.parse_answer(out)
            hits.append(want is not None and want == got)
            samples.append({"adapter": who, "question": q, "reference": want,
                            "parsed": got, "correct": hits[-1], "generated": out})
        return float(np.mean(hits))

    val = []
    for cid in range(cfg.clients.num):
        tensors = view.client_adapter(cid)
        own.append(worker.lm_loss(tensors, exp.client_test[cid]))
        if len(exp.client_val[cid]):
            val.append(worker.lm_loss(tensors, exp.client_val[cid]).loss)
        own_em.append(exact_match(tensors, exp.client_test_pairs(cid), f"client_{cid}"))
    if view.has_global_adapter:
        adapters = {"global": view.global_adapter()}
    else:
        adapters = {f"client_{c}": view.client_adapter(c) for c in range(cfg.clients.num)}
    on_global, global_em, norms = [], [], []
    for who, tensors in adapters.items():
        if cfg.eval.global_metrics:
            on_global.append(worker.lm_loss(tensors, exp.global_test))
            global_em.append(exact_match(tensors, exp.data.global_test, f"{who}@global"))
        norms.append(worker.adapter_output_norm(tensors, exp.probe))
    return {
        **validation_metrics(val),
        "personalized_perplexity": float(np.mean([r.perplexity for r in own])),
        "personalized_loss": float(np.mean([r.loss for r in own])),
        "global_perplexity": mean_or_none([r.perplexity for r in on_global]),
        "global_loss": mean_or_none([r.loss for r in on_global]),
        "personalized_exact_match": mean_or_none(own_em),
        "global_exact_match": mean_or_none(global_em),
        # the contract's accuracy keys carry exact match for a language model
        "personalized_accuracy": mean_or_none(own_em),
        "global_accuracy": mean_or_none(global_em),
        "adapter_output_norm": float(np.mean(norms)),
    }, samples
