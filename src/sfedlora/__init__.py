"""sfedlora: federated LoRA fine-tuning with SFed-LoRA and the methods it is compared against.

``sfedlora.run(config, *overrides)`` runs one experiment and ``sfedlora.sweep(config,
grid)`` a grid of them (:mod:`sfedlora.api`); they are
imported on first use, so ``import sfedlora`` stays light (no torch).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("run", "Result", "sweep", "SweepResult"):
        from sfedlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'sfedlora' has no attribute {name!r}")
