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
from dataclasses import dataclass, field
from typing import Any

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
from sfedlora.methods.base import RoundPlan
from sfedlora.modeling.client_rows import Unbatchable
from sfedlora.modeling.model import steps_per_round, train_batches
from sfedlora.runtime.inits import AdapterInits
from sfedlora.settings import ExperimentConfig
from sfedlora.tasks import Task


@dataclass(eq=False)
class LocalRound:
    """One client's local round in progress: what it starts from, its batches (index
    arrays, drawn as the sequential path draws them) and what it has logged."""

    cid: int
    state: ClientState
    round_idx: int
    data: Any
    received: Tensors
    extras: Tensors
    plan: RoundPlan
    start: Tensors  # the assembled adapter the client trains from
    per_round: int  # steps per round (the schedule's unit)
    batches: list[np.ndarray]
    dropout_seed: int
    losses: list[float] = field(default_factory=list)
    norms_a: list[float | None] = field(default_factory=list)
    norms_b: list[float | None] = field(default_factory=list)
    tokens: int = 0


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

    def batch(self, data, idx, labels: bool = True, width: int | None = None
              ) -> dict[str, torch.Tensor]:
        """Examples ``idx`` of ``data`` collated (padded to ``width`` where given) and
        on the model's device."""
        batch = self.collate(data, idx) if width is None else self.collate(data, idx, width)
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

    def holdout_losses(self, candidates: list[Tensors], data) -> list[float]:
        """:meth:`holdout_loss` of each candidate: up to ``clients.parallel`` of them in
        shared passes where the run trains clients batched and the model allows it,
        else one after another."""
        k = self.cfg.clients.parallel
        if k > 1:
            try:
                return [loss for start in range(0, len(candidates), k)
                        for loss in self.task.holdout_losses(
                            self, candidates[start:start + k], data)]
            except Unbatchable:  # an adapter outside LoRA's A and B and a head (VeRA)
                pass
        return [self.holdout_loss(tensors, data) for tensors in candidates]

    # --- local training -----------------------------------------------------------

    def _optimizer(self, params: dict[str, torch.Tensor] | None = None
                   ) -> torch.optim.Optimizer:
        """The local optimizer over ``params`` (default: the model's adapter tensors;
        the batched trainer passes one client's own copies, named alike).

        Every adapter tensor in a fixed order; frozen ones get no gradient and so are
        left untouched, which keeps a stored optimizer state valid across rounds
        whose trainable parts differ (RoLoRA). The head, trained from scratch, may
        have its own learning rate. A and B may have learning rates of their own
        (local.lr_A / lr_B): one group per distinct learning rate, A and B together
        when theirs are equal."""
        params = self.slots.params if params is None else params
        local = self.cfg.local
        lr = {Part.A: local.lr_A or local.lr, Part.B: local.lr_B or local.lr,
              Part.HEAD: local.head_lr or local.lr}
        order = [[Part.A, Part.B], [Part.HEAD]] if lr[Part.A] == lr[Part.B] else \
            [[Part.A], [Part.B], [Part.HEAD]]
        groups = [{"params": [p for n, p in params.items()
                              if self.slots.parts[n] in parts], "base_lr": lr[parts[0]]}
                  for parts in order]
        groups = [g | {"lr": g["base_lr"]} for g in groups if g["params"]]
        if local.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=local.lr, momentum=local.momentum,
                                   weight_decay=local.weight_decay)
        return torch.optim.AdamW(groups, lr=local.lr, weight_decay=local.weight_decay)

    def start_fit(self, cid: int, state: ClientState, download: bytes, data,
                  round_idx: int) -> LocalRound | FitResult:
        """What a client's local round starts from: its download decoded and the
        adapter it trains assembled (not yet on the model), or the empty fit of a
        client a skewed partition left without examples (the server rejects a
        zero-example update with that reason, and the round goes on)."""
        # truncated to ``rank`` where ranks are mixed; the method's extras to its stage
        received, extras = self.split_download(self.receive(download, state))
        if len(data) == 0:
            return FitResult(upload=b"", num_examples=0, train_loss=None, grad_norm_A=None,
                             grad_norm_B=None, steps=0)
        local = self.cfg.local
        per_round = steps_per_round(len(data), local.batch_size, self.local_steps,
                                    local.epochs)
        self.stage.receive(extras)
        return LocalRound(
            cid=cid, state=state, round_idx=round_idx, data=data, received=received,
            extras=extras, plan=self.method.plan(round_idx),
            start=self.inits.assemble(cid, state, pad(received, self.spec), round_idx),
            per_round=per_round,
            batches=list(train_batches(
                data, local.batch_size, self.local_steps, local.epochs,
                seeds.derive_seed(self.cfg.seed, seeds.BATCHES, round_idx, cid))),
            dropout_seed=seeds.derive_seed(self.cfg.seed, seeds.TRAIN, round_idx, cid))

    def fit(self, cid: int, state: ClientState, download: bytes, data,
            round_idx: int) -> FitResult:
        """Run client ``cid``'s local work for round ``round_idx`` (1-based); updates
        ``state`` in place and returns the serialised upload."""
        run = self.start_fit(cid, state, download, data, round_idx)
        if isinstance(run, FitResult):
            return run
        self.slots.load(run.start)
        self.slots.set_trainable(run.plan.train)
        optimizer = self.load_optimizer(self._optimizer(), state)
        with self.stage.training(cid, state, round_idx) as penalty:
            self._train(run, optimizer, penalty)
        return self.finish_fit(run, optimizer)

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: ClientState
                       ) -> torch.optim.Optimizer:
        if self.cfg.local.keep_optimizer_state and state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        return optimizer

    def finish_fit(self, run: LocalRound, optimizer: torch.optim.Optimizer) -> FitResult:
        """The end of a local round, with the trained adapter on the model: the
        client's private parts and optimizer state kept, the upload chosen and
        encoded."""
        state, cid = run.state, run.cid
        state.private = self.slots.snapshot(self.method.roles.private)
        if self.cfg.local.keep_optimizer_state:
            # on the CPU with the rest of the client's state; loading moves it back
            state.optimizer = _cpu_copy(optimizer.state_dict())
        tensors = self._truncate(self.slots.snapshot(run.plan.upload),
                                 self.cfg.client_rank(cid))
        choice = self.stage.choose_upload(tensors)
        upload, state.residual = self.up.send(
            tensors, reference=run.received, residual=state.residual,
            meta={"client": cid, "round": run.round_idx}, positions=choice.positions)
        return FitResult(
            report=choice.report,
            upload=upload,
            num_examples=len(run.data),
            train_loss=float(np.mean(run.losses)),
            grad_norm_A=mean_or_none(run.norms_a),
            grad_norm_B=mean_or_none(run.norms_b),
            steps=len(run.losses),
            tokens=run.tokens,
        )

    def _train(self, run: LocalRound, optimizer: torch.optim.Optimizer, penalty=None
               ) -> None:
        """The local steps. ``penalty()``, where given, is added to each step's loss
        (not to the logged one)."""
        torch.manual_seed(run.dropout_seed)
        self.model.train()
        for k, idx in enumerate(run.batches):
            self.set_lr(optimizer, run, k)
            batch = self.batch(run.data, idx)
            run.tokens += batch["input_ids"].numel()
            run.losses.append(self.backward(batch, penalty))
            self.step(run, self.slots.params, optimizer)

    def set_lr(self, optimizer: torch.optim.Optimizer, run: LocalRound, k: int) -> None:
        """The schedule's learning rate for the round's ``k``-th step."""
        step = (run.round_idx - 1) * run.per_round + k
        factor = lr_factor(self.cfg.local.schedule, step, run.per_round * self.cfg.rounds)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self, run: LocalRound, params: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer) -> None:
        """After a step's backward: log the gradient norms of A and B, clip, step."""
        run.norms_a.append(_grad_norm(params, self.slots.names({Part.A})))
        run.norms_b.append(_grad_norm(params, self.slots.names({Part.B})))
        if self.cfg.local.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.requires_grad],
                                           self.cfg.local.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def local_backward(self, batch: dict[str, torch.Tensor], penalty=None) -> float:
        """Backpropagate the batch's loss (plus ``penalty()``, where given); the loss."""
        loss = self.model(**batch).loss
        extra = None if penalty is None else penalty()
        (loss if extra is None else loss + extra).backward()
        return loss.item()  # the step's graph is released on return

    def _truncate(self, tensors: dict[str, torch.Tensor], rank: int):
        return tensors if rank == self.cfg.lora.rank else truncate(tensors, rank)

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


def _grad_norm(params: dict[str, torch.Tensor], names: list[str]) -> float | None:
    grads = [params[n].grad for n in names]
    grads = [g for g in grads if g is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


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
