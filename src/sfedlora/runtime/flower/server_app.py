"""The ServerApp: the round loop of :class:`~sfedlora.runtime.simulation.Simulation` with a
:class:`~sfedlora.runtime.flower.pool.FlowerPool`, so sampling, the server's checks and
aggregation, metrics, checkpoints and the run directory are the in-process runtime's,
and a Flower run and an in-process run of one config give the same numbers.

The run config key ``resume`` (a run directory) continues that run from its
checkpoint; the nodes read their clients' state from their state directories.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from sfedlora.runtime.flower.config import (
    ANY_NODE_KEY,
    OVERWRITE_KEY,
    RESUME_KEY,
    experiment_config,
)
from sfedlora.runtime.flower.pool import FlowerPool
from sfedlora.runtime.report import round_line, summary_text
from sfedlora.runtime.results import RunDir, resolve_output_dir
from sfedlora.runtime.simulation import Simulation


def main(grid: Grid, context: Context, defaults: dict) -> None:
    run_config = {**defaults, **context.run_config}
    cfg = experiment_config(run_config)
    any_node = bool(run_config.get(ANY_NODE_KEY))
    if resume := run_config.get(RESUME_KEY):
        sim = Simulation.resume(resume, pool_factory=lambda c: FlowerPool(c, grid, any_node))
        flwr_log(INFO, "sfedlora: resuming %s after round %d", resume, sim.done_rounds)
    else:
        sim = Simulation(cfg, FlowerPool(cfg, grid, any_node))
    run_dir = RunDir(resolve_output_dir(sim.cfg), writers=[RoundLog(sim.cfg.rounds)])
    summary = sim.run(run_dir, overwrite=bool(run_config.get(OVERWRITE_KEY)))
    for line in summary_text(summary, sim.run_dir):
        flwr_log(INFO, line)


class RoundLog:
    """A metric writer that logs each round's key figures through Flower's logger, so
    ``flwr run --stream`` shows how the run goes (the same line on every runtime:
    :func:`~sfedlora.runtime.report.round_line`)."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def write(self, record: dict) -> None:
        flwr_log(INFO, round_line(record, self.rounds))

    def close(self) -> None:
        pass


def make_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` is run config that the run's own run config overrides."""
    defaults = dict(defaults or {})
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, defaults))
    return server


app = make_app()  # what `flwr run` and the SuperLink load (pyproject [tool.flwr.app])
