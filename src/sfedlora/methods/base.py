"""The method interface: a small description of one federated LoRA algorithm, and the
two stages through which a method with mechanics of its own reaches a round.

A method declares, as data:

* where each part of the adapter lives (:class:`Roles`): on the server and downloaded
  every round (``shared``), with each client across rounds and never sent
  (``private``), fixed at one seeded init on every client (``fixed``), or drawn afresh
  every round (``fresh``);
* what assembling a run reads of it (:class:`Traits`): its default LoRA scale,
  ``a_init`` modes, codec presets and server optimizer, how it weights clients, and
  which settings it runs with (mixed ranks, VeRA, secure aggregation);
* its own settings (``Options``, a pydantic model of the config's ``options`` block);

and overrides, where it differs from FedIT:

* :meth:`Method.check_config`: settings it refuses, with the fix;
* :meth:`Method.plan`: which parts train and go up in a round (RoLoRA, FedSVD);
* :meth:`Method.aggregate`: how the server combines uploads (FlexLoRA's SVD, SOFT's
  per-component mean, FLoRA);
* :meth:`Method.initial_adapter`: every freshly drawn adapter (SOFT's orthonormal A);
* :meth:`Method.local_data`: what each client trains on (``central`` pools the data,
  FDLoRA holds some out);
* :meth:`Method.server_stage` and :meth:`Method.client_stage`: the stages that carry
  mechanics of its own (FLoRA's and FedEx-LoRA's merges into the base weights, TSFA's
  keep-ratio schedule, FDLoRA's personal copy, FedSVD's re-factorisation).

Those are all the override points there are: ten on :class:`Method`, six on
:class:`ServerStage`, four on :class:`ClientStage` (``tests/test_architecture.py``
counts them). Members marked ``@final`` are helpers, not override points.

Runtimes execute a method and never branch on its name. Messages of any method pass
through any codec (:mod:`sfedlora.core.codecs`), so compression composes with every
method; FLoCoRA is FedIT with the preset "8-bit uploads", FLASC names a preset (top-k
both ways) and a server optimizer (AdamW on the mean client change). A method is
registered once, by name, in :data:`sfedlora.methods.REGISTRY`, or named in a config
by its import path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, final

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from sfedlora.aggregation import weighting
from sfedlora.aggregation.combiners import Combiner, weighted_mean
from sfedlora.core.parts import A_MARKERS, B_MARKERS, Part, part_of  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from sfedlora.core.adapters import AdapterSlots
    from sfedlora.core.records import ClientState, FitResult
    from sfedlora.core.stores import TensorStore
    from sfedlora.settings import ExperimentConfig

Tensors = dict[str, torch.Tensor]
ALL_PARTS = frozenset(Part)


class Worker(Protocol):
    """What a method's client stage may use of the runtime's worker (the runtime layer
    implements it; methods never import the runtime)."""

    model: torch.nn.Module  # the PEFT model, shared by every client of this process
    slots: AdapterSlots  # its adapter's tensors by name and part
    shared_store: TensorStore  # tensors every client of this process may read

    def holdout_loss(self, tensors: Tensors, data: Any) -> float:
        """The task's mean loss of adapter ``tensors`` on held-out ``data``."""


# --- what a method declares ---------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """Where each part of the adapter lives."""

    shared: frozenset[Part] = ALL_PARTS  # held by the server, downloaded every round
    private: frozenset[Part] = frozenset()  # kept by each client across rounds, never sent
    fixed: frozenset[Part] = frozenset()  # one seeded init on every client; never trained
    fresh: frozenset[Part] = frozenset()  # re-drawn every round at the client's rank
    # each client also keeps a personal adapter its scored adapter is built from (FDLoRA)
    personal: bool = False

    @property
    def has_global_adapter(self) -> bool:
        """True when the server's state alone is a complete adapter."""
        return not self.private

    @property
    def per_client_adapters(self) -> bool:
        """True when each client's scored adapter differs from the global one (private
        parts, or a personal one): those are exported one per client."""
        return bool(self.private) or self.personal


