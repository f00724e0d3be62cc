"""Several clients' rows through one forward pass of the shared model.

Every client shares the frozen base and differs only in its adapter tensors (LoRA's A
and B, the head), so K clients' batches can go through the base as one batch: the
frozen layers compute every row at once, each LoRA layer adds each client's own
``B_k A_k x`` to that client's rows (one batched matmul when the clients' row counts
are equal), and each trained copy of a head runs on its client's rows with that
client's tensors (:func:`torch.func.functional_call`).

Random ops (dropout in the base and the adapter, attention dropout inside
``scaled_dot_product_attention``) are the one place where rows of different clients
must not mix: each client's part of such an op is drawn from that client's own
generator state, in the order its sequential run draws it, so a batched round is the
sequential round. Any other random draw during the pass is refused
(:meth:`RandomnessGuard.check`), not silently merged.

Why hand-written: PEFT's mixed-adapter batches (``adapter_names=``) refuse training
mode and would need every client registered as a named adapter of the model, and
``torch.func.vmap`` over stacked parameters cannot split a random op by client. The
model itself is PEFT's; this module only adds each client's delta beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch.overrides import TorchFunctionMode

from sfedlora.core.records import Tensors
from sfedlora.modeling.model import eval_batches

ADAPTER = "default"

# Functions that draw from the default generator with the shape of their input.
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout}


class PaddedRandomness(Exception):
    """A random op met rows padded beyond their own width: its draws would not be the
    sequential ones (the pass is redone with each width on its own)."""


class Unbatchable(Exception):
    """This model or method cannot train several clients in one pass; the message
    says why (the pool then trains them one after another)."""


@dataclass(frozen=True)
class _LoraSite:
    module: LoraLayer
    a: str  # parameter names, as in AdapterSlots.params
    b: str


@dataclass(frozen=True)
class _HeadSite:
    wrapper: ModulesToSaveWrapper
    inner: torch.nn.Module
    names: dict[str, str]  # the inner module's parameter name -> the slot's name


class AdapterSites:
    """Where a model's adapter tensors act: its LoRA layers and its trained head
    copies (PEFT's ``modules_to_save``). Refuses a model with an adapter tensor
    elsewhere (VeRA's vectors, DoRA's magnitudes), naming it."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        self.lora: list[_LoraSite] = []
        self.heads: list[_HeadSite] = []
        covered: set[str] = set()
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer):
                self.lora.append(self._lora_site(path, module))
                covered |= {self.lora[-1].a, self.lora[-1].b}
            elif isinstance(module, ModulesToSaveWrapper):
                inner = module.modules_to_save[ADAPTER]
                site = _HeadSite(module, inner, {
                    local: f"{path}.modules_to_save.{ADAPTER}.{local}"
                    for local, _ in inner.named_parameters()})
                self.heads.append(site)
                covered |= set(site.names.values())
        missing = [n for n in names if n not in covered]
        if missing:
            raise Unbatchable(f"adapter tensor {missing[0]} is neither LoRA's A or B nor a "
                              "trained head (batched training supports lora.adapter=lora)")

    @staticmethod
    def _lora_site(path: str, module: LoraLayer) -> _LoraSite:
        if not isinstance(module.lora_A[ADAPTER], torch.nn.Linear) or module.lora_variant \
                or getattr(module, "fan_in_fan_out", False) or module.lora_bias[ADAPTER]:
            raise Unbatchable(f"{path} is not a plain linear LoRA layer")
        return _LoraSite(module, f"{path}.lora_A.{ADAPTER}.weight",
                         f"{path}.lora_B.{ADAPTER}.weight")


