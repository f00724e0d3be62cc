"""The ClientApp: one federated client per SuperNode.

On a deployed node, Flower starts a fresh process for every message; this module is
all that process imports (Flower and the standard library, no torch). It hands the
message to the node's long-lived worker, which keeps the model loaded between
messages (:mod:`~sfedlora.runtime.flower.worker_channel`), and returns the worker's
reply. In the simulation engine, whose ClientApps live as long as the run, and on a
node started with ``--node-config "worker=false"``, the same handlers run here
(:mod:`~sfedlora.runtime.flower.handlers`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from sfedlora.runtime.flower import worker_channel


def handle(kind: str, msg: Message, context: Context, defaults: dict) -> Message:
    """``msg`` (a ``train``, ``evaluate`` or ``query`` message) handled by the node's
    worker or, where the node has none, in this process."""
    if worker_channel.uses_worker(context.node_config, {**defaults, **context.run_config}):
        return worker_channel.forward(kind, msg, context, defaults)
    from sfedlora.runtime.flower.compute_slots import node_slot
    from sfedlora.runtime.flower.handlers import HANDLERS

    with node_slot(context.node_config):
        return HANDLERS[kind](msg, context, defaults)


def make_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` is run config that the run's own run config overrides
    (how a programmatic simulation passes its experiment)."""
    defaults = dict(defaults or {})
    client = ClientApp()
    for kind in ("train", "evaluate", "query"):
        register = getattr(client, kind)()
        register(lambda msg, context, kind=kind: handle(kind, msg, context, defaults))
    return client


app = make_app()  # what `flwr run` and flower-supernode load (pyproject [tool.flwr.app])
