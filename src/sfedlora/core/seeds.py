"""Every seeded draw in one place: a tag per kind of draw, and how seeds are derived.

A draw is a pure function of (config seed, tag, round, client...), so any process of any
runtime draws the same values, and a resumed run draws what the uninterrupted run
would have. The tag values are part of the results' definition: changing one changes
every number it feeds. DP noise and DP client sampling are deliberately absent: they
come from the OS's secure source (:func:`sfedlora.privacy.dp.secure_gaussian`,
:class:`sfedlora.privacy.sampling.SecretPoissonSampler`), never from a seed.
"""

from __future__ import annotations

import numpy as np

# data (numpy generators seeded with [seed, tag, ...])
GLOBAL_TEST = 3  # the global test split and example caps
CLIENT_TEST = 17  # each client's test part
PARTITION_SHUFFLE = 19  # fixed-size clients: the order examples are dealt in
DIRICHLET_MIX = 23  # a client's Dirichlet label mix (fixed-size clients)
VALIDATION = 29  # each client's validation part
# adapters and training (derive_seed)
A_INIT = 101  # A draws: shared (seed, A_INIT), own (.., 1, client), fresh (.., 2, round, client)
TRAIN = 202  # dropout during a client's local steps
BATCHES = 203  # batch order of a client's local steps
HOLDOUT = 204  # the examples a method keeps out of training (FDLoRA's fusion search)
# runtime
SAMPLE = 303  # which clients take part in a round
EVAL_CLIENTS = 304  # the fixed subset of clients scored with eval.clients=K
CENTRAL_SUBSET = 305  # central under local.epochs: the part of the pool a round trains on
# network model (sfedlora.comm.network)
PLACEMENT = 401  # a client's distance from the base station and compute speed
FADING = 402  # a client's Rayleigh fading in a round


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, tag, client, round...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)
