"""Flower's Simulation Engine from Python: one virtual SuperNode per client, or
``flower.virtual_nodes`` of them, each serving whichever client a message names."""

from __future__ import annotations

import os
from pathlib import Path

from sfedlora.runtime.flower import client_app, server_app
from sfedlora.runtime.flower.config import (
    ANY_NODE_KEY,
    OVERWRITE_KEY,
    as_run_config,
    check_resumable,
    experiment_config,
    resume_run_config,
)
from sfedlora.runtime.results import refuse_occupied
from sfedlora.settings import ConfigError

# Offline and quiet: no telemetry, no Ray dashboard or usage report.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_DEDUP_LOGS": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Ray starts its workers at niceness 15, for clusters where they serve a busy driver.
# Here the workers are the clients and do all the training, so beside any other work on
# the machine (another run of a sweep, a test) they would get only its leftover CPU: a
# killed-and-resumed test run took 9 minutes instead of 2 beside two busy processes.
# Ray's own job manager sets the same variable for the same reason. Only for the Ray
# instance we start (a cluster's raylets were started by `ray start`); a value already
# set in the environment is kept.
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0"}


def run_simulation(config_file: str | None, overrides: list[str],
                   workers: int | None = None, resume: str | None = None,
                   overwrite: bool = False) -> None:
    """Run the experiment on Flower's simulation engine with ``clients.num`` virtual
    SuperNodes and ``workers`` worker processes (one CPU each; default: all cores),
    each holding one model. Results go to the config's ``output_dir``. ``resume`` (a
    run directory) continues that run from its checkpoint instead (``config_file``
    must then be None; ``overrides`` may change only what does not change results)."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    os.environ.update(QUIET_ENV)
    if resume:
        check_resumable(resume, overrides)
        run_config = resume_run_config(resume, overrides)
    else:
        run_config = as_run_config(config_file, overrides)
        cfg = experiment_config(run_config)
        if cfg.output_dir is not None:  # refuse before Ray starts
            refuse_occupied(Path(cfg.output_dir), overwrite)
        run_config[OVERWRITE_KEY] = overwrite
    run_config[ANY_NODE_KEY] = True  # virtual nodes share this machine's data and state
    cfg = experiment_config(run_config)
    if cfg.flower.ray_address is None:  # read by the raylet that ray.init starts
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    flwr_run_simulation(
        server_app=server_app.make_app(run_config),
        client_app=client_app.make_app(run_config),
        num_supernodes=cfg.flower.virtual_nodes or cfg.clients.num,
        backend_config=backend_config(cfg, workers),
    )


def backend_config(cfg, workers: int | None = None) -> dict:
    """Flower's Ray backend settings: each worker's reserved CPUs and GPUs
    (``flower.client_resources``), and either a Ray instance of this machine with
    ``workers`` CPUs (default: all cores) or the running cluster at
    ``flower.ray_address``, whose machines then all host workers."""
    flower = cfg.flower
    resources = flower.client_resources.model_dump()
    quiet = {"logging_level": "error", "log_to_driver": True}
    if flower.ray_address is not None:
        if workers is not None:
            raise ConfigError(
                f"--workers={workers} with flower.ray_address={flower.ray_address!r}: a "
                "cluster's size is set by `ray start --num-cpus` on each machine; drop "
                "--workers")
        # Ray refuses num_cpus and the dashboard flag when joining a cluster
        return {"client_resources": resources,
                "init_args": {"address": flower.ray_address, **quiet}}
    if resources["num_gpus"] > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"flower.client_resources.num_gpus={resources['num_gpus']} but no CUDA "
                "device is visible here, so no worker could start; set it to 0 or join a "
                "cluster with GPUs (flower.ray_address)")
    # "local": a new instance even where `ray start` left one running on this machine,
    # which ray.init() would otherwise join (and then refuse num_cpus)
    return {"client_resources": resources,
            "init_args": {"address": "local", "num_cpus": workers or os.cpu_count() or 1,
                          "include_dashboard": False, **quiet}}
