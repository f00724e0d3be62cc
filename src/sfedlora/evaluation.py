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


def evaluate_classification(view: AdapterView) -> dict:
    """Personalised accuracy (each client's adapter on its own test part) and
    global accuracy (the global adapter where the method has one, else the mean
    over clients of each client's adapter on the global test set)."""
    exp = view.exp
    worker = exp.worker
    own: list[EvalResult] = []
    on_global: list[EvalResult] = []
    norms: list[float] = []
    scored_globally = exp.cfg.eval.global_metrics
    for cid in range(exp.cfg.clients.num):
        tensors = view.client_adapter(cid)
        own.append(worker.evaluate(tensors, exp.client_test[cid]))
        if not view.has_global_adapter:
            if scored_globally:
                on_global.append(worker.evaluate(tensors, exp.global_test))
            norms.append(worker.adapter_output_norm(tensors, exp.probe))
    if view.has_global_adapter:
        tensors = view.global_adapter()
        if scored_globally:
            on_global.append(worker.evaluate(tensors, exp.global_test))
        norms.append(worker.adapter_output_norm(tensors, exp.probe))
    return {
        "personalized_accuracy": float(np.mean([r.accuracy for r in own])),
        "personalized_accuracy_weighted": sum(r.correct for r in own)
        / sum(r.count for r in own),
        "personalized_loss": float(np.mean([r.loss for r in own])),
        "global_accuracy": mean_or_none([r.accuracy for r in on_global]),
        "global_loss": mean_or_none([r.loss for r in on_global]),
        "adapter_output_norm": float(np.mean(norms)),
    }



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

    for cid in range(cfg.clients.num):
        tensors = view.client_adapter(cid)
        own.append(worker.lm_loss(tensors, exp.client_test[cid]))
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