class ClientRows:
    """One pass of K clients' rows: ``sizes[k]`` consecutive rows per client, client
    k's adapter tensors ``params[k]`` (named as the model's), its generator state
    ``rng[k]`` (replaced by the state after its draws). ``padded``: some client's rows
    are wider than its own batch, so a random op raises :class:`PaddedRandomness`
    before drawing anything."""

    def __init__(self, sites: AdapterSites, sizes: list[int], params: list[Tensors],
                 rng: list[torch.Tensor], padded: bool = False,
                 scales: list[dict[str, float]] | None = None):
        """``scales``: each client's LoRA scale per layer (keyed by the layer's A name),
        where clients come from runs whose scales differ (a batched sweep); default:
        the model's own."""
        self.sites, self.sizes, self.params, self.rng = sites, sizes, params, rng
        self.padded = padded
        self.rows = sum(sizes)
        self.scales = scales

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[None]:
        """Within: ``model(**inputs)`` on the K clients' concatenated inputs is each
        client's own forward pass, row for row."""
        handles = [site.module.register_forward_hook(self._lora_hook(site))
                   for site in self.sites.lora]
        handles += [site.wrapper.register_forward_hook(self._head_hook(site), with_kwargs=True)
                    for site in self.sites.heads]
        try:
            with model.disable_adapter(), _PerClientRandomness(self):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[0] != self.rows:
            raise RuntimeError(f"batched training met a tensor of {x.shape[0]} rows where "
                               f"{self.rows} client rows were expected")
        return torch.split(x, self.sizes)

    def _lora_hook(self, site: _LoraSite):
        def hook(module, args, output):
            # as PEFT's Linear.forward: result + lora_B(lora_A(dropout(x))) * scaling
            x = module.lora_dropout[ADAPTER](args[0].to(module.lora_A[ADAPTER].weight.dtype))
            return output + self.scaled(self.delta(x, site.a, site.b), site.a,
                                        module.scaling[ADAPTER])
        return hook

    def scaled(self, delta: torch.Tensor, a: str, own: float) -> torch.Tensor:
        """``delta`` times each client's scale: one product where every client's scale
        is the same (bit for bit what one client's pass computes), else one per client."""
        scales = [own] if self.scales is None else [s[a] for s in self.scales]
        if len(set(scales)) == 1:
            return delta * scales[0]
        return torch.cat([part * s for part, s in zip(self.split(delta), scales,
                                                      strict=True)])

    def delta(self, x: torch.Tensor, a: str, b: str) -> torch.Tensor:
        """``B_k A_k x_k`` on each client's rows."""
        k = len(self.sizes)
        if k > 1 and len(set(self.sizes)) == 1 and len({p[a].shape for p in self.params}) == 1:
            # one batched matmul for every client (of equal rows and ranks)
            xs = x.reshape(k, -1, x.shape[-1])
            a_stack = torch.stack([p[a] for p in self.params])
            b_stack = torch.stack([p[b] for p in self.params])
            out = torch.bmm(torch.bmm(xs, a_stack.transpose(1, 2)), b_stack.transpose(1, 2))
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return torch.cat([F.linear(F.linear(part, p[a]), p[b])
                          for part, p in zip(self.split(x), self.params, strict=True)])

    def _head_hook(self, site: _HeadSite):
        def hook(module, args, kwargs, _output):
            outs = [torch.func.functional_call(
                        site.inner, {local: p[name] for local, name in site.names.items()},
                        (part, *args[1:]), kwargs)
                    for part, p in zip(self.split(args[0]), self.params, strict=True)]
            return torch.cat(outs)
        return hook


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _PerClientRandomness(TorchFunctionMode):
    """Runs each random op once per client on that client's rows, under that client's
    generator state; every other op runs once on all rows."""

    def __init__(self, rows: ClientRows):
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS and _dropout_draws(args, kwargs):
            if func is F.dropout and _cpu_dropout_applies(args, kwargs):
                return self._cpu_dropout(args[0], kwargs.get("p", args[1] if len(args) > 1
                                                              else 0.5))
            return self._per_client(func, args, kwargs)
        if func is F.scaled_dot_product_attention and _attention_dropout(args, kwargs) > 0:
            return self._per_client(func, args, kwargs)
        return func(*args, **kwargs)

    def _per_client(self, func, args, kwargs):
        rows = self.rows
        if rows.padded:
            raise PaddedRandomness(func.__name__)
        first = args[0] if args else next(iter(kwargs.values()))
        device = first.device
        outer = rng_state(device)
        parts = []
        try:
            for k in range(len(rows.sizes)):
                set_rng_state(device, rows.rng[k])
                parts.append(func(*[self._part(a, k) for a in args],
                                  **{n: self._part(v, k) for n, v in kwargs.items()}))
                rows.rng[k] = rng_state(device)
        finally:
            set_rng_state(device, outer)
        return torch.cat(parts)

    def _cpu_dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """``F.dropout`` on the CPU, each client's rows of the noise drawn from its
        stream, without splitting the activations: ATen's CPU dropout is this same
        arithmetic (``_dropout_impl``: Bernoulli(1 - p) noise, divided by 1 - p, times
        the input), so each client's rows get the bits its own call would give
        (test_batched checks it bit for bit)."""
        rows = self.rows
        if rows.padded:
            raise PaddedRandomness("dropout")
        noise = torch.empty_like(x)
        outer = torch.get_rng_state()
        try:
            for k, part in enumerate(rows.split(noise)):
                torch.set_rng_state(rows.rng[k])
                part.bernoulli_(1 - p)
                rows.rng[k] = torch.get_rng_state()
        finally:
            torch.set_rng_state(outer)
        return x * noise.div_(1 - p)

    def _part(self, value, k: int):
        """Client k's rows of a per-row tensor argument; anything else as it is (a
        mask broadcast over rows, a probability)."""
        if isinstance(value, torch.Tensor) and value.dim() > 0 \
                and value.shape[0] == self.rows.rows:
            return self.rows.split(value)[k]
        return value


