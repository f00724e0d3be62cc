"""Client-level differential privacy: DP-FedAvg with Poisson sampling and a fixed
denominator (McMahan et al., ICLR 2018), accounted by Google's ``dp-accounting``.

One design, held together by three parts that must match:

* **Sampling** (:mod:`sfedlora.privacy.sampling`): each client takes part in a round
  independently with probability q = ``clients.per_round / clients.num``, drawn from OS
  entropy. The draws are secret (never logged in the run directory), because
  amplification by subsampling holds only while nobody outside knows who took part.
* **Release** (:meth:`GaussianMechanism.release`): each participant's change is clipped
  to L2 norm C; the server adds the clipped changes, adds Gaussian noise of standard
  deviation ``noise_multiplier * C`` to the sum, and divides by the *expected* cohort
  size q*N, never by the number that replied. With a fixed denominator one client's
  presence moves the sum by at most C, whatever the others do, so the release is the
  sampled Gaussian mechanism. A round in which nobody took part still releases noise.
* **Accounting** (:class:`Accountant`): the Poisson-subsampled Gaussian mechanism, one
  self-composition per round, under add/remove-one-client neighbours; epsilon from the
  PLD accountant (the tighter, reported as ``dp_epsilon``) and from RDP
  (``dp_epsilon_rdp``, the figure Opacus would give).

The unit of privacy is a client: all of its data, in every round. What is protected and
from whom is in docs/reliability.md (threat-model table).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from sfedlora.aggregation.combiners import clip_update
from sfedlora.privacy.sampling import secure_uniforms
from sfedlora.settings import PrivacyConfig

Tensors = dict[str, torch.Tensor]

# PLD grid spacing, relative to the RDP epsilon (at least 10). The PLD accountant is
# pessimistic at any spacing (it rounds privacy losses up), so a coarser grid only
# loosens the bound, while a fixed fine grid takes minutes where the noise is small
# (epsilon in the thousands). At sigma 1, q 0.1, 100 rounds, delta 1e-5 the spacing is
# 1e-3 and epsilon 7.04663 (7.04660 at 1e-4) in 0.06 s.
PLD_RELATIVE_SPACING = 1e-4


def secure_gaussian(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` from the operating system's CSPRNG.

    The noise must not be reproducible from anything in the config: a seeded generator
    lets anyone who knows the seed subtract the noise again. ``os.urandom`` gives 53-bit
    uniforms, Box-Muller (in float64) turns them into normals, and each value is the mean
    of two such normals times sqrt(2), as Opacus' ``secure_mode`` does against the
    floating-point attack on Gaussian samplers (Mironov, 2012); the uniforms are
    :func:`sfedlora.privacy.sampling.secure_uniforms`, the draws client sampling uses too.
    Written here because the library routes (Opacus' secure mode, torchcsprng) need a
    package that no longer installs with current torch.
    """
    count = math.prod(shape)  # two uniforms -> two normals -> one value
    u1 = 1.0 - secure_uniforms(count)  # (0, 1]: log(u1) is finite
    u2 = secure_uniforms(count)
    radius = np.sqrt(-2.0 * np.log(u1))
    first, second = radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)
    normal = (first + second) / math.sqrt(2.0)
    return torch.from_numpy(normal * std).reshape(shape)


class Accountant:
    """Privacy spent by ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism
    (add/remove-one-client neighbours), from ``dp-accounting``."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float):
        self.noise_multiplier, self.sample_rate, self.delta = (noise_multiplier,
                                                               sample_rate, delta)

    def _event(self, rounds: int):
        import dp_accounting as dpa  # imported only when DP is on

        one = dpa.PoissonSampledDpEvent(self.sample_rate,
                                        dpa.GaussianDpEvent(self.noise_multiplier))
        return dpa.SelfComposedDpEvent(one, rounds)

    def spent(self, rounds: int) -> tuple[float, float]:
        """(PLD epsilon, RDP epsilon) after ``rounds`` rounds; RDP computed once."""
        rdp = self.epsilon_rdp(rounds)
        return self.epsilon_pld(rounds, rdp), rdp

    def epsilon_pld(self, rounds: int, rdp: float | None = None) -> float:
        """``rdp``: the RDP epsilon of the same rounds, if known (it sets the grid)."""
        from dp_accounting.pld import pld_privacy_accountant

        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        rdp = self.epsilon_rdp(rounds) if rdp is None else rdp
        spacing = PLD_RELATIVE_SPACING * max(10.0, rdp)
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=spacing)
        return float(acc.compose(self._event(rounds)).get_epsilon(self.delta))

    def epsilon_rdp(self, rounds: int) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant

        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        # fractional orders near 1 that fail to converge are dropped with a warning each
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            acc = rdp_privacy_accountant.RdpAccountant()
            return float(acc.compose(self._event(rounds)).get_epsilon(self.delta))
        finally:
            absl.setLevel(level)


class GaussianMechanism:
    """The DP stage of the server's step (see the module docstring)."""

    def __init__(self, cfg: PrivacyConfig, sample_rate: float, expected_clients: float):
        """``sample_rate``: q; ``expected_clients``: q*N, the release's denominator."""
        self.cfg, self.sample_rate = cfg, sample_rate
        self.expected_clients = expected_clients
        self.accountant = Accountant(cfg.noise_multiplier, sample_rate, cfg.delta)

    @property
    def sum_std(self) -> float:
        """Standard deviation of the noise on the sum of clipped changes: sigma * C."""
        return self.cfg.noise_multiplier * self.cfg.clip_norm

    def release(self, base: Tensors, change_sum: Tensors) -> Tensors:
        """``base + (change_sum + N(0, (sigma C)^2)) / (q N)`` per tensor: the noised
        fixed-denominator mean of the clipped changes, on the state every client started
        from. The noise comes from OS entropy (:func:`secure_gaussian`), never from the
        config seed, so a DP run is not reproducible from its config: it continues from
        its checkpoint, which holds the noised state it released."""
        out = {}
        for name in sorted(change_sum):
            total = change_sum[name].double()
            noise = secure_gaussian(tuple(total.shape), self.sum_std)
            out[name] = (base[name].double() + (total + noise) / self.expected_clients
                         ).to(base[name].dtype)
        return out

    def clipped_sum(self, changes: list[tuple[Tensors, Tensors]], names: list[str],
                    shapes: dict[str, tuple[int, ...]]) -> Tensors:
        """The sum, in float64, of each client's change clipped to C: ``changes`` holds
        ``(update, start)`` pairs in client-id order, every change measured against
        what its client started from, never against zero."""
        total = {n: torch.zeros(shapes[n], dtype=torch.float64) for n in names}
        for tensors, start in changes:
            clipped = clip_update(tensors, start, self.cfg.clip_norm)
            for n in names:
                total[n] += clipped[n].double() - start[n].double()
        return total

    def spent(self, rounds: int) -> tuple[float, float]:
        """Privacy spent after ``rounds`` rounds for the configured delta: (PLD, RDP)."""
        return self.accountant.spent(rounds)
