"""A client that spans several processes (``clients.world_size: W``): each local step's
batch is split across W ranks, and their gradients are summed into one step.

Rank 0 is the process that runs the client anyway (the in-process simulator, a Flower
ClientApp or a node's worker); it loads the client's adapter, keeps its optimizer,
clips, steps and sends the one upload. Ranks 1..W-1 are helpers holding the same
frozen base model. Every step, rank 0 broadcasts the adapter's current tensors and
sends each helper its rows of the batch; every rank computes its rows' loss, weighted
by its share of what the task's loss averages over (rows, or target tokens for a
causal LM), and backpropagates; the gradients are summed on rank 0
(``torch.distributed.reduce``), which then steps as a single process would. So the
update equals the one-process update for the same global batch, up to the order of
float additions; dropout masks are drawn per rank (seeded from rank 0's seed of the
fit, so runs repeat), so with dropout on the two differ as DDP's do.

Why not ``DistributedDataParallel``: a client's trainable tensors change from round to
round (RoLoRA alternates A and B, FFA freezes A) and one model serves many clients by
swapping adapters in, while DDP fixes its parameters and buckets when it wraps the
model. Summing the adapter's gradients once per step is the same collective DDP runs,
for tensors this small (a rank-8 adapter is a few MB) at the same cost.

The helpers are launched torchrun-style: their environment carries ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and the group is
made with ``init_method="env://"``. Rank 0 starts them itself
(``python -m sfedlora.runtime.client_group``), or, when the whole program was started by
``torchrun --nproc-per-node W``, ranks above 0 become helpers (``sfedlora`` calls
:func:`serve` there), and the config rank 0 resolved reaches them as the group's first
message.
The backend is gloo on the CPU and NCCL on GPUs (rank r on ``cuda:r``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sfedlora.settings import ExperimentConfig


def _send_json(obj: dict | None) -> None:
    """Broadcast a small JSON header from rank 0 (its length, then its bytes)."""
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0)
    dist.broadcast(data, 0)


def _receive_json():
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0)
    data = torch.zeros(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0)
    return json.loads(bytes(data.numpy()))


def _rows(batch: dict[str, torch.Tensor], world: int) -> list[dict[str, torch.Tensor]]:
    """The batch's rows in ``world`` contiguous parts (sizes differ by at most one)."""
    size = len(next(iter(batch.values())))
    bounds = [size * r // world for r in range(world + 1)]
    return [{k: v[bounds[r]:bounds[r + 1]] for k, v in batch.items()} for r in range(world)]


def _gradient_vector(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Every parameter's gradient (zeros where it has none), then ``loss``, flat."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return torch.cat([*(g.reshape(-1) for g in grads), loss.detach().reshape(1)])


class _Rank:
    """What every rank does in a step: its rows' weighted loss, backpropagated."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], task):
        self.model, self.params, self.task = model, params, task
        self.device = next(model.parameters()).device

    def backward(self, rows: dict[str, torch.Tensor], total: float,
                 penalty=None) -> torch.Tensor:
        """Backpropagate this rank's share of the batch's mean loss (plus ``penalty()``,
        which rank 0 alone adds); that share, detached."""
        weight = float(self.task.loss_weight(rows)) if len(rows["input_ids"]) else 0.0
        share = torch.zeros((), device=self.device)
        if weight > 0:
            share = self.model(**rows).loss * (weight / total)
        extra = None if penalty is None else penalty()
        if weight > 0 or extra is not None:
            (share if extra is None else share + extra).backward()
        return share.detach()


_current: ClientGroup | None = None  # this process's group (torch.distributed has one)


class ClientGroup:
    """Rank 0 of a client's process group: :meth:`backward` takes the place of a
    single process's ``loss.backward()``."""

    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module,
                 params: dict[str, torch.nn.Parameter], task, label_names: list[str]):
        self.world = cfg.clients.world_size
        self.rank = _Rank(model, params, task)
        self.names = list(params)
        self.helpers: list[subprocess.Popen] = []
        global _current
        if _current is not None:  # a new experiment in this process (a Flower worker's)
            _current.close()
        if not _under_torchrun():
            self._start_helpers()
        dist.init_process_group(_backend(), init_method="env://", rank=0,
                                world_size=self.world)
        if dist.get_world_size() != self.world:
            raise RuntimeError(f"clients.world_size={self.world} but torchrun started "
                               f"{dist.get_world_size()} ranks (--nproc-per-node)")
        # the helpers build their model from rank 0's config, resolved
        _send_json({"config": cfg.model_dump(mode="json"), "label_names": label_names})
        atexit.register(self.close)
        _current = self

    def _start_helpers(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for rank in range(1, self.world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(self.world),
                   "LOCAL_RANK": str(rank)}
            self.helpers.append(subprocess.Popen(
                [sys.executable, "-m", "sfedlora.runtime.client_group"],
                env=env, stdin=subprocess.DEVNULL))

    def backward(self, batch: dict[str, torch.Tensor], penalty=None) -> float:
        """The batch's loss backpropagated over the group: on return, each adapter
        tensor's ``.grad`` is the whole batch's gradient; the batch's mean loss."""
        params = [self.rank.params[n] for n in self.names]
        parts = _rows(batch, self.world)
        total = float(self.rank.task.loss_weight(batch))
        _send_json({"op": "step", "total": total, "seed": torch.initial_seed(),
                    "trainable": [p.requires_grad for p in params],
                    "training": self.rank.model.training,
                    "rows": [{k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                              for k, v in part.items()} for part in parts]})
        dist.broadcast(parameters_to_vector(params).detach(), 0)
        for rank in range(1, self.world):
            for tensor in parts[rank].values():
                dist.send(tensor.contiguous(), rank)
        share = self.rank.backward(parts[0], total, penalty)
        summed = _gradient_vector(params, share)
        dist.reduce(summed, 0)
        offset = 0
        for p in params:
            if p.requires_grad:
                p.grad = summed[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return float(summed[-1])

    def close(self) -> None:
        """Tell the helpers to stop and end the group (at exit, or before a new one)."""
        global _current
        _current = None if _current is self else _current
        atexit.unregister(self.close)
        if dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # a helper that died is gone already
                _send_json(None)
            dist.destroy_process_group()
        for proc in self.helpers:
            proc.wait(timeout=60)
        self.helpers = []


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ


def _backend() -> str:
    # control headers travel as CPU tensors (gloo); on GPUs the adapter, rows and
    # gradients go over NCCL
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def serve() -> None:
    """A helper rank: join the group, build the model from rank 0's config, then answer
    steps until told to stop (or rank 0 is gone, which ends the collective with an
    error)."""
    from sfedlora.config import resolve
    from sfedlora.core.adapters import AdapterSlots
    from sfedlora.modeling.model import build_model
    from sfedlora.tasks import get_task

    dist.init_process_group(_backend(), init_method="env://")
    hello = _receive_json()
    cfg = resolve(ExperimentConfig.model_validate(hello["config"]))
    if cfg.model.device != "cpu":
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"device": f"cuda:{os.environ['LOCAL_RANK']}"})})
    task = get_task(cfg.task)
    model, _ = build_model(cfg, task, hello["label_names"])
    slots = AdapterSlots(model)
    rank = _Rank(model, slots.params, task)
    params = list(slots.params.values())
    me, seed = dist.get_rank(), None
    while (order := _receive_json()) is not None:
        if order["seed"] != seed:  # rank 0 seeded a new fit: dropout masks repeat per run
            seed = order["seed"]
            torch.manual_seed((seed * 1_000_003 + me) % 2**63)
        values = parameters_to_vector(params).detach()
        dist.broadcast(values, 0)
        with torch.no_grad():
            vector_to_parameters(values, params)
        for p, trainable in zip(params, order["trainable"], strict=True):
            p.requires_grad_(trainable)
            p.grad = None
        model.train(order["training"])
        rows = {}
        for key, (shape, dtype) in order["rows"][me].items():
            rows[key] = torch.empty(shape, dtype=getattr(torch, dtype), device=rank.device)
            dist.recv(rows[key], 0)
        share = rank.backward(rows, order["total"])
        dist.reduce(_gradient_vector(params, share), 0)
    dist.destroy_process_group()


if __name__ == "__main__":
    serve()
