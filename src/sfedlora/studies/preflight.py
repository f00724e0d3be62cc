"""Before a study spends hours: can every run of its plan start?

A study's runs start one by one, each in a process of its own, so a setting that the
schema or the method refuses, or clients that cannot be drawn for one seed, would
otherwise show as that run's failure, possibly hours in, after every run before it.
(The BBC plans met the second kind: a Dirichlet partition that fit the selection seed
and none of the reporting seeds, found only when the reporting stage began.)

:func:`check` resolves the config of every run the plan names (each arm on each of its
seeds and ladder rungs) and builds each distinct federated dataset those configs ask
for: the same calls a run makes before it loads a model, so the check takes seconds.
Rungs that the ladder gains past an end are not known yet; they change only the
ladder's settings. A sweep (:func:`~sfedlora.studies.sweep.run_sweep`) builds its runs'
clients the same way (:class:`ClientData`) before it starts one.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from sfedlora.config import ConfigError, ExperimentConfig, load_config
from sfedlora.data import build_federated_data
from sfedlora.studies.plan import Plan
from sfedlora.tasks import get_task


def rungs(plan: Plan) -> list[dict[str, float]]:
    """Every rung of the plan's ladder (one empty rung without a ladder)."""
    keys = list(plan.ladder)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(plan.ladder[k] for k in keys))]


def check(plan: Plan, root: Path) -> list[str]:
    """What would stop a run of ``plan`` (its config relative to ``root``) from
    starting: one line per arm and cause, naming the seeds it stops; empty when every
    run can start."""
    config, clients = root / plan.config, ClientData()
    stopped: dict[tuple[str, str], list[int]] = {}  # (arm, cause) -> seeds
    for arm, spec in plan.arms.items():
        seeds = plan.reporting_seeds if spec.rung_from else \
            [*plan.selection_seeds, *plan.reporting_seeds]
        for seed, rung in itertools.product(seeds, rungs(plan)):
            try:
                cause = clients.problem(load_config(config, plan.settings(arm, seed, rung)))
            except ConfigError as exc:
                cause = str(exc)
            if cause and seed not in stopped.setdefault((arm, cause), []):
                stopped[arm, cause].append(seed)
    return [f"arm {arm}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}: {cause}"
            for (arm, cause), seeds in stopped.items()]


class ClientData:
    """Whether runs' clients can be built: each distinct data set (task, data settings,
    number of clients, seed) is built once, as the run would build it."""

    def __init__(self) -> None:
        self._built: dict[tuple, str | None] = {}

    def problem(self, cfg: ExperimentConfig) -> str | None:
        """Why ``cfg``'s clients cannot be built, or None."""
        key = (cfg.task, cfg.data.model_dump_json(), cfg.clients.num, cfg.seed)
        if key not in self._built:
            try:
                build_federated_data(cfg.data, cfg.clients.num, cfg.seed,
                                     get_task(cfg.task))
                self._built[key] = None
            except ConfigError as exc:
                self._built[key] = str(exc)
        return self._built[key]
