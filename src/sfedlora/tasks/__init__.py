"""Layer 6, tasks. Tasks: what a model learns and how it is scored, one component per task.

A task provides the base model class and its default LoRA targets, the data pools and
what clients are partitioned by, encoding and batching, the local loss (the model's
own ``loss`` on a collated batch), evaluation on a client, and combining the clients'
scores on the server (:class:`~sfedlora.tasks.base.Task`). Runtimes hold a task object
and never ask which task it is. Looked up by name without importing the modules, so
config validation stays cheap.

May import: every layer below (``core`` to ``modeling``/``data``); never the methods
or the runtimes (reached through the protocols of :mod:`sfedlora.tasks.base`).
"""

from __future__ import annotations

import importlib

from sfedlora.tasks.base import ClientSets, Task

TASKS = {
    "classification": "sfedlora.tasks.classification:ClassificationTask",
    "causal-lm": "sfedlora.tasks.causal_lm:CausalLMTask",
}


def get_task(name: str) -> Task:
    try:
        module, cls = TASKS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
    return getattr(importlib.import_module(module), cls)()


__all__ = ["TASKS", "ClientSets", "Task", "get_task"]
