"""The method interface: a small, pure description of one federated LoRA algorithm.

A method says, and only says:

* which parts of the adapter exist on the server (``shared``: downloaded every round),
  stay with each client across rounds (``private``: never sent), or are fixed at one
  seeded init on every client (``fixed``: never trained, never sent);
* which parts train and which are sent up in a given round (:meth:`Method.plan`);
* how the server combines the uploads (:meth:`Method.aggregate`);
* which scale it uses by default and which ``a_init`` modes make sense.

Runtimes (the in-process simulator, later Flower) execute a method; they never branch
on its name. The parts are A (``lora_A``), B (``lora_B``) and the task head.

How the other methods fit:

* **Compressed messages (top-k, quantisation, casting).** Messages are dicts of
  tensors that a codec (:mod:`sfedlora.core.codecs`) turns into bytes per direction, by
  config; any method composes with any codec. A method may carry a preset (``comm``).
  FLoCoRA is FedIT with the preset "8-bit uploads".
* **FLASC.** Its preset masks the download and sparsifies the uploaded change (both
  top-k), and it names a server optimizer (``server_optimizer = "adamw"``): the
  runtime feeds the mean client change to AdamW as a gradient instead of replacing the
  global state. Evaluation uses what clients receive, i.e. the masked model.
* **Methods with mechanics of their own** keep them in their own package and reach
  the runtimes only through two hook objects the method builds: :class:`ServerHooks`
  (state the server keeps beyond the combined tensors, extra download tensors, an
  exact LoRA for export; checkpointed through ``state_dict``) and
  :class:`ClientHooks` (what a client does with those extra tensors, around training,
  after a fit, and to the adapter it is scored with). FLoRA
  (:mod:`sfedlora.methods.flora`): A and B are ``fresh`` every round, the server keeps
  the stacked factors of every round, and clients merge them into their base weights.
  FDLoRA (:mod:`sfedlora.methods.fdlora`): a personal copy per client in its
  method-owned state, fused with the global adapter by a held-out grid search.
  FedEx-LoRA shares FLoRA's merging (:mod:`sfedlora.methods.merging`): it merges the
  residual of averaging A and B separately.
* **Re-factorising servers.** FlexLoRA's ``aggregate`` takes the SVD of the weighted sum
  of products; FedSVD's :meth:`Method.finalize` re-factorises the combined state after
  any DP noise, so it stays post-processing.
* **References.** ``local`` keeps every part private; ``central`` pools the training
  data on one client (:meth:`Method.training_splits`), trains only it
  (:meth:`Method.participants`) for the round's total steps (:meth:`Method.local_steps`).
* **Config rules** that only concern one method live in its :meth:`Method.check_config`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from sfedlora.aggregation.combiners import Combiner, weighted_mean
from sfedlora.core.parts import A_MARKERS, B_MARKERS, Part, part_of  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from sfedlora.core.adapters import AdapterSlots
    from sfedlora.core.records import ClientState, FitResult
    from sfedlora.core.stores import TensorStore
    from sfedlora.settings import ExperimentConfig

Tensors = dict[str, torch.Tensor]


class Worker(Protocol):
    """What a method's client hooks may use of the runtime's worker (the runtime layer
    implements it; methods never import the runtime)."""

    model: torch.nn.Module  # the PEFT model, shared by every client of this process
    slots: AdapterSlots  # its adapter's tensors by name and part
    shared_store: TensorStore  # tensors every client of this process may read

    def holdout_loss(self, tensors: Tensors, data: Any) -> float:
        """The task's mean loss of adapter ``tensors`` on held-out ``data``."""


@dataclass(frozen=True)
class RoundPlan:
    """What a client does in one round."""

    train: frozenset[Part]
    upload: frozenset[Part]


@dataclass(frozen=True)
class Update:
    """One client's upload as the server decoded it."""

    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor]
    # Per tensor, the coordinates the client really sent, where it sent fewer than all
    # (a sparse upload, a lower rank's zero padding); robust combiners use only those.
    present: dict[str, torch.Tensor] = field(default_factory=dict)


ALL_PARTS = frozenset(Part)


