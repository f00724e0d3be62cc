"""The Flower runtime: the same methods, codec and task code on Flower's engines.

``client_app`` (:mod:`sfedlora.runtime.flower.client_app`) runs on every SuperNode: one model
per worker process, one client (``partition-id`` in the node config) per node, its
private state in the node's ``Context.state`` and on disk as safetensors.
``server_app`` (:mod:`sfedlora.runtime.flower.server_app`) runs the usual round loop of
:class:`~sfedlora.runtime.simulation.Simulation` with the clients reached by messages, and
writes the usual run directory. Messages carry sfedlora's own safetensors payloads as
bytes, so the codecs, the server's checks and the byte counts are the in-process
simulator's.

The experiment config travels as Flower run config: ``config-file`` (a YAML file, as
for ``sfedlora run``) plus any dotted key (``lora.rank = 16``) as an override.
"""

__all__ = ["experiment_config"]


def __getattr__(name: str):
    # imported on first use: a deployed node's per-message ClientApp process imports this
    # package and should not pay for torch (see client_app)
    if name == "experiment_config":
        from sfedlora.runtime.flower.config import experiment_config

        return experiment_config
    raise AttributeError(f"module 'sfedlora.runtime.flower' has no attribute {name!r}")
