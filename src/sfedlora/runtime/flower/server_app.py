"""The ServerApp: the round loop of :class:`~sfedlora.runtime.simulation.Simulation` with a
:class:`~sfedlora.runtime.flower.pool.FlowerPool`, so sampling, the server's checks and
aggregation, metrics, checkpoints and the run directory are the in-process runtime's,
and a Flower run and an in-process run of one config give the same numbers.

The run config key ``resume`` (a run directory) continues that run from its
checkpoint; the nodes read their clients' state from their state directories.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sfedlora.runtime.flower.config import (
    ANY_NODE_KEY,
    OVERWRITE_KEY,
    RESUME_KEY,
    experiment_config,
)
from sfedlora.runtime.flower.pool import FlowerPool
from sfedlora.runtime.simulation import Simulation

log = logging.getLogger(__name__)


def main(grid: Grid, context: Context, defaults: dict) -> None:
    run_config = {**defaults, **context.run_config}
    cfg = experiment_config(run_config)
    any_node = bool(run_config.get(ANY_NODE_KEY))
    if resume := run_config.get(RESUME_KEY):
        sim = Simulation.resume(resume, pool_factory=lambda c: FlowerPool(c, grid, any_node))
        log.info("Flower: resuming %s after round %d", resume, sim.done_rounds)
    else:
        sim = Simulation(cfg, FlowerPool(cfg, grid, any_node))
    summary = sim.run(overwrite=bool(run_config.get(OVERWRITE_KEY)))
    log.info("Flower run finished in %s: %s", sim.cfg.output_dir, {
        k: summary.get(k) for k in ("personalized_accuracy", "global_accuracy")})


def make_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` is run config that the run's own run config overrides."""
    defaults = dict(defaults or {})
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, defaults))
    return server


app = make_app()  # what `flwr run` and the SuperLink load (pyproject [tool.flwr.app])
