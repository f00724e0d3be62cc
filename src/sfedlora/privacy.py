"""Client-level differential privacy in the DP-FedAvg style (McMahan et al., 2018).

Each client's update (its change to the shared state) is clipped to L2 norm C, the
clipped updates are averaged with equal weights, and Gaussian noise of standard
deviation ``noise_multiplier * C`` is added to their sum (so ``sigma * C / m`` to the
mean of m updates). Privacy spent is accounted with Opacus' RDP accountant for the
subsampled Gaussian mechanism, one step per round at sampling rate
``clients per round / clients``.

What is protected: whether any one client took part, as seen by anyone who observes the
shared state the server releases (every later download, the exported global adapter).
What is not: the raw updates reach the server before noise is added, so the server is
trusted (no secure aggregation here); and the accountant assumes Poisson sampling of
clients while the runtimes draw a fixed number per round, the usual approximation. The
noise comes from OS entropy, not from the config seed (which is public): a DP run is
reproducible only through its checkpoint. Under
FedSA-LoRA and SFed-LoRA the private B and head never leave the client at all, so they
need no noise; under FedIT, FFA-LoRA and RoLoRA the head is shared and is clipped and
noised with the rest.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from sfedlora.config import PrivacyConfig


def secure_gaussian(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` from the operating system's CSPRNG.

    The noise must not be reproducible from anything in the config: a seeded generator
    lets anyone who knows the seed subtract the noise again. ``os.urandom`` gives 53-bit
    uniforms, Box-Muller (in float64) turns them into normals, and each value is the mean
    of two such normals times sqrt(2), as Opacus' ``secure_mode`` does against the
    floating-point attack on Gaussian samplers (Mironov, 2012). Written here because
    the library routes (Opacus' secure mode, torchcsprng) need a package that no longer
    installs with current torch.
    """
    count = math.prod(shape)
    pairs = count  # two normals per pair, two normals per value
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    first, second = radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)
    normal = (first + second) / math.sqrt(2.0)
    return torch.from_numpy(normal * std).reshape(shape)


class GaussianMechanism:
    def __init__(self, cfg: PrivacyConfig, sample_rate: float):
        self.cfg, self.sample_rate = cfg, sample_rate

    def noise(self, mean: dict[str, torch.Tensor], num_updates: int
              ) -> dict[str, torch.Tensor]:
        """The mean of ``num_updates`` clipped updates with the mechanism's noise added.
        The noise comes from OS entropy (:func:`secure_gaussian`), never from the config
        seed, so a DP run is not reproducible from its config: it continues from its
        checkpoint, which holds the noised state it released."""
        std = self.cfg.noise_multiplier * self.cfg.clip_norm / num_updates
        return {n: t + secure_gaussian(tuple(t.shape), std).to(t.dtype)
                for n, t in sorted(mean.items())}

    def epsilon(self, rounds: int) -> float:
        """Privacy spent after ``rounds`` rounds, for the configured delta."""
        from opacus.accountants import RDPAccountant  # imported only when DP is on

        if rounds <= 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.cfg.noise_multiplier, self.sample_rate, rounds)]
        return float(accountant.get_epsilon(delta=self.cfg.delta))
