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
ladder's settings.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from sfedlora.config import ConfigError, load_config
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
    config, built = root / plan.config, {}
    stopped: dict[tuple[str, str], list[int]] = {}  # (arm, cause) -> seeds
    for arm, spec in plan.arms.items():
        seeds = plan.reporting_seeds if spec.rung_from else \
            [*plan.selection_seeds, *plan.reporting_seeds]
        for seed, rung in itertools.product(seeds, rungs(plan)):
            try:
                cfg = load_config(config, plan.settings(arm, seed, rung))
            except ConfigError as exc:
                cause = str(exc)
            else:
                key = (cfg.task, cfg.data.model_dump_json(), cfg.clients.num, seed)
                if key not in built:
                    built[key] = _data_problem(cfg)
                cause = built[key]
            if cause and seed not in stopped.setdefault((arm, cause), []):
                stopped[arm, cause].append(seed)
    return [f"arm {arm}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}: {cause}"
            for (arm, cause), seeds in stopped.items()]


def _data_problem(cfg) -> str | None:
    """Why the run's clients cannot be built, or None."""
    try:
        build_federated_data(cfg.data, cfg.clients.num, cfg.seed, get_task(cfg.task))
    except ConfigError as exc:
        return str(exc)
    return None
