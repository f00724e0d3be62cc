"""FedIT: FedAvg on LoRA. Both factors and the head train, go up, and are averaged
with weights proportional to each client's number of training examples.

Note mean(B_i) mean(A_i) != mean(B_i A_i): this aggregation noise is what later
methods remove.
"""

from sfedlora.methods.base import Method, Traits


class FedIT(Method):
    """FedAvg of A, B and head (weighted by data size)"""

    traits = Traits(a_init_modes=("shared", "independent"),
                    a_init_note="A is averaged, so clients may start from one A or their own",
                    vera=True)
