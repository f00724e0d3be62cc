"""Layer 6, methods: the registry of federated LoRA methods (see
:mod:`sfedlora.methods.base`), one module or folder per method.

May import: every layer below (``core`` to ``modeling``/``data``); never the tasks, the
config's resolution or the runtimes (methods reach the runtime through the
:class:`~sfedlora.methods.base.Worker` protocol).
"""

import importlib

from sfedlora.methods.base import Command, Method, Part, RoundPlan, Update, part_of
from sfedlora.methods.central import Central
from sfedlora.methods.fdlora import FDLoRA
from sfedlora.methods.fedex import FedEx
from sfedlora.methods.fedit import FedIT
from sfedlora.methods.fedsa import FedSA
from sfedlora.methods.fedsvd import FedSVD
from sfedlora.methods.ffa import FFA
from sfedlora.methods.flasc import FLASC
from sfedlora.methods.flexlora import FlexLoRA
from sfedlora.methods.flocora import FLoCoRA
from sfedlora.methods.flora import FLoRA
from sfedlora.methods.hetlora import HetLoRA
from sfedlora.methods.local import Local
from sfedlora.methods.rolora import RoLoRA
from sfedlora.methods.sfed import SFed
from sfedlora.methods.soft import Soft
from sfedlora.methods.soft.command import PLAN
from sfedlora.methods.soft.tsfa import Tsfa

# a method's name is its key here (or, for one defined elsewhere, its import path)
REGISTRY: dict[str, type[Method]] = {
    "fedit": FedIT, "ffa": FFA, "fedsa": FedSA, "rolora": RoLoRA, "sfed": SFed,
    "flasc": FLASC, "flocora": FLoCoRA, "hetlora": HetLoRA, "fdlora": FDLoRA,
    "flora": FLoRA, "fedex": FedEx, "flexlora": FlexLoRA, "fedsvd": FedSVD, "soft": Soft,
    "tsfa": Tsfa, "local": Local, "central": Central,
}
# the ``sfedlora`` subcommands that ship with a method
COMMANDS: tuple[Command, ...] = (PLAN,)


def method_class(name: str) -> type[Method]:
    """A registered method, or one named by its import path ``package.module:Class``:
    a method defined outside sfedlora, which every process that reads the config
    imports (so it runs on Flower nodes too, wherever that module is installed)."""
    if name in REGISTRY:
        return REGISTRY[name]
    module, colon, attr = name.partition(":")
    if not colon:
        raise ValueError(f"method={name!r} is not a method; choose one of {sorted(REGISTRY)} "
                         "or give the import path of your own, package.module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"method={name!r}: cannot import {attr} from {module} ({exc}); "
                         "install the module where every process can import it") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method={name!r} is not a subclass of sfedlora.methods.Method")
    return cls


def get_method(name: str, options: dict | None = None) -> Method:
    """Method ``name`` (see :func:`method_class`) with its ``options`` (the experiment
    config's ``options`` block), validated by the method's own ``Options`` model."""
    cls = method_class(name)
    return cls(cls.Options.model_validate(options or {}), name)


__all__ = ["COMMANDS", "REGISTRY", "Command", "Method", "Part", "RoundPlan", "Update",
           "get_method", "method_class", "part_of"]