@dataclass(frozen=True)
class Traits:
    """What assembling a run reads of a method: the defaults that settings left unset
    take, and the settings it runs with (a refusal names the setting and why)."""

    scaling: str = "lora"  # default lora.scaling
    # a scheme of sfedlora.aggregation.weighting: "examples" (p_k ~ n_k), "uniform",
    # "product_norm" (HetLoRA's ||B_k A_k||_F)
    weighting: str = "examples"
    a_init_modes: tuple[str, ...] = ("shared",)  # first: the default; one: no choice
    a_init_note: str = "every client starts from one shared A"
    comm: dict[str, dict] = field(default_factory=dict)  # codec presets per direction
    # "none": the combined uploads become the global state; "sgd" / "adamw": their
    # mean change is the gradient of a server optimizer step (FedOpt; FLASC)
    server_optimizer: str = "none"
    mixed_ranks: bool = False  # whether clients may hold different ranks
    vera: bool = False  # whether lora.adapter=vera applies
    # why the server step is not a weighted sum of what clients send (so secure
    # aggregation, which reveals only that sum, cannot run it); "" where it is
    secure_aggregation_refusal: str = ""
    # whether clients choose which entries of their upload to send (SOFT: whole rank
    # components), so error feedback has work to do even through a lossless codec
    chooses_upload_positions: bool = False
    # why several clients' local rounds cannot interleave on one model
    # (clients.parallel; sfedlora.runtime.batched), "" where they can: the client
    # stage's ``training`` yields no penalty and neither it nor ``receive`` changes the
    # model. The batched trainer enters every client's ``training`` together, leaves
    # each with that client's adapter on the model, and repeats ``receive`` with the
    # client's extras just before its ``choose_upload``.
    batched_refusal: str = ""

    @property
    def integer_weights(self) -> bool:
        """Whether a client's weight is always an integer (summed exactly under secure
        aggregation)."""
        return self.weighting in weighting.INTEGER_SCHEMES


@dataclass(frozen=True)
class RoundPlan:
    """What a client does in one round."""

    train: frozenset[Part]
    upload: frozenset[Part]


@dataclass(frozen=True)
class LocalData:
    """What each client trains on, decided when a process builds its clients."""

    splits: list  # each client's data split as the method trains on it
    steps: int | None  # local steps per round of a training client (None: local.epochs)
    holdout: int = 0  # training examples each client keeps out for the method (FDLoRA)
    # (cid, size, round) -> positions of the client's training data the round trains
    # on (None: all of them)
    round_subset: Callable[[int, int, int], np.ndarray | None] | None = None


@dataclass(frozen=True)
class Update:
    """One client's upload as the server decoded it."""

    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor]
    # Per tensor, the coordinates the client really sent, where it sent fewer than all
    # (a sparse upload, a lower rank's zero padding); robust combiners use only those.
    present: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Choice:
    """What a client stage chose to send of a trained upload: per tensor the sorted
    flat positions (a tensor not named goes whole; None: the codec decides), and
    numbers about the fit for the method's server stage (TSFA's importance profiles)."""

    positions: Tensors | None = None
    report: dict[str, list[float]] = field(default_factory=dict)


# --- the stages ---------------------------------------------------------------------


@dataclass
class ServerRound:
    """One round as a server stage sees it. A stage may narrow ``clients`` and add
    ``metrics`` before the round's downloads; after it, ``fits`` holds each replying
    client's fit, ``dropped`` who did not reply and ``latency`` the network's price of
    the round in seconds (None without a network model)."""

    index: int
    clients: list[int]
    network: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    fits: dict[int, FitResult] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    latency: float | None = None


class ServerStage:
    """The server side of a method's own mechanics (default: none). The server calls
    each member at a fixed point of its round; a method that needs more subclasses
    this in its own package. Checkpointed through ``state_dict``."""

    def round(self, rnd: ServerRound) -> contextlib.AbstractContextManager:
        """Around one round: before its downloads the stage may narrow ``rnd.clients``
        (``central``: one trainer) and add ``rnd.metrics`` (TSFA: the keep ratio it
        chooses); after it, it sees the fits and the latency (TSFA's queue, the merges
        a dropped client missed)."""
        return contextlib.nullcontext()

    def download_extras(self, cid: int | None, advance: bool = True) -> Tensors:
        """Tensors sent to client ``cid`` beside the shared state (names outside the
        adapter's); ``advance``: the client now holds them (a training download), as
        opposed to an evaluation request, which is not traffic."""
        return {}

    def after_combine(self, round_idx: int, state: Tensors, updates: Sequence[Update]
                      ) -> Tensors:
        """The new global state from the combined one, after any DP noise (so it is
        post-processing and costs no privacy), with the round's accepted updates in
        client-id order (FedSVD re-factorises; FLoRA records the merge)."""
        return state

    def export_lora(self, state: Tensors) -> tuple[Tensors, int] | None:
        """The extension point of exact export for methods that merge into the base
        weights (FLoRA, FedEx-LoRA): an exact LoRA (factors, rank) that replaces the
        exported adapters' own factors; ``state`` is the server's global state."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values and tensors, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


Penalty = Callable[[], torch.Tensor]


class ClientStage:
    """The client side of a method's own mechanics (default: none)."""

    def receive(self, extras: Tensors) -> None:
        """The extra tensors of a download or evaluation request (see
        :meth:`ServerStage.download_extras`), before anything runs on the model."""

    def training(self, cid: int, state: ClientState, round_idx: int
                 ) -> contextlib.AbstractContextManager[Penalty | None]:
        """Around client ``cid``'s local steps: may yield a term added to each step's
        loss, computed from the adapter on the model (SOFT's orthogonality penalty;
        the logged loss is the task's alone); on a normal exit the trained adapter is
        still on the model and the stage may add to ``state.method`` (FDLoRA)."""
        return contextlib.nullcontext()

    def choose_upload(self, upload: Tensors) -> Choice:
        """What to send of ``upload`` (the adapter tensors as trained, before any
        compression), and the fit's report for the server stage."""
        return Choice()

    def scored_adapter(self, cid: int, state: ClientState, own: Tensors, holdout
                       ) -> tuple[Tensors, dict[str, list[float]]]:
        """The extension point of personalised evaluation (FDLoRA's fusion): the
        adapter client ``cid`` is scored and exported with (default: its own), and
        per-client values to report beside the metrics."""
        return own, {}


