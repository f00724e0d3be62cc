"""Client-side execution: a client's round (fit) and its scores, on the one model.

A :class:`Worker` owns the process's model and runs any client on it by swapping
adapter tensors in and out. It follows the method's description (what trains, what
goes up, what stays) and calls the method's client stage at fixed points; what a
batch is, the loss and the scores are the task's. It contains no method- or
task-specific logic, so every runtime (the in-process pool, a Flower ClientApp) calls it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.vera import VeraLayer

from sfedlora.comm import downlink
from sfedlora.core import codecs, seeds
from sfedlora.core.adapters import AdapterSlots
from sfedlora.core.ranks import pad, truncate
from sfedlora.core.records import ClientState, FitResult, Tensors, mean_or_none
from sfedlora.core.stores import MemoryStore, TensorStore
from sfedlora.methods import Method, Part
from sfedlora.modeling.model import steps_per_round, train_batches
from sfedlora.runtime.inits import AdapterInits
from sfedlora.settings import ExperimentConfig
from sfedlora.tasks import Task


def lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant" or total <= 0:
        return 1.0
    progress = min(step / total, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Worker:
    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module, task: Task,
                 method: Method, tokenizer=None, local_steps: int | None = ...):
        """``local_steps``: a training client's steps per round (None: ``local.epochs``
        decide), as the method's :meth:`~sfedlora.methods.Method.local_data` says;
        default ``local.steps``."""
        self.cfg, self.model, self.task, self.method = cfg, model, task, method
        self.local_steps = cfg.local.steps if local_steps is ... else local_steps
        self.tokenizer = tokenizer
        self.collate = task.collator(tokenizer, cfg)
        self.up = cfg.codec("up")
        self.slots = AdapterSlots(model)
        self.spec = self.slots.spec()
        self.inits = AdapterInits(cfg, method, self.slots.layout)
        # the frozen base's size, for the network model's compute time
        self.base_params = sum(p.numel() for n, p in model.named_parameters()
                               if n not in self.slots.params)
        self._lora_layers = [m for m in model.modules()
                             if isinstance(m, LoraLayer | VeraLayer)]
        # Tensors every client on this machine may read (the runtime may replace it:
        # a Flower node keeps it in its state directory).
        self.shared_store: TensorStore = MemoryStore()
        self.stage = method.client_stage(cfg, self)
        self.device = next(model.parameters()).device
        # how a step's loss is backpropagated: here, or over the client's process group
        # (:class:`~sfedlora.runtime.client_group.ClientGroup`, clients.world_size > 1)
        self.backward = self.local_backward
        if self.device.type == "cpu":
            # Adam's second moments of near-zero gradients fall into the denormal range,
            # where CPU arithmetic is many times slower; flushing them to zero costs
            # nothing in accuracy and keeps runs deterministic.
            torch.set_flush_denormal(True)

    def batch(self, data, idx, labels: bool = True) -> dict[str, torch.Tensor]:
        batch = self.collate(data, idx)
        if not labels:
            batch.pop("labels")
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- which tensors a client starts from ---------------------------------------

    @property
    def shared_init(self) -> Tensors:
        return self.inits.shared_init

    def drawn_start(self, cid: int, round_idx: int) -> Tensors:
        return self.inits.drawn_start(cid, round_idx)

    def receive(self, download: bytes, state: ClientState) -> Tensors:
        """A training download decoded: a delta download applied to what the client
        holds, which it then holds (``state.held``; :mod:`sfedlora.comm.downlink`)."""
        if downlink.is_downlink(download):
            tensors, state.held = downlink.receive(download, state.held,
                                                   self.inits.downlink_origin)
            return tensors
        return codecs.decode(download)

    def split_download(self, tensors: Tensors) -> tuple[Tensors, Tensors]:
        """A decoded download: the adapter tensors, and the method's extra tensors
        (names outside the adapter, see :class:`~sfedlora.methods.base.ServerStage`)."""
        shared = {n: t for n, t in tensors.items() if n in self.spec}
        return shared, {n: t for n, t in tensors.items() if n not in self.spec}

    def scored_adapter(self, cid: int, state: ClientState, shared: Tensors, holdout
                       ) -> tuple[Tensors, dict[str, list[float]]]:
        """The adapter client ``cid`` is evaluated and exported with (its assembled
        adapter, or what the method's stage makes of it, e.g. FDLoRA's fusion), and the
        method's per-client values."""
        return self.stage.scored_adapter(cid, state, self.inits.assemble(cid, state, shared),
                                         holdout)

    def holdout_loss(self, tensors: Tensors, data) -> float:
        """The task's mean loss of an adapter on held-out data."""
        return self.task.holdout_loss(self, tensors, data)

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

    def fit(self, cid: int, state: ClientState, download: bytes, data,
            round_idx: int) -> FitResult:
        """Run client ``cid``'s local work for round ``round_idx`` (1-based); updates
        ``state`` in place and returns the serialised upload."""
        # truncated to ``rank`` where ranks are mixed; the method's extras to its stage
        received, extras = self.split_download(self.receive(download, state))
        if len(data) == 0:  # a skewed partition left it nothing: the server rejects
            # a zero-example update with that reason, and the round goes on
            return FitResult(upload=b"", num_examples=0, train_loss=None, grad_norm_A=None,
                             grad_norm_B=None, steps=0)
        cfg, local = self.cfg, self.cfg.local
        plan = self.method.plan(round_idx)
        rank = cfg.client_rank(cid)
        self.stage.receive(extras)
        self.slots.load(self.inits.assemble(cid, state, pad(received, self.spec), round_idx))
        self.slots.set_trainable(plan.train)
        optimizer = self._optimizer()
        if local.keep_optimizer_state and state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        with self.stage.training(cid, state, round_idx) as penalty:
            losses, norms_a, norms_b, tokens = self._train(cid, optimizer, data, round_idx,
                                                           penalty)

        state.private = self.slots.snapshot(self.method.roles.private)
        if local.keep_optimizer_state:
            # on the CPU with the rest of the client's state; loading moves it back
            state.optimizer = _cpu_copy(optimizer.state_dict())
        tensors = self._truncate(self.slots.snapshot(plan.upload), rank)
        choice = self.stage.choose_upload(tensors)
        upload, state.residual = self.up.send(
            tensors, reference=received, residual=state.residual,
            meta={"client": cid, "round": round_idx}, positions=choice.positions)
        return FitResult(
            report=choice.report,
            upload=upload,
            num_examples=len(data),
            train_loss=float(np.mean(losses)),
            grad_norm_A=mean_or_none(norms_a),
            grad_norm_B=mean_or_none(norms_b),
            steps=len(losses),
            tokens=tokens,
        )

    def _train(self, cid: int, optimizer: torch.optim.Optimizer, data,
               round_idx: int, penalty=None) -> tuple[list[float], list, list, int]:
        """The local steps: losses and the gradient norms of A and B per step, and the
        token positions processed (padding included: the model computes them).
        ``penalty()``, where given, is added to each step's loss (not to the logged one)."""
        cfg, local = self.cfg, self.cfg.local
        num_steps = self.local_steps
        per_round = steps_per_round(len(data), local.batch_size, num_steps, local.epochs)
        total = per_round * cfg.rounds
        a_names = self.slots.names({Part.A})
        b_names = self.slots.names({Part.B})
        trainable = [p for p in self.slots.params.values() if p.requires_grad]

        torch.manual_seed(seeds.derive_seed(cfg.seed, seeds.TRAIN, round_idx, cid))  # dropout
        batches = train_batches(data, local.batch_size, num_steps, local.epochs,
                                seeds.derive_seed(cfg.seed, seeds.BATCHES, round_idx, cid))
        self.model.train()
        losses, norms_a, norms_b, tokens = [], [], [], 0
        for k, idx in enumerate(batches):
            step = (round_idx - 1) * per_round + k
            factor = lr_factor(local.schedule, step, total)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            batch = self.batch(data, idx)
            tokens += batch["input_ids"].numel()
            losses.append(self.backward(batch, penalty))
            norms_a.append(self._grad_norm(a_names))
            norms_b.append(self._grad_norm(b_names))
            if local.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, local.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return losses, norms_a, norms_b, tokens

    def local_backward(self, batch: dict[str, torch.Tensor], penalty=None) -> float:
        """Backpropagate the batch's loss (plus ``penalty()``, where given); the loss."""
        loss = self.model(**batch).loss
        extra = None if penalty is None else penalty()
        (loss if extra is None else loss + extra).backward()
        return loss.item()  # the step's graph is released on return

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
    def adapter_output_norm(self, tensors: Tensors, probe) -> float:
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


def _cpu_copy(obj):
    """A deep copy of an optimizer's state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


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
