"""FLASC (Kuo et al., arXiv 2406.05233): sparse communication in both directions.

The server keeps a dense LoRA (and head). Clients receive it masked to its top-k
entries at density d_dl (the rest start at 0), train densely, and send the top-k of
their change at density d_ul. The server uses the mean change, taken relative to the
masked download, as the gradient of an AdamW step (FedAdam, weight decay 0.01). There
is no error feedback. Evaluation uses the masked model.

Densities are the codec settings ``comm.down.density`` / ``comm.up.density`` (both
1/4 by default); the server step is ``server.lr`` / ``server.weight_decay``.

Deviations from the official code: clients use the configured local optimizer (AdamW
by default; the paper's code uses SGD with momentum 0.9, ``local.optimizer=sgd
local.momentum=0.9``), and top-k keeps ``ceil(d * n)`` entries (official: floor).
"""

from sfedlora.methods.base import Traits
from sfedlora.methods.fedit import FedIT


class FLASC(FedIT):
    """sparse up/down messages, mean change as the gradient of a server AdamW"""

    traits = Traits(weighting="uniform",
                    comm={"down": {"density": 0.25}, "up": {"density": 0.25, "delta": True}},
                    server_optimizer="adamw", a_init_modes=("shared",),
                    a_init_note="the server keeps one dense A from one shared init")