# --- the method ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A ``sfedlora`` subcommand that ships with a method (TSFA's offline rank plan),
    listed in :data:`sfedlora.methods.COMMANDS`. The CLI adds ``add_arguments`` to its
    parser and calls ``run(args, context)``; ``context`` gives what a method may not
    import itself: ``context.load_config(path, overrides)`` (a resolved config) and
    ``context.run_rounds(cfg, server_stage)`` (the in-process runtime). ``run``
    returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]
    run: Callable[[Any, Any], int]


class NoOptions(BaseModel):
    """A method's settings under the experiment config's ``options`` (none by default);
    a method with settings of its own defines a pydantic model named ``Options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method:
    """FedIT unless a subclass says otherwise (the first line of its docstring is its
    summary; its registry key, or import path, is its name)."""

    Options: ClassVar[type[BaseModel]] = NoOptions
    roles: ClassVar[Roles] = Roles()
    traits: ClassVar[Traits] = Traits()

    def __init__(self, options: BaseModel | None = None, name: str | None = None):
        self.options = options if options is not None else self.Options()
        self.name = name or type(self).__name__.lower()

    def check_config(self, cfg: ExperimentConfig) -> None:
        """Refuse settings this method cannot run with: raise ``ValueError`` naming the
        setting and the fix (see :meth:`refuse`). Called by config validation."""

    @final
    def refuse(self, refused: Sequence[tuple[bool, str, str]]) -> None:
        """For :meth:`check_config`: ``(refused?, setting, why)`` triples; raise
        ``ValueError`` naming the first refused setting, why, and the fix."""
        for bad, setting, why in refused:
            if bad:
                raise ValueError(f"method={self.name} does not work with this {setting}: "
                                 f"{why}; remove or change {setting}")

    def plan(self, round_idx: int) -> RoundPlan:
        """Default: everything that is not fixed trains; the shared parts go up."""
        roles = self.roles
        trainable = (roles.shared | roles.private) - roles.fixed
        return RoundPlan(train=frozenset(trainable), upload=frozenset(roles.shared - roles.fixed))

    def initial_adapter(self, state: Tensors) -> Tensors:
        """The extension point of drawn initialisations (SOFT's orthonormal A): every
        freshly drawn adapter (shared, per client or per round) passes through here;
        default: as drawn."""
        return state

    def local_data(self, cfg: ExperimentConfig, splits: list) -> LocalData:
        """What clients train on, from every client's own split
        (:class:`~sfedlora.data.ClientSplit`): default, each its own, ``local.steps``
        per round."""
        return LocalData(splits, cfg.local.steps)

    def server_stage(self, cfg: ExperimentConfig, layout: Any, network: Any) -> ServerStage:
        """The server side of the method's mechanics, built once per server (and on
        resume, before its state is restored) with the adapter's layout and the
        network model (None for ``network.model: none``). It may refuse the setup with
        a ``ConfigError`` naming the setting (TSFA: a latency budget no client meets)."""
        return ServerStage()

    def client_stage(self, cfg: ExperimentConfig, worker: Worker) -> ClientStage:
        return ClientStage()

    @final
    def client_weight(self, num_examples: int, tensors: Tensors) -> float:
        """A client's unnormalised weight, from what it knows itself (its scheme,
        ``traits.weighting``): what secure aggregation's clients pre-weight their
        uploads with (the server divides by the sum)."""
        return weighting.client_weight(self.traits.weighting, num_examples, tensors)

    @final
    def weights(self, updates: Sequence[Update]) -> list[float]:
        """The normalised weights of ``updates``."""
        return weighting.normalised(self.traits.weighting,
                                    [(u.num_examples, u.tensors) for u in updates])

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
