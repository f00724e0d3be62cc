"""Causal-LM supervised fine-tuning on prompt/response pairs (data handling, prompt
formats and answer parsing in :mod:`sfedlora.modeling.lm`). Scored by perplexity on response
tokens and by exact match of greedy answers, both on each client's own test part and on
the global test set; exact match fills the accuracy keys."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sfedlora.core.records import ClientScores, LMEvalResult, Metric, Tensors, mean_or_none
from sfedlora.data.sources import load_frames
from sfedlora.modeling import lm
from sfedlora.modeling.client_rows import eval_passes
from sfedlora.modeling.model import eval_batches
from sfedlora.settings import ConfigError, DataConfig, ExperimentConfig
from sfedlora.tasks.base import (
    ClientSets,
    Task,
    measured_together,
    scored_sets,
    validation_metrics,
)

GLOBAL_SUFFIX = "@global"


def load_causal_lm(path: str, cfg: ExperimentConfig):
    """The frozen base LM; 4-bit base weights (QLoRA) on CUDA when asked."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if cfg.model.load_in_4bit:
        if not torch.cuda.is_available():
            raise ConfigError("model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit "
                              "kernels); on this machine set model.load_in_4bit=false")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("model.load_in_4bit=true needs: pip install bitsandbytes") from None
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": 0}}
    torch.manual_seed(cfg.seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name={path!r} could not be loaded: {exc}") from None
    if cfg.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


@torch.inference_mode()
def lm_loss(worker, tensors: Tensors, data) -> LMEvalResult:
    """Summed token loss over the response tokens of ``data`` (for perplexity)."""
    worker.slots.load(tensors)
    worker.model.eval()
    loss_sum, tokens = 0.0, 0
    for idx in eval_batches(len(data), worker.cfg.eval.batch_size):
        batch = worker.batch(data, idx)
        logits = worker.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits
        batch_loss, batch_tokens = _token_loss(logits, batch["labels"])
        loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    return LMEvalResult(loss_sum, tokens)


def lm_loss_many(worker, jobs: list[tuple[Tensors, object]]) -> list[LMEvalResult]:
    """:func:`lm_loss` of each ``(tensors, data)`` job, the jobs' batches in shared
    passes (:func:`~sfedlora.modeling.client_rows.eval_passes`)."""
    sums, counts = [0.0] * len(jobs), [0] * len(jobs)
    for j, batch, logits in eval_passes(worker, jobs, worker.cfg.eval.batch_size):
        batch_loss, batch_tokens = _token_loss(logits, batch["labels"])
        sums[j], counts[j] = sums[j] + batch_loss, counts[j] + batch_tokens
    return [LMEvalResult(s, n) for s, n in zip(sums, counts, strict=True)]


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The summed next-token loss over labelled positions, and their count."""
    labels = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=-100, reduction="sum").item()
    return loss, int((labels != -100).sum())


@torch.inference_mode()
def generate(worker, tensors: Tensors, prompts: list[str]) -> list[str]:
    """Greedy completions of already formatted prompts (left-padded batches)."""
    worker.slots.load(tensors)
    worker.model.eval()
    tok, size = worker.tokenizer, worker.cfg.eval.batch_size
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), size):
            enc = tok(prompts[start : start + size], add_special_tokens=False, padding=True,
                      return_tensors="pt")
            enc = {k: v.to(worker.device) for k, v in enc.items()}
            gen = worker.model.generate(**enc, max_new_tokens=worker.cfg.eval.max_new_tokens,
                                        do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                    skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def exact_match(exp, tensors: Tensors, pairs: lm.PairDataset, who: str,
                samples: list[dict]) -> float | None:
    """Exact match of greedy answers on the first ``eval.generate`` pairs (None when
    there are none); every answer is appended to ``samples``."""
    n = exp.cfg.eval.generate
    if n == 0 or len(pairs) == 0:
        return None
    pairs = pairs.subset(np.arange(min(n, len(pairs))))
    shots = exp.shots()
    prompts = [lm.prompt_text(exp.worker.tokenizer, p, shots) for p in pairs.prompts]
    answers = generate(exp.worker, tensors, prompts)
    hits = []
    for q, ref, out in zip(pairs.prompts, pairs.responses, answers, strict=True):
        want, got = lm.parse_answer(ref), lm.parse_answer(out)
        hits.append(want is not None and want == got)
        samples.append({"adapter": who, "question": q, "reference": want, "parsed": got,
                        "correct": hits[-1], "generated": out})
    return float(np.mean(hits))


def _perplexities(values: list[dict], prefix: str) -> list[LMEvalResult]:
    return [LMEvalResult(float(v[f"{prefix}_loss_sum"]), int(v[f"{prefix}_tokens"]))
            for v in values if f"{prefix}_tokens" in v]


class CausalLMTask(Task):
    name = "causal-lm"
    default_model = lm.SMOLLM2
    peft_task_type = "CAUSAL_LM"

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.model.padding != "longest":
            raise ValueError("model.padding=max_length applies to classification batches; "
                             "causal-lm packs or pads its own; remove model.padding")
        if cfg.data.source == "bbc":
            raise ValueError(
                "task=causal-lm needs prompt/response data: set data.dataset=gsm8k, or "
                "data.source=files with data.train_path (JSONL or CSV), or data.source=hf")

    def load_pools(self, cfg: DataConfig):
        frame, test_frame, where = load_frames(cfg)
        train, groups = lm.pairs_from_frame(frame, cfg, where)
        test = (lm.pairs_from_frame(test_frame, cfg, str(cfg.test_path or where), groups)[0]
                if test_frame is not None else None)
        return train, test, [str(g) for g in groups]

    def partition_labels(self, pool) -> np.ndarray:
        return pool.groups  # metadata groups; all zero without metadata

    def load_base_model(self, path: str, cfg: ExperimentConfig, label_names: list[str]):
        return load_causal_lm(path, cfg)

    def default_targets(self, model_type: str) -> list[str] | None:
        return lm.default_targets(model_type)

    def encode(self, cfg: ExperimentConfig, tokenizer, data) -> ClientSets:
        def enc(pairs, packing: bool = False):
            return lm.encode_pairs(tokenizer, pairs, cfg.model.max_length, packing)

        return ClientSets(
            train=[enc(data.train.subset(s.train), cfg.data.packing) for s in data.clients],
            test=[enc(data.train.subset(s.test)) for s in data.clients],
            val=[enc(data.train.subset(s.val)) for s in data.clients],
            global_test=enc(data.global_test))

    def loss_weight(self, batch) -> int:
        """The target tokens: a causal LM's loss is the mean over every position whose
        next token is labelled (not -100), across the batch."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def collator(self, tokenizer, cfg: ExperimentConfig):
        return lm.LMCollator(tokenizer)

    def train_loss(self, model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own causal-LM loss (shifted, mean over labelled tokens)."""
        base = model.get_base_model()
        return base.loss_function(logits=logits, labels=labels,
                                  vocab_size=base.config.vocab_size)

    def score(self, exp, tensors: Tensors, cid: int | None, global_part: bool
              ) -> ClientScores:
        sets = scored_sets(exp, cid, global_part, own_needs_examples=False)
        return self._scores(exp, tensors, cid, global_part, {
            name: lm_loss(exp.worker, tensors, data) for name, data in sets.items()})

    def score_many(self, exp, items: list[tuple[Tensors, int | None, bool]]
                   ) -> list[ClientScores]:
        """Every adapter's losses in shared passes (:func:`lm_loss_many`); answers are
        generated one adapter at a time."""
        sets = [scored_sets(exp, cid, global_part, own_needs_examples=False)
                for _, cid, global_part in items]
        found = measured_together(items, sets, lambda jobs: lm_loss_many(exp.worker, jobs))
        return [self._scores(exp, tensors, cid, global_part, f)
                for (tensors, cid, global_part), f in zip(items, found, strict=True)]

    def _scores(self, exp, tensors: Tensors, cid: int | None, global_part: bool,
                losses: dict[str, LMEvalResult]) -> ClientScores:
        worker, values, samples = exp.worker, {}, []
        who = "global" if cid is None else f"client_{cid}"
        if cid is not None:
            own = losses["own"]
            values |= {"own_loss_sum": own.loss_sum, "own_tokens": own.tokens}
            if "val" in losses:
                values["val_loss"] = losses["val"].loss
            em = exact_match(exp, tensors, exp.client_test_pairs(cid), who, samples)
            if em is not None:
                values["own_em"] = em
        if global_part:
            if exp.cfg.eval.global_metrics:
                on_global = losses["global"]
                values |= {"global_loss_sum": on_global.loss_sum,
                           "global_tokens": on_global.tokens}
                em = exact_match(exp, tensors, exp.data.global_test, who + GLOBAL_SUFFIX,
                                 samples)
                if em is not None:
                    values["global_em"] = em
            values["norm"] = worker.adapter_output_norm(tensors, exp.probe)
        return ClientScores(values, samples=samples)

    def combine(self, clients: Sequence[ClientScores], global_: ClientScores | None
                ) -> tuple[dict, list[dict]]:
        every = [*clients, *([global_] if global_ is not None else [])]
        own = _perplexities([s.values for s in clients], "own")
        on_global = _perplexities([s.values for s in every], "global")
        own_em = [s.values.get("own_em") for s in clients]
        global_em = [s.values.get("global_em") for s in every]
        # the clients' own answers first, then every answer on the global test set
        samples = [x for s in every for x in s.samples
                   if not x["adapter"].endswith(GLOBAL_SUFFIX)]
        samples += [x for s in every for x in s.samples if x["adapter"].endswith(GLOBAL_SUFFIX)]
        metrics = {
            **validation_metrics([s.values["val_loss"] for s in clients
                                  if "val_loss" in s.values]),
            Metric.PERSONALIZED_PERPLEXITY: float(np.mean([r.perplexity for r in own])),
            Metric.PERSONALIZED_LOSS: float(np.mean([r.loss for r in own])),
            Metric.GLOBAL_PERPLEXITY: mean_or_none([r.perplexity for r in on_global]),
            Metric.GLOBAL_LOSS: mean_or_none([r.loss for r in on_global]),
            Metric.PERSONALIZED_EXACT_MATCH: mean_or_none(own_em),
            Metric.GLOBAL_EXACT_MATCH: mean_or_none(global_em),
            # the contract's accuracy keys carry exact match for a language model
            Metric.PERSONALIZED_ACCURACY: mean_or_none(own_em),
            Metric.GLOBAL_ACCURACY: mean_or_none(global_em),
            Metric.ADAPTER_OUTPUT_NORM: float(np.mean(
                [s.values["norm"] for s in every if "norm" in s.values])),
        }
        return {str(k): v for k, v in metrics.items()}, samples

    def holdout_loss(self, worker, tensors: Tensors, data) -> float:
        return lm_loss(worker, tensors, data).loss

    def holdout_losses(self, worker, candidates: list[Tensors], data) -> list[float]:
        return [found.loss for found in lm_loss_many(worker, [(t, data) for t in candidates])]
