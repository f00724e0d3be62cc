"""TSFA (Kim and Choi, arXiv 2505.00333): SOFT whose keep ratio and bandwidth split are
chosen every round under a latency budget. Details reconstructed from the abstract.

- **Offline** (``sfedlora tsfa-plan``, :mod:`.plan`): short pilots pick the rank.
- **Online** (this module): before each round the server chooses the keep ratio rho_t
  by drift-plus-penalty (:mod:`.schedule`) from the importance profiles the clients
  reported last round and this round's channels, and sends it with the download; the
  network splits the band so the clients finish together (``network.allocation:
  min_max``, the split minimising the latency for a given rho). After the round, the
  virtual queue grows by the realised latency's excess over the budget.

The first round has no profiles yet and keeps the largest choice. Each choice's upload
size, and the download's, come from encoding payloads of their shape with the run's
codecs (sizes depend on shapes and counts, not values); the tokens a client trains are
last round's mean (before any: every step's batch at ``model.max_length``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from sfedlora.methods.base import Choice, ClientStage, ServerRound, ServerStage, Tensors
from sfedlora.methods.soft import Soft, SoftClient
from sfedlora.methods.soft.components import PROFILE, component_positions
from sfedlora.methods.soft.options import TsfaOptions
from sfedlora.methods.soft.schedule import drift_plus_penalty, mean_dropped_share, next_queue
from sfedlora.settings import ConfigError


class TsfaMetric(StrEnum):
    """The round metrics TSFA's online stage reports."""

    KEEP = "tsfa_keep"  # the round's keep ratio
    QUEUE = "tsfa_queue"  # the virtual queue of latency over budget
    PREDICTED_LATENCY = "tsfa_predicted_latency_seconds"  # at the chosen keep ratio


KEEP_EXTRA = "tsfa.keep_choice."  # + the choice's index: the round's keep ratio
IMPORTANCE = "importance"  # a client's report: every layer's scores, layer after layer


@dataclass(frozen=True)
class KeepChoice:
    """The round's keep ratio as the server sends it: its index in
    ``options.keep_choices``. On the wire it is the name of a one-element download
    extra (``tsfa.keep_choice.<index>``), the format every committed TSFA run's byte
    counts were made with; only :meth:`extras` and :meth:`read` know that."""

    index: int

    def extras(self) -> Tensors:
        return {f"{KEEP_EXTRA}{self.index}": torch.zeros(1)}

    @classmethod
    def read(cls, extras: Tensors) -> KeepChoice | None:
        """The choice a download's extras carry (None: none)."""
        for name in extras:
            if name.startswith(KEEP_EXTRA):
                return cls(int(name[len(KEEP_EXTRA):]))
        return None


class TsfaClient(SoftClient):
    def __init__(self, options: TsfaOptions, worker):
        super().__init__(options, worker)
        self.choices = options.keep_choices
        self.keep = self.choices[-1]
        self.profile = PROFILE[options.importance]

    def receive(self, extras: Tensors) -> None:
        if (choice := KeepChoice.read(extras)) is not None:
            self.keep = self.choices[choice.index]

    def choose_upload(self, upload: Tensors) -> Choice:
        """SOFT's components at the round's keep ratio, and every layer's importance
        profile for the server's schedule."""
        scores = []
        for name in [n for n in upload if ".lora_A." in n]:
            a, b = upload[name], upload[name.replace(".lora_A.", ".lora_B.")]
            scores += self.profile(a, b).tolist()
        return Choice(positions=self.positions(upload), report={IMPORTANCE: scores})


