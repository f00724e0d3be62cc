"""FDLoRA's client side: the personal copy and the fusion search.

The personal adapter lives in the client's method-owned state (``ClientState.method``,
under ``personal.<tensor name>``), so it is stored, checkpointed and moved exactly as
every other piece of client state, and never sent.
"""

from __future__ import annotations

import contextlib

from sfedlora.methods.base import ClientStage, Part, Tensors

PREFIX = "personal."


def fuse(global_: Tensors, personal: Tensors, w1: float, w2: float) -> Tensors:
    """``w1 * global + w2 * personal`` on every adapter tensor."""
    return {n: w1 * t + w2 * personal[n] for n, t in global_.items()}


def personal_adapter(state) -> Tensors | None:
    """Client ``state``'s personal adapter (None before its first round)."""
    if not state.method:
        return None
    return {n[len(PREFIX):]: t for n, t in state.method.items() if n.startswith(PREFIX)}


def choose_fusion(worker, grid: list[float], global_: Tensors, personal: Tensors, holdout
                  ) -> tuple[float, float, float]:
    """``(w1, w2, loss)`` minimising the held-out loss of :func:`fuse` over the grid
    (gradient-free, as LoraHub composes modules; the first minimum in grid order wins
    ties)."""
    weights = [(w1, w2) for w1 in grid for w2 in grid if w1 or w2]
    assert weights, "options.grid has a non-zero value (validated)"
    losses = worker.holdout_losses([fuse(global_, personal, w1, w2) for w1, w2 in weights],
                                   holdout)
    best = min(range(len(weights)), key=losses.__getitem__)  # the first of equal minima
    return (*weights[best], losses[best])


class PersonalCopy(ClientStage):
    def __init__(self, options, worker):
        self.options, self.worker = options, worker

    @contextlib.contextmanager
    def training(self, cid: int, state, round_idx: int):
        """After the local steps, refresh the personal copy from the locally trained
        global adapter in rounds divisible by ``options.sync_every``, and on the
        client's first round."""
        yield None
        if state.method is None or round_idx % self.options.sync_every == 0:
            state.method = {PREFIX + n: t
                            for n, t in self.worker.slots.snapshot(set(Part)).items()}

    def scored_adapter(self, cid: int, state, own: Tensors, holdout):
        personal = personal_adapter(state)
        if personal is None:
            return own, {}
        w1, w2, _ = choose_fusion(self.worker, self.options.grid, own, personal, holdout)
        return fuse(own, personal, w1, w2), {"fusion_weights": [w1, w2]}
