"""Experiment config from Flower run config (identical on the server and every node).

Two keys are declared in pyproject ``[tool.flwr.app.config]`` so that ``flwr run -c``
accepts them: ``config-file`` (a YAML config; absolute, or relative to the directory
the SuperLink was started in) and ``overrides`` (space-separated ``dotted.key=value``
items, as on the ``sfedlora run`` command line). Programmatic runs may also pass each
override as its own run-config key.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping

from sfedlora.config import ExperimentConfig, load_config
from sfedlora.runtime.flower.run_keys import (
    ANY_NODE_KEY,
    CONFIG_FILE_KEY,
    OVERRIDES_KEY,
    OVERWRITE_KEY,
    RESUME_KEY,
)


def experiment_config(run_config: Mapping[str, object]) -> ExperimentConfig:
    """``config-file`` (optional YAML), then the ``overrides`` string, then every other
    key as a dotted override. Strings are passed through; other values are written as
    JSON so that lists and booleans keep their type."""
    path = run_config.get(CONFIG_FILE_KEY) or None
    overrides = shlex.split(str(run_config.get(OVERRIDES_KEY) or ""))
    overrides += [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                  for k, v in sorted(run_config.items())
                  if k not in (CONFIG_FILE_KEY, OVERRIDES_KEY, RESUME_KEY, OVERWRITE_KEY,
                                   ANY_NODE_KEY)]
    return load_config(str(path) if path else None, [*overrides, "progress=false"])


def as_run_config(config_file: str | None, overrides: list[str]) -> dict[str, str]:
    """The run config that :func:`experiment_config` turns back into this experiment
    (the two declared keys only, so ``flwr run`` accepts it too)."""
    return {CONFIG_FILE_KEY: config_file or "", OVERRIDES_KEY: shlex.join(overrides)}


def check_resumable(run_dir, overrides: list[str] = ()) -> None:
    """Refuse, before any process starts, a run directory without a checkpoint or
    overrides that would change its results."""
    from pathlib import Path

    from sfedlora.core.checkpoint import FILENAME, load_checkpoint
    from sfedlora.runtime.simulation import resume_config

    run_dir = Path(run_dir)
    resume_config(run_dir, load_checkpoint(run_dir / FILENAME), overrides)


def resume_run_config(run_dir: str, overrides: list[str] = ()) -> dict[str, str]:
    """The run config that continues the run in ``run_dir``: its saved config (so the
    nodes build the same experiment) and the ``resume`` key for the ServerApp."""
    from pathlib import Path

    run_dir = str(Path(run_dir).resolve())
    return {**as_run_config(str(Path(run_dir) / "config.yaml"),
                            [*overrides, f"output_dir={run_dir}"]), RESUME_KEY: run_dir}