class ServerHooks:
    """Server-side mechanics of a method beyond combining uploads. The default has
    none; the server calls each hook at a fixed point of its round, so a method that
    needs more (FLoRA's merge history) subclasses this in its own package."""

    def after_combine(self, round_idx: int, updates: Sequence[Update]) -> None:
        """The round's accepted updates (client-id order), after they were combined."""

    def download_extras(self, cid: int | None, advance: bool = True) -> Tensors:
        """Tensors sent to client ``cid`` beside the shared state (names outside the
        adapter's); ``advance``: the client now holds them (a training download), as
        opposed to an evaluation request, which is not traffic."""
        return {}

    def start(self, layout: Any, network: Any) -> None:
        """Once, before the first round (and on resume): the adapter's layout and the
        network model (None for ``network.model: none``). May refuse the setup with a
        ``ConfigError`` naming the setting (TSFA: a latency budget no client can meet)."""

    def begin_round(self, round_idx: int, clients: list[int], network: Any) -> dict[str, Any]:
        """Before round ``round_idx``'s downloads, with its sampled clients and the
        network model (None for ``network.model: none``); returns metrics to log for
        the round. TSFA chooses the round's keep ratio here."""
        return {}

    def end_round(self, round_idx: int, metrics: dict[str, Any],
                  fits: dict[int, FitResult]) -> dict[str, Any]:
        """After the round is priced: its metrics so far and each replying client's fit
        (its :meth:`ClientHooks.report`, tokens, examples); returns metrics to add.
        TSFA updates its virtual queue with the round's latency here."""
        return {}

    def forget(self, cid: int) -> None:
        """Client ``cid`` did not reply: assume it holds nothing it was sent."""

    def export_lora(self, state: Tensors) -> tuple[Tensors, int] | None:
        """An exact LoRA (factors, rank) that replaces the exported adapters' own
        factors, where what was learned lives elsewhere too (FLoRA, FedEx-LoRA: the
        base weights); ``state`` is the server's global state."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values and tensors, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ClientHooks:
    """Client-side mechanics of a method beyond training its adapter (default: none)."""

    def receive(self, extras: Tensors) -> None:
        """The extra tensors of a download or evaluation request (see
        :meth:`ServerHooks.download_extras`), before anything runs on the model."""

    def training(self, cid: int) -> contextlib.AbstractContextManager:
        """Context around client ``cid``'s local steps."""
        return contextlib.nullcontext()

    def penalty(self) -> torch.Tensor | None:
        """A term added to each local step's loss, computed from the adapter on the
        model (SOFT's orthogonality penalty); None: none. The logged loss is the
        task's alone."""
        return None

    def after_fit(self, cid: int, state: ClientState, round_idx: int) -> None:
        """After the local steps, with the trained adapter still on the model; may add
        to ``state.method`` (method-owned tensors the client keeps)."""

    def report(self, trained: Tensors) -> dict[str, list[float]]:
        """Numbers about this fit for the method's server hooks, sent beside the upload
        (see :meth:`ServerHooks.end_round`; TSFA: each layer's importance profile);
        ``trained``: the adapter tensors as trained, before any compression."""
        return {}

    def upload_positions(self, upload: Tensors) -> Tensors | None:
        """Per tensor, the sorted flat positions of ``upload`` to send (SOFT: whole rank
        components); a tensor not named goes whole. None: the codec decides."""
        return None

    def scored_adapter(self, cid: int, state: ClientState, own: Tensors, holdout
                       ) -> tuple[Tensors, dict[str, list[float]]]:
        """The adapter client ``cid`` is scored and exported with (default: its own),
        and per-client values to report beside the metrics."""
        return own, {}