def _dropout_draws(args, kwargs) -> bool:
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return bool(training) and p > 0


def _cpu_dropout_applies(args, kwargs) -> bool:
    """Plain dropout of a contiguous CPU tensor, not in place: what ``_cpu_dropout``
    reproduces (elsewhere each client's rows take a call of their own)."""
    x = args[0]
    inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
    return x.device.type == "cpu" and x.is_contiguous() and not inplace \
        and 0 < kwargs.get("p", args[1] if len(args) > 1 else 0.5) < 1


def _attention_dropout(args, kwargs) -> float:
    return kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)


class RandomnessGuard:
    """Fails a batched pass in which anything drew from the default generator outside
    the per-client random ops: such a draw would mix the clients' randomness."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = rng_state(device)

    def check(self) -> None:
        if not torch.equal(rng_state(self.device), self.before):
            raise RuntimeError(
                "a random op other than dropout or attention dropout ran during batched "
                "training, so clients' randomness would mix; train them one at a time "
                "with clients.parallel=1")


@torch.inference_mode()
def eval_passes(worker, jobs: list[tuple[Tensors, object]], batch_size: int
                ) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """Each ``(tensors, data)`` job's evaluation batches (in order, ``batch_size``
    examples each), every job's k-th batch in one shared pass: yields ``(job, batch,
    logits)`` per job and batch. Batches are padded alike on the right, which changes
    no real token's output, and evaluation draws nothing random. ``worker`` is a
    :class:`~sfedlora.runtime.worker.Worker` (its model, slots and collation)."""
    worker.model.eval()
    sites = AdapterSites(worker.model, list(worker.slots.params))
    batches = [list(eval_batches(len(data), batch_size)) for _, data in jobs]
    for k in range(max(map(len, batches), default=0)):
        active = [j for j, b in enumerate(batches) if k < len(b)]
        parts = [worker.batch(jobs[j][1], batches[j][k]) for j in active]
        width = max(p["input_ids"].shape[1] for p in parts)
        parts = [p if p["input_ids"].shape[1] == width else
                 worker.batch(jobs[j][1], batches[j][k], width=width)
                 for j, p in zip(active, parts, strict=True)]
        rows = ClientRows(sites, [len(p["input_ids"]) for p in parts],
                          [jobs[j][0] for j in active], [], padded=True)
        with rows.applied(worker.model):
            logits = worker.model(**{key: torch.cat([p[key] for p in parts])
                                     for key in parts[0] if key != "labels"}).logits
        for j, part, batch in zip(active, rows.split(logits), parts, strict=True):
            yield j, batch, part
