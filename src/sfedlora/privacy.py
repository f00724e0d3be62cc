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
clients while the runtimes draw a fixed number per round, the usual approximation. Under
FedSA-LoRA and SFed-LoRA the private B and head never leave the client at all, so they
need no noise; under FedIT, FFA-LoRA and RoLoRA the head is shared and is clipped and
noised with the rest.
"""

from __future__ import annotations

import torch

from sfedlora.config import PrivacyConfig


class GaussianMechanism:
    def __init__(self, cfg: PrivacyConfig, sample_rate: float, seed: int):
        self.cfg, self.sample_rate, self.seed = cfg, sample_rate, seed

    def noise(self, mean: dict[str, torch.Tensor], num_updates: int,
              round_idx: int) -> dict[str, torch.Tensor]:
        """The mean of ``num_updates`` clipped updates with the mechanism's noise added;
        the noise is drawn from (seed, round), so a resumed run draws the same."""
        from sfedlora.adapters import derive_seed

        gen = torch.Generator().manual_seed(derive_seed(self.seed, 404, round_idx))
        std = self.cfg.noise_multiplier * self.cfg.clip_norm / num_updates
        return {n: t + std * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                for n, t in sorted(mean.items())}

    def epsilon(self, rounds: int) -> float:
        """Privacy spent after ``rounds`` rounds, for the configured delta."""
        from opacus.accountants import RDPAccountant  # imported only when DP is on

        if rounds <= 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.cfg.noise_multiplier, self.sample_rate, rounds)]
        return float(accountant.get_epsilon(delta=self.cfg.delta))