class TsfaServer(ServerStage):
    def __init__(self, cfg, options: TsfaOptions, layout, network):
        self.cfg, self.tsfa = cfg, options
        self.queue = 0.0
        self.keep = self.tsfa.keep_choices[-1]
        self.profiles: list[list[float]] = []  # last reports, one per client and layer
        self.tokens: float | None = None  # mean tokens a client trained last round
        self.ranks: list[int] = []  # each layer's rank, in report order
        self.up_bytes: dict[float, int] = {}  # keep ratio -> upload size
        self.down_bytes = 0
        self._size_messages(layout)
        self._check_budget(network)

    def _size_messages(self, layout) -> None:
        """Size every choice's upload and the download by encoding payloads of their
        shape with the run's codecs: sizes depend on shapes and counts, and on values
        only through the deflated layout and index (a few bytes)."""
        zeros = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in layout.spec.items()}
        a_names = [n for n in zeros if ".lora_A." in n]
        self.ranks = [zeros[n].shape[0] for n in a_names]
        up = self.cfg.codec("up")
        meta = {"client": self.cfg.clients.num - 1, "round": self.cfg.rounds}
        for keep in self.tsfa.keep_choices:
            positions = {}
            for name in a_names:
                b_name = name.replace(".lora_A.", ".lora_B.")
                chosen = torch.arange(math.ceil(keep * zeros[name].shape[0]))
                positions[name], positions[b_name] = component_positions(
                    chosen, zeros[name].shape, zeros[b_name].shape)
            self.up_bytes[keep] = len(up.encode(zeros, zeros, meta, positions))
        extra = KeepChoice(len(self.tsfa.keep_choices) - 1).extras()
        self.down_bytes = len(self.cfg.codec("down").encode({**zeros, **extra}))

    def _check_budget(self, network) -> None:
        """Refuse a budget that no client meets alone on the whole band at the smallest
        keep ratio (every step's batch at model.max_length: an upper bound on the
        tokens, so this errs towards accepting)."""
        cfg, smallest = self.cfg, self.tsfa.keep_choices[0]
        best = min(network.solo_latency(c, 1, self.up_bytes[smallest], self.down_bytes,
                                        self._most_tokens())
                   for c in range(cfg.clients.num))
        if self.tsfa.latency_budget_s < best:
            raise ConfigError(
                f"options.latency_budget_s={self.tsfa.latency_budget_s} is below {best:.3g} s, "
                "the least any client needs for a round alone on the whole band at the "
                f"smallest keep ratio ({smallest}); raise the budget, widen "
                "network.bandwidth_hz or lower the work per round")

    def _most_tokens(self) -> int:
        local = self.cfg.local
        return (local.steps or 1) * local.batch_size * self.cfg.model.max_length

    @contextlib.contextmanager
    def round(self, rnd: ServerRound):
        """Before the downloads, choose the round's keep ratio; after the round, update
        the virtual queue with its latency, and keep the clients' profiles."""
        rnd.metrics |= self._choose(rnd.index, rnd.clients, rnd.network)
        yield
        self.queue = next_queue(self.queue, rnd.latency, self.tsfa.latency_budget_s)
        if reported := [fit.report[IMPORTANCE] for fit in rnd.fits.values()
                        if fit.report.get(IMPORTANCE)]:
            self.profiles = [layer for scores in reported for layer in self._layers(scores)]
        if rnd.fits:
            self.tokens = sum(fit.tokens or 0 for fit in rnd.fits.values()) / len(rnd.fits)

    def _choose(self, round_idx: int, clients: list[int], network) -> dict[str, Any]:
        """The keep ratio of least drift plus penalty, and the metrics of that choice."""
        choices = self.tsfa.keep_choices
        tokens = self._most_tokens() if self.tokens is None else self.tokens

        def latency(keep: float) -> float:
            return network.latency(round_idx, dict.fromkeys(clients, self.up_bytes[keep]),
                                   dict.fromkeys(clients, self.down_bytes),
                                   dict.fromkeys(clients, tokens))

        times = {keep: latency(keep) for keep in choices}
        if self.profiles:
            self.keep, _ = drift_plus_penalty(
                choices, lambda k: mean_dropped_share(self.profiles, k), times.__getitem__,
                self.tsfa.v, self.queue)
        else:  # no importance profiles yet: nothing to weigh, keep everything
            self.keep = choices[-1]
        return {TsfaMetric.KEEP: self.keep, TsfaMetric.QUEUE: self.queue,
                TsfaMetric.PREDICTED_LATENCY: times[self.keep]}

    def download_extras(self, cid: int | None, advance: bool = True) -> Tensors:
        return KeepChoice(self.tsfa.keep_choices.index(self.keep)).extras()

    def _layers(self, scores: list[float]) -> list[list[float]]:
        """A report's scores, one list per layer."""
        ends = list(itertools.accumulate(self.ranks))
        return [scores[end - r:end] for r, end in zip(self.ranks, ends, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "keep": self.keep, "profiles": self.profiles,
                "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue, self.keep = float(state["queue"]), float(state["keep"])
        self.profiles = [list(map(float, p)) for p in state["profiles"]]
        self.tokens = state["tokens"]


class Tsfa(Soft):
    """SOFT with each round's keep ratio and bandwidth split chosen by drift-plus-penalty
    under a latency budget (and the rank by tsfa-plan)"""

    Options = TsfaOptions

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        self.refuse([
            (cfg.network.model != "wireless", "network.model",
             "TSFA schedules rounds by their simulated latency; set network.model=wireless"),
            (cfg.network.allocation != "min_max", "network.allocation",
             "TSFA splits the band so the round's clients finish together; set "
             "network.allocation=min_max"),
            (cfg.privacy.secure_aggregation, "privacy.secure_aggregation",
             "TSFA reads each client's importance profile"),
        ])
        if self.options.plan is not None:
            from sfedlora.methods.soft.plan import read_plan

            chosen = read_plan(self.options.plan)["rank"]
            if cfg.lora.rank != chosen:
                raise ValueError(f"lora.rank={cfg.lora.rank} but the plan {self.options.plan} "
                                 f"chose rank {chosen}; set lora.rank={chosen}")

    def client_stage(self, cfg, worker) -> ClientStage:
        return TsfaClient(self.options, worker)

    def server_stage(self, cfg, layout, network) -> ServerStage:
        return TsfaServer(cfg, self.options, layout, network)
