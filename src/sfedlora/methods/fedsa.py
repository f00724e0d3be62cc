"""FedSA-LoRA (Guo et al., ICLR 2025): A learns general knowledge and is averaged;
B and the classifier head are client-specific and stay on each client across rounds
(the paper's per-client B, not the "relay" of the authors' public code, where one
model object passes B from client to client). The server averages A uniformly; the
official code weights by the samples each client processed, which is the same when
every client runs the same fixed ``local.steps`` at one batch size (the default) and
differs under ``local.epochs``.
"""

from sfedlora.methods.base import Method, Part, Roles, Traits


class FedSA(Method):
    """A averaged (uniform); B and head private per client"""

    roles = Roles(shared=frozenset({Part.A}), private=frozenset({Part.B, Part.HEAD}))
    traits = Traits(weighting="uniform", a_init_modes=("shared", "independent"),
                    a_init_note="A is averaged, so clients may start from one A or their own",
                    vera=True)  # FedSA-VeRA
