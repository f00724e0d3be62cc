"""SFed-LoRA (Huang, Wu, He, Lao, arXiv 2603.08058): FedSA-LoRA with the scale
gamma = alpha * sqrt(N / r), N the clients aggregated per round.

Default ``a_init: independent``: each client draws its own A before the first
average. That is the case the sqrt(N) factor is derived for: the mean of N
independent A's has sqrt(N) times smaller norm, which the factor restores. With
``a_init: shared`` the first average does not shrink A, and the same gamma is a
sqrt(N)-larger step; both are offered so studies can tell the two apart.
"""

from dataclasses import replace

from sfedlora.methods.fedsa import FedSA


class SFed(FedSA):
    """FedSA-LoRA with gamma = alpha*sqrt(N/r)"""

    traits = replace(FedSA.traits, scaling="sfed", a_init_modes=("independent", "shared"),
                     vera=False)  # VeRA has no LoRA scale to set
