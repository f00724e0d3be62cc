"""HetLoRA (Cho et al., EMNLP 2024 / arXiv 2401.06432): heterogeneous ranks.

The server keeps rank r_max (``lora.rank``); client k of rank r_k
(``lora.client_ranks``) receives the leading r_k components (``A[:r_k]``,
``B[:, :r_k]``), trains them, and sends them back; the server zero-pads each upload to
r_max and combines with weights proportional to the client's ``||B_k A_k||_F`` (over
all adapted layers), so clients whose adapters carry more signal count more. The head is
combined with the same weights. The paper's rank self-pruning is not implemented.

Deviations, stated where users read them: every client trains at the scale of r_max
(so a truncated adapter is exactly the leading components of the full one), and the
head is weighted by ``||B_k A_k||`` like the factors.
"""

from sfedlora.methods.base import Method, Traits


class HetLoRA(Method):
    """mixed ranks: truncated download, zero-padded upload, weights ~ ||B_k A_k||_F"""

    # ||B_k A_k||: each client computes its own (sfedlora.aggregation.weighting)
    traits = Traits(weighting="product_norm", mixed_ranks=True)