@dataclass(frozen=True)
class Command:
    """A ``sfedlora`` subcommand a method owns (TSFA's offline rank plan). The CLI adds
    ``add_arguments`` to its parser and calls ``run(args, context)``; ``context`` gives
    what a method may not import itself: ``context.load_config(path, overrides)`` (a
    resolved config) and ``context.run_rounds(cfg, server_hooks)`` (the in-process
    runtime). ``run`` returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]
    run: Callable[[Any, Any], int]


class NoOptions(BaseModel):
    """A method's settings under the experiment config's ``options`` (none by default);
    a method with settings of its own defines a pydantic model named ``Options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method:
    """Base description; subclasses override class attributes and rarely methods."""

    Options: ClassVar[type[BaseModel]] = NoOptions
    # subcommands of the ``sfedlora`` CLI this method owns (TSFA: tsfa-plan)
    commands: ClassVar[tuple[Command, ...]] = ()
    # the round metrics its server hooks report that depend on who took part: left out
    # of the released files where sampling is secret (under DP), like the runtime's own
    participation_metrics: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    name: ClassVar[str]
    summary: ClassVar[str]
    shared: ClassVar[frozenset[Part]] = ALL_PARTS
    private: ClassVar[frozenset[Part]] = frozenset()
    fixed: ClassVar[frozenset[Part]] = frozenset()
    default_scaling: ClassVar[str] = "lora"
    weighting: ClassVar[str] = "examples"  # "examples": p_i ~ n_i; "uniform": p_i = 1/m
    # First entry is the default; a_init is an error for methods with one mode.
    a_init_modes: ClassVar[tuple[str, ...]] = ("shared",)
    a_init_note: ClassVar[str] = "every client starts from one shared A"
    # Whether clients may hold different ranks (lora.client_ranks).
    mixed_ranks: ClassVar[bool] = False
    # Codec settings per direction ("up", "down") that config fields left unset take.
    comm: ClassVar[dict[str, dict]] = {}
    # "none": the combined uploads become the global state; "sgd" / "adamw": their
    # mean change is the gradient of a server optimizer step (FedOpt).
    server_optimizer: ClassVar[str] = "none"
    # Parts re-initialised every round at the client's rank (never held by the server).
    fresh: ClassVar[frozenset[Part]] = frozenset()
    # Whether lora.adapter=vera applies (VeRA's shared frozen projections).
    supports_vera: ClassVar[bool] = False
    # Why the server step is not a weighted sum of what clients send (so secure
    # aggregation, which reveals only that sum, cannot run it); "" where it is.
    secure_aggregation_refusal: ClassVar[str] = ""
    # Whether client_weight is always an integer (summed exactly under secure aggregation).
    integer_weights: ClassVar[bool] = True
    # Whether clients choose which entries of their upload to send
    # (ClientHooks.upload_positions; SOFT: whole rank components), so an upload can
    # lose change even through a lossless codec, and error feedback has work to do.
    chooses_upload_positions: ClassVar[bool] = False

    @property
    def has_global_adapter(self) -> bool:
        """True when the server's state alone is a complete adapter."""
        return not self.private

    @property
    def per_client_adapters(self) -> bool:
        """True when each client's scored adapter differs from the global one (private
        parts, or a per-client fusion): those are exported one per client."""
        return not self.has_global_adapter

    def check_config(self, cfg: ExperimentConfig) -> None:
        """Refuse settings this method cannot run with: raise ``ValueError`` naming the
        setting and the fix. Called by config validation."""

    def refuse(self, refused: Sequence[tuple[bool, str, str]]) -> None:
        """For :meth:`check_config`: ``(refused?, setting, why)`` triples; raise
        ``ValueError`` naming the first refused setting, why, and the fix."""
        for bad, setting, why in refused:
            if bad:
                raise ValueError(f"method={self.name} does not work with this {setting}: "
                                 f"{why}; remove or change {setting}")

    def holdout_examples(self, cfg: ExperimentConfig) -> int:
        """Examples of each client's training data kept out of training for the
        method's own use (FDLoRA's fusion search); 0: none."""
        return 0

    def server_hooks(self, cfg: ExperimentConfig) -> ServerHooks:
        return ServerHooks()

    def client_hooks(self, cfg: ExperimentConfig, worker: Worker) -> ClientHooks:
        return ClientHooks()

    def plan(self, round_idx: int) -> RoundPlan:
        """Default: everything that is not fixed trains; the shared parts go up."""
        trainable = (self.shared | self.private) - self.fixed
        return RoundPlan(train=frozenset(trainable), upload=frozenset(self.shared - self.fixed))

    def initial_adapter(self, state: Tensors) -> Tensors:
        """Every freshly drawn adapter (shared, per client or per round) passes
        through here; default: as drawn. SOFT orthonormalises A's rows."""
        return state

    def finalize(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global state from the combined one, after any DP noise (so it is
        post-processing and costs no privacy); default: unchanged. FedSVD
        re-factorises here."""
        return state

    def participants(self, sampled: list[int]) -> list[int]:
        """Which of the round's sampled clients train (default: all of them)."""
        return sampled

    def training_splits(self, splits: list) -> list:
        """Each client's data split (:class:`~sfedlora.data.ClientSplit`) as this
        method trains on it (default: unchanged; ``central`` pools training data)."""
        return splits

    def round_subset(self, cfg: ExperimentConfig, cid: int, size: int, splits: list,
                     round_idx: int) -> np.ndarray | None:
        """Positions of client ``cid``'s training data (``size`` examples, as
        :meth:`training_splits` made it; ``splits``: every client's own split) that round
        ``round_idx`` trains on (default None: all of them; ``central`` under
        ``local.epochs``: as many as the round's sampled clients hold)."""
        return None

    def local_steps(self, cfg: ExperimentConfig) -> int | None:
        """Local steps per round of a training client (default ``local.steps``; None:
        ``local.epochs`` decide)."""
        return cfg.local.steps

    def client_weight(self, num_examples: int, tensors: Tensors) -> float:
        """A client's unnormalised weight, from what it knows itself: what secure
        aggregation's clients pre-weight their uploads with (the server divides by the
        sum). Consistent with :meth:`weights`."""
        return 1.0 if self.weighting == "uniform" else float(num_examples)

    def weights(self, updates: Sequence[Update]) -> list[float]:
        if self.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = sum(u.num_examples for u in updates)
        return [u.num_examples / total for u in updates]

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: Sequence[Update],
        combine: Combiner = weighted_mean,
    ) -> dict[str, torch.Tensor]:
        """New global state: every uploaded tensor combined across clients with the
        method's weights (by default their weighted mean; the server may pass a robust
        combiner). Tensors nobody uploaded keep their global value. Updates are taken in
        client-id order so the result does not depend on arrival order.
        """
        updates = sorted(updates, key=lambda u: u.client_id)
        new_state = dict(global_state)
        if not updates:
            return new_state
        weights = self.weights(updates)
        for name in updates[0].tensors:
            new_state[name] = combine([u.tensors[name] for u in updates], weights,
                                      [u.present.get(name) for u in updates])
        return new_state
