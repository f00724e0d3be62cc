"""Client-side execution: a client's round (fit) and evaluation on the one model.

A :class:`Worker` owns the process's model and runs any client on it by swapping
adapter tensors in and out. It follows the method's description (what trains, what
goes up, what stays) and contains no method-specific logic, so every runtime (the
in-process simulator, a Flower ClientApp) can call it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.vera import VeraLayer

from sfedlora import codecs
from sfedlora.adapters import TAG_A_INIT, AdapterSlots, derive_seed
from sfedlora.config import ExperimentConfig
from sfedlora.merging import BaseWeights, split_merges
from sfedlora.methods import Method, Part
from sfedlora.ranks import pad, truncate
from sfedlora.task import Collator, Encoded, eval_batches, steps_per_round, train_batches

TAG_TRAIN = 202
TAG_BATCHES = 203


@dataclass
class ClientState:
    """What a client keeps across rounds, also while it is not sampled."""

    private: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    residual: dict[str, torch.Tensor] | None = None  # upload error feedback
    personal: dict[str, torch.Tensor] | None = None  # FDLoRA's personal adapter


@dataclass(frozen=True)
class FitResult:
    upload: bytes
    num_examples: int
    train_loss: float
    grad_norm_A: float | None
    grad_norm_B: float | None
    steps: int


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


def lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant" or total <= 0:
        return 1.0
    progress = min(step / total, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Worker:
    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module, collate: Collator,
                 method: Method, tokenizer=None):
        self.cfg, self.model, self.collate, self.method = cfg, model, collate, method
        self.tokenizer = tokenizer
        self.up = cfg.codec("up")
        self.slots = AdapterSlots(model)
        self.spec = self.slots.spec()
        self.shared_init = self.slots.initial_state(derive_seed(cfg.seed, TAG_A_INIT))
        self._a_names = self.slots.names({Part.A})
        self._lora_layers = [m for m in model.modules()
                             if isinstance(m, LoraLayer | VeraLayer)]
        self.base = BaseWeights(model)  # FLoRA merges into these
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            # Adam's second moments of near-zero gradients fall into the denormal range,
            # where CPU arithmetic is many times slower; flushing them to zero costs
            # nothing in accuracy and keeps runs deterministic.
            torch.set_flush_denormal(True)

    def batch(self, data: Encoded, idx, labels: bool = True) -> dict[str, torch.Tensor]:
        batch = self.collate(data, idx)
        if not labels:
            batch.pop("labels")
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- which tensors a client starts from ---------------------------------------

    def client_init(self, cid: int) -> dict[str, torch.Tensor]:
        if self.cfg.a_init == "independent":
            return self.slots.initial_state(derive_seed(self.cfg.seed, TAG_A_INIT, 1, cid))
        return self.shared_init

    def assemble(self, cid: int, state: ClientState, shared: dict[str, torch.Tensor],
                 round_idx: int | None = None):
        """Client ``cid``'s full adapter: its init, then its private parts, then the
        server's shared parts on top. Once the server holds A, the client's own A draw
        would be overwritten, so it is not drawn. Where the method re-initialises parts
        every round (FLoRA), the init of a training round is a fresh draw at the
        client's rank."""
        if self.method.fresh and round_idx is not None:
            fresh = self.slots.initial_state(derive_seed(self.cfg.seed, TAG_A_INIT, 2,
                                                         round_idx, cid))
            base = pad(self._truncate(fresh, self.cfg.client_rank(cid)), self.spec)
        else:
            has_a = all(n in shared for n in self._a_names)
            base = self.shared_init if has_a else self.client_init(cid)
        return {**base, **state.private, **shared}

    def drawn_start(self, cid: int, round_idx: int) -> dict[str, torch.Tensor]:
        """The adapter client ``cid`` starts round ``round_idx`` from before anything
        downloaded is applied: its own A draw (independent or fresh), B zero, the head
        as loaded. Every draw is seeded from the public config, so the server can
        measure a change to a tensor it never sent against it."""
        return self.assemble(cid, ClientState(), {}, round_idx)

    def scored_adapter(self, cid: int, state: ClientState, shared: dict[str, torch.Tensor],
                       holdout) -> tuple[dict[str, torch.Tensor], list[float] | None]:
        """The adapter client ``cid`` is evaluated and exported with, and FDLoRA's
        fusion weights: its assembled adapter, fused with its personal copy where the
        method keeps one (weights chosen on the client's held-out slice)."""
        own = self.assemble(cid, state, shared)
        if not self.method.personal_adapter or state.personal is None:
            return own, None
        w1, w2, _ = self.choose_fusion(own, state.personal, holdout)
        return fuse(own, state.personal, w1, w2), [w1, w2]

    def global_adapter(self, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.shared_init, **shared}

    def initial_server_state(self) -> dict[str, torch.Tensor]:
        """What the server holds before round 1: the shared parts of the common init
        (without A when every client draws its own A)."""
        parts = set(self.method.shared - self.method.fixed - self.method.fresh)
        if self.cfg.a_init == "independent":
            parts.discard(Part.A)
        return {n: self.shared_init[n].clone() for n in self.slots.names(parts)}

    # --- local training -----------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        # Every adapter tensor in a fixed order; frozen ones get no gradient and so are
        # left untouched, which keeps a stored optimizer state valid across rounds
        # whose trainable parts differ (RoLoRA). The head, trained from scratch, may
        # have its own learning rate.
        # A and B may have learning rates of their own (local.lr_A / lr_B): one group
        # per distinct learning rate, A and B together when theirs are equal.
        local = self.cfg.local
        lr = {Part.A: local.lr_A or local.lr, Part.B: local.lr_B or local.lr,
              Part.HEAD: local.head_lr or local.lr}
        order = [[Part.A, Part.B], [Part.HEAD]] if lr[Part.A] == lr[Part.B] else \
            [[Part.A], [Part.B], [Part.HEAD]]
        groups = [{"params": [p for n, p in self.slots.params.items()
                              if self.slots.parts[n] in parts], "base_lr": lr[parts[0]]}
                  for parts in order]
        groups = [g | {"lr": g["base_lr"]} for g in groups if g["params"]]
        if local.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=local.lr, momentum=local.momentum,
                                   weight_decay=local.weight_decay)
        return torch.optim.AdamW(groups, lr=local.lr, weight_decay=local.weight_decay)

    def fit(self, cid: int, state: ClientState, download: bytes, data: Encoded,
            round_idx: int) -> FitResult:
        """Run client ``cid``'s local work for round ``round_idx`` (1-based); updates
        ``state`` in place and returns the serialised upload."""
        cfg, local = self.cfg, self.cfg.local
        plan = self.method.plan(round_idx)
        rank = cfg.client_rank(cid)
        # truncated to ``rank`` where ranks are mixed; FLoRA's factors go into the base
        received, merges = split_merges(codecs.decode(download))
        self.base.apply(merges)
        self.slots.load(self.assemble(cid, state, pad(received, self.spec), round_idx))
        self.slots.set_trainable(plan.train)
        optimizer = self._optimizer()
        if local.keep_optimizer_state and state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        # FLoRA: a fresh adapter at the scale of the client's own rank
        with (self._scaled(cfg.client_gamma(cid)) if self.method.merge_into_base
              else contextlib.nullcontext()):
            losses, norms_a, norms_b = self._train(cid, optimizer, data, round_idx)

        state.private = self.slots.snapshot(self.method.private)
        if self.method.personal_adapter and (
                state.personal is None or round_idx % cfg.personal.sync_every == 0):
            state.personal = self.slots.snapshot(set(Part))
        if local.keep_optimizer_state:
            state.optimizer = copy.deepcopy(optimizer.state_dict())
        upload, state.residual = self.up.send(
            self._truncate(self.slots.snapshot(plan.upload), rank), reference=received,
            residual=state.residual, meta={"client": cid, "round": round_idx})
        return FitResult(
            upload=upload,
            num_examples=len(data),
            train_loss=float(np.mean(losses)),
            grad_norm_A=mean_or_none(norms_a),
            grad_norm_B=mean_or_none(norms_b),
            steps=len(losses),
        )

    def _train(self, cid: int, optimizer: torch.optim.Optimizer, data: Encoded,
               round_idx: int) -> tuple[list[float], list, list]:
        """The local steps: losses and the gradient norms of A and B per step."""
        cfg, local = self.cfg, self.cfg.local
        per_round = steps_per_round(len(data), local.batch_size, local.steps, local.epochs)
        total = per_round * cfg.rounds
        a_names = self.slots.names({Part.A})
        b_names = self.slots.names({Part.B})
        trainable = [p for p in self.slots.params.values() if p.requires_grad]

        torch.manual_seed(derive_seed(cfg.seed, TAG_TRAIN, round_idx, cid))  # dropout
        batches = train_batches(data, local.batch_size, local.steps, local.epochs,
                                derive_seed(cfg.seed, TAG_BATCHES, round_idx, cid))
        self.model.train()
        losses, norms_a, norms_b = [], [], []
        for k, idx in enumerate(batches):
            step = (round_idx - 1) * per_round + k
            factor = lr_factor(local.schedule, step, total)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss = self.model(**self.batch(data, idx)).loss
            loss.backward()
            losses.append(loss.item())
            del loss  # release the step's graph before the next forward pass
            norms_a.append(self._grad_norm(a_names))
            norms_b.append(self._grad_norm(b_names))
            if local.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, local.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return losses, norms_a, norms_b

    @contextlib.contextmanager
    def _scaled(self, value: float):
        """Every LoRA layer at scale ``value`` inside the block, its own scale after."""
        layers = list(self.base.layers.values())
        own = [layer.scaling["default"] for layer in layers]
        for layer in layers:
            layer.scaling["default"] = value
        try:
            yield
        finally:
            for layer, scale in zip(layers, own, strict=True):
                layer.scaling["default"] = scale

    def _truncate(self, tensors: dict[str, torch.Tensor], rank: int):
        return tensors if rank == self.cfg.lora.rank else truncate(tensors, rank)

    def _grad_norm(self, names: list[str]) -> float | None:
        grads = [self.slots.params[n].grad for n in names]
        grads = [g for g in grads if g is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    # --- evaluation -----------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, tensors: dict[str, torch.Tensor], data: Encoded) -> torch.Tensor:
        """Logits of the adapter ``tensors`` on ``data`` (eval mode, in order)."""
        self.slots.load(tensors)
        self.model.eval()
        out = [self.model(**self.batch(data, idx, labels=False)).logits
               for idx in eval_batches(len(data), self.cfg.eval.batch_size)]
        return torch.cat(out).float().cpu()

    def evaluate(self, tensors: dict[str, torch.Tensor], data: Encoded) -> EvalResult:
        logits = self.logits(tensors, data)
        labels = torch.from_numpy(data.labels)
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        right = logits.argmax(-1) == labels
        classes = logits.shape[-1]
        per_class = torch.bincount(labels[right], minlength=classes)
        return EvalResult(int(right.sum()), len(data), loss,
                          tuple(per_class.tolist()),
                          tuple(torch.bincount(labels, minlength=classes).tolist()))

    @torch.inference_mode()
    def lm_loss(self, tensors: dict[str, torch.Tensor], data) -> LMEvalResult:
        """Summed token loss over the response tokens of ``data`` (for perplexity)."""
        self.slots.load(tensors)
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        for idx in eval_batches(len(data), self.cfg.eval.batch_size):
            batch = self.batch(data, idx)
            logits = self.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                        labels.flatten(), ignore_index=-100,
                                        reduction="sum").item()
            tokens += int((labels != -100).sum())
        return LMEvalResult(loss_sum, tokens)

    @torch.inference_mode()
    def generate(self, tensors: dict[str, torch.Tensor], prompts: list[str]) -> list[str]:
        """Greedy completions of already formatted prompts (left-padded batches)."""
        self.slots.load(tensors)
        self.model.eval()
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        out: list[str] = []
        try:
            for start in range(0, len(prompts), self.cfg.eval.batch_size):
                enc = tok(prompts[start : start + self.cfg.eval.batch_size],
                          add_special_tokens=False, padding=True, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items()}
                gen = self.model.generate(**enc, max_new_tokens=self.cfg.eval.max_new_tokens,
                                          do_sample=False, pad_token_id=tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                out += tok.batch_decode(new, skip_special_tokens=True)
        finally:
            tok.padding_side = side
        return out

    # --- FDLoRA's fusion -------------------------------------------------------------

    def holdout_loss(self, tensors: dict[str, torch.Tensor], data) -> float:
        if self.cfg.task == "causal-lm":
            return self.lm_loss(tensors, data).loss
        return self.evaluate(tensors, data).loss

    def choose_fusion(self, global_: dict[str, torch.Tensor],
                      personal: dict[str, torch.Tensor], holdout
                      ) -> tuple[float, float, float]:
        """``(w1, w2, loss)`` minimising the held-out loss of ``fuse`` over the grid
        (gradient-free; the first minimum in grid order wins ties)."""
        grid = self.cfg.personal.grid
        best: tuple[float, float, float] | None = None
        for w1 in grid:
            for w2 in grid:
                if w1 == 0 and w2 == 0:
                    continue
                loss = self.holdout_loss(fuse(global_, personal, w1, w2), holdout)
                if best is None or loss < best[2]:
                    best = (w1, w2, loss)
        assert best is not None, "personal.grid has a non-zero value (validated)"
        return best

    @torch.inference_mode()
    def adapter_output_norm(self, tensors: dict[str, torch.Tensor], probe: Encoded) -> float:
        """Mean over adapted layers of the mean over real tokens of ``||gamma B A x||``
        on a fixed probe batch: the paper's stability signal."""
        self.slots.load(tensors)
        self.model.eval()
        batch = self.batch(probe, np.arange(len(probe)), labels=False)
        mask = batch["attention_mask"].bool()
        per_layer: list[float] = []

        def hook(module, inputs, _output):
            norms = _adapter_delta(module, inputs[0]).norm(dim=-1)
            if norms.shape == mask.shape:
                norms = norms[mask]
            per_layer.append(norms.mean().item())

        handles = [m.register_forward_hook(hook) for m in self._lora_layers]
        try:
            self.model(**batch)
        finally:
            for h in handles:
                h.remove()
        return float(np.mean(per_layer))


def fuse(global_: dict[str, torch.Tensor], personal: dict[str, torch.Tensor], w1: float,
         w2: float) -> dict[str, torch.Tensor]:
    """``w1 * global + w2 * personal`` on every adapter tensor."""
    return {n: w1 * t + w2 * personal[n] for n, t in global_.items()}


def _adapter_delta(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the adapter adds to the frozen layer's output (eval mode, no dropout):
    ``gamma B A x`` for LoRA, ``lambda_b * (B (lambda_d * (A x)))`` for VeRA."""
    if isinstance(module, VeraLayer):
        a = module.vera_A["default"][:, : module.in_features]
        b = module.vera_B["default"][: module.out_features, :]
        inner = module.vera_lambda_d["default"] * F.linear(x, a)
        return module.vera_lambda_b["default"] * F.linear(inner, b)
    delta = module.lora_B["default"](module.lora_A["default"](x))
    return delta * module.scaling["default"]


def mean_or_none(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
