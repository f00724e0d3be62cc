"""Experiment config from Flower run config (identical on the server and every node)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from sfedlora.config import ExperimentConfig, load_config

CONFIG_FILE_KEY = "config-file"


def experiment_config(run_config: Mapping[str, object]) -> ExperimentConfig:
    """``config-file`` (optional YAML) with every other key as a dotted override.
    Strings are passed through; other values are written as JSON so that lists and
    booleans keep their type."""
    path = run_config.get(CONFIG_FILE_KEY) or None
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                 for k, v in sorted(run_config.items()) if k != CONFIG_FILE_KEY]
    return load_config(str(path) if path else None, [*overrides, "progress=false"])


def as_run_config(config_file: str | None, overrides: list[str]) -> dict[str, str]:
    """The run config that :func:`experiment_config` turns back into this experiment."""
    run_config = {CONFIG_FILE_KEY: config_file} if config_file else {}
    for item in overrides:
        key, _, value = item.partition("=")
        run_config[key] = value
    return run_config
