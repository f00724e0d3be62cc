"""FLoCoRA (Ribeiro et al., arXiv 2406.14082): FedIT with quantised uploads.

Every multi-dimensional tensor a client sends is quantised per output channel to 8
bits (affine: float scale and zero point per channel); 1-D tensors stay float32. As in
the reference code the uploaded values themselves are quantised (``delta: false``).
Quantisation is a codec, so any method can use it (``comm.up.bits``); this preset is
the paper's setting, with ``comm.up.bits=4`` or ``2`` for its lower-bit variants.
"""

from dataclasses import replace

from sfedlora.methods.fedit import FedIT


class FLoCoRA(FedIT):
    """FedIT with 8-bit affine per-channel quantised uploads"""

    traits = replace(FedIT.traits, vera=False, comm={"up": {"bits": 8, "delta": False}})
