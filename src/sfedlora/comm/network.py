"""A simulated wireless network that prices each round in seconds and joules.

After Kim and Choi (arXiv 2505.00333, "Two-Stage Wireless Federated LoRA Fine-Tuning
with Sparsified Orthogonal Updates"); only the abstract is available, so the details
below are a reconstruction, each piece a function that an exact version can replace:

* **Uplink, FDMA.** A round's clients share ``network.bandwidth_hz``; client k gets
  b_k and transmits at the Shannon rate R_k = b_k log2(1 + p h_k / (b_k N0)), with
  transmit power p (``tx_power_dbm``), noise density N0 (``noise_dbm_per_hz``) and
  channel gain h_k = 10^(-PL(d_k)/10) |g|^2: the 3GPP urban macro path loss
  PL = 128.1 + 37.6 log10(d_km) dB, and Rayleigh fading |g|^2 ~ Exp(1) redrawn every
  round. Distances are drawn once, uniformly over a disc of ``cell_radius_m``, at least
  10 m from its centre (the path-loss model does not hold closer).
* **Allocation.** ``equal``: b_k = B / m. ``min_max``: the split that equalises the
  clients' finish times (download + compute + upload), which minimises the round's
  latency; found by bisection on the finish time, each client's bandwidth for a given
  upload time by bisection on the rate (increasing in b).
* **Downlink.** A broadcast at ``downlink_bps``; each client's download time is its
  own payload's bits over that rate.
* **Compute.** 4 P T FLOPs for T token positions through a frozen base of P
  parameters (2 P T forward, 2 P T for the activation gradients of the backward pass;
  the frozen weights get no gradients, the adapter's cost is left out), over the
  client's speed, drawn once uniformly from ``client_tflops``.
* **Energy.** Transmit energy only: p times the upload time.

Every draw is seeded by (seed, client) or (seed, round, client), so any runtime and a
resumed run price rounds identically. Byte counts are the real serialised payloads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sfedlora.core import seeds
from sfedlora.core.records import Metric
from sfedlora.settings import NetworkConfig

MIN_DISTANCE_M = 10.0
FLOPS_PER_TOKEN_PARAM = 4  # forward 2 + activation gradients 2 (frozen base)


def dbm_to_watts(dbm: float) -> float:
    return 10 ** ((dbm - 30) / 10)


def path_loss_db(distance_m: float) -> float:
    """3GPP urban macro path loss (TR 36.814), distance in metres."""
    return 128.1 + 37.6 * math.log10(distance_m / 1000)


def rate_bps(bandwidth_hz: float, power_w: float, gain: float, noise_w_per_hz: float
             ) -> float:
    """Shannon rate of ``bandwidth_hz`` at received SNR ``p h / (b N0)`` (0 for no band)."""
    if bandwidth_hz <= 0:
        return 0.0
    return bandwidth_hz * math.log2(1 + power_w * gain / (bandwidth_hz * noise_w_per_hz))


def bandwidth_for_rate(need_bps: float, limit_hz: float, power_w: float, gain: float,
                       noise_w_per_hz: float, iterations: int = 200) -> float | None:
    """The least bandwidth (at most ``limit_hz``) whose rate reaches ``need_bps``; None
    when even ``limit_hz`` falls short (the rate saturates at p h / (N0 ln 2))."""
    if need_bps <= 0:
        return 0.0
    if rate_bps(limit_hz, power_w, gain, noise_w_per_hz) < need_bps:
        return None
    return smallest_passing(
        0.0, limit_hz, lambda b: rate_bps(b, power_w, gain, noise_w_per_hz) >= need_bps,
        iterations)


def smallest_passing(lo: float, hi: float, passes: Callable[[float], bool],
                     iterations: int) -> float:
    """Bisection for the smallest value in ``(lo, hi]`` that ``passes`` (monotone:
    ``hi`` passes, and everything above a passing value passes); stops early at a
    floating-point fixed point, where every further step would repeat the last."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if passes(mid):
            if hi == mid:
                break
            hi = mid
        else:
            if lo == mid:
                break
            lo = mid
    return hi


def min_max_split(bits: list[float], fixed_s: list[float], total_hz: float, power_w: float,
                  gains: list[float], noise_w_per_hz: float, iterations: int = 200
                  ) -> list[float]:
    """Bandwidths summing to at most ``total_hz`` that minimise the largest finish time
    ``fixed_s[k] + bits[k] / R_k(b_k)``: the smallest T for which every client's least
    bandwidth to finish by T fits in the band, by bisection on T."""

    def needed(t: float) -> list[float] | None:
        out = []
        for b, f, g in zip(bits, fixed_s, gains, strict=True):
            if b == 0:
                out.append(0.0)
                continue
            if t <= f:
                return None
            need = bandwidth_for_rate(b / (t - f), total_hz, power_w, g, noise_w_per_hz)
            if need is None:
                return None
            out.append(need)
        return out if sum(out) <= total_hz else None

    equal = total_hz / len(bits)
    hi = max(f + (b / rate_bps(equal, power_w, g, noise_w_per_hz) if b else 0.0)
             for b, f, g in zip(bits, fixed_s, gains, strict=True))  # feasible
    hi = smallest_passing(max(fixed_s), hi, lambda t: needed(t) is not None, iterations)
    split = needed(hi)
    if split is None:  # hi is still the equal split's latency, which rounding put a
        # hair past what the equal split itself achieves (one client: f + b / R(B) - f
        # need not give back b / R(B)): the equal split is then the answer
        return [equal if b else 0.0 for b in bits]
    return split


@dataclass(frozen=True)
class Placement:
    distance_m: float
    tflops: float


class WirelessNetwork:
    """Prices rounds for one experiment (see the module docstring)."""

    def __init__(self, cfg: NetworkConfig, seed: int, num_clients: int, base_params: int):
        self.cfg, self.seed, self.base_params = cfg, seed, base_params
        self.power_w = dbm_to_watts(cfg.tx_power_dbm)
        self.noise_w_per_hz = dbm_to_watts(cfg.noise_dbm_per_hz)
        self.placements = [self.place(cid) for cid in range(num_clients)]
        self.simulated_seconds = 0.0

    def place(self, cid: int) -> Placement:
        rng = np.random.default_rng([self.seed, seeds.PLACEMENT, cid])
        r_min, r_max = MIN_DISTANCE_M, self.cfg.cell_radius_m
        # uniform over the annulus' area: the radius' square is uniform
        distance = math.sqrt(rng.uniform(r_min**2, r_max**2))
        lo, hi = self.cfg.client_tflops
        return Placement(distance, float(rng.uniform(lo, hi)))

    def gain(self, cid: int, round_idx: int) -> float:
        fading = np.random.default_rng([self.seed, seeds.FADING, round_idx, cid]).exponential()
        return 10 ** (-path_loss_db(self.placements[cid].distance_m) / 10) * float(fading)

    def latency(self, round_idx: int, up_bytes: Mapping[int, float],
                down_bytes: Mapping[int, float], tokens: Mapping[int, float]) -> float:
        """The round's latency if these clients sent and received these payloads (a
        prediction: nothing is recorded). The channels of a round are known before it
        (seeded), so a scheduler such as TSFA can plan with them."""
        if not up_bytes:
            return 0.0
        return self._assess(round_idx, up_bytes, down_bytes, tokens)[Metric.LATENCY_SECONDS]

    def solo_latency(self, cid: int, round_idx: int, up_bytes: float, down_bytes: float,
                     tokens: float) -> float:
        """Client ``cid``'s finish time alone on the whole band (the least any split can
        give it)."""
        rate = rate_bps(self.cfg.bandwidth_hz, self.power_w, self.gain(cid, round_idx),
                        self.noise_w_per_hz)
        compute = (FLOPS_PER_TOKEN_PARAM * self.base_params * tokens
                   / (self.placements[cid].tflops * 1e12))
        return 8 * down_bytes / self.cfg.downlink_bps + compute + 8 * up_bytes / rate

    def price(self, round_idx: int, up_bytes: Mapping[int, int], down_bytes: Mapping[int, int],
              tokens: Mapping[int, int]) -> dict[str, Any]:
        """The round's network metrics for the clients that replied (``up_bytes``)."""
        if not up_bytes:
            return {Metric.LATENCY_SECONDS: 0.0, Metric.SIMULATED_SECONDS: self.simulated_seconds}
        metrics = self._assess(round_idx, up_bytes, down_bytes, tokens)
        self.simulated_seconds += metrics[Metric.LATENCY_SECONDS]
        return metrics | {Metric.SIMULATED_SECONDS: float(self.simulated_seconds)}

    def _assess(self, round_idx: int, up_bytes: Mapping[int, float],
                down_bytes: Mapping[int, float], tokens: Mapping[int, float]) -> dict[str, Any]:
        clients = sorted(up_bytes)
        gains = [self.gain(c, round_idx) for c in clients]
        down_s = [8 * down_bytes[c] / self.cfg.downlink_bps for c in clients]
        compute_s = [FLOPS_PER_TOKEN_PARAM * self.base_params * tokens.get(c, 0)
                     / (self.placements[c].tflops * 1e12) for c in clients]
        bits = [8.0 * up_bytes[c] for c in clients]
        total = self.cfg.bandwidth_hz
        if self.cfg.allocation == "min_max":
            band = min_max_split(bits, [d + c for d, c in zip(down_s, compute_s, strict=True)],
                                 total, self.power_w, gains, self.noise_w_per_hz)
        else:
            band = [total / len(clients)] * len(clients)
        rates = [rate_bps(b, self.power_w, g, self.noise_w_per_hz)
                 for b, g in zip(band, gains, strict=True)]
        up_s = [bit / r if bit else 0.0 for bit, r in zip(bits, rates, strict=True)]
        latency = max(d + c + u for d, c, u in zip(down_s, compute_s, up_s, strict=True))

        def per_client(values) -> dict[str, float]:
            return {str(c): float(v) for c, v in zip(clients, values, strict=True)}

        return {
            Metric.BANDWIDTH_HZ_PER_CLIENT: per_client(band),
            Metric.RATE_BPS_PER_CLIENT: per_client(rates),
            Metric.UPLOAD_SECONDS_PER_CLIENT: per_client(up_s),
            Metric.COMPUTE_SECONDS_PER_CLIENT: per_client(compute_s),
            Metric.DOWNLOAD_SECONDS_PER_CLIENT: per_client(down_s),
            Metric.ENERGY_JOULES_PER_CLIENT: per_client([self.power_w * u for u in up_s]),
            Metric.LATENCY_SECONDS: float(latency),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"simulated_seconds": self.simulated_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.simulated_seconds = float(state.get("simulated_seconds", 0.0))


def build_network(cfg: NetworkConfig, seed: int, num_clients: int, base_params: int
                  ) -> WirelessNetwork | None:
    """The configured network model; None for ``model: none`` (bytes only)."""
    if cfg.model == "none":
        return None
    return WirelessNetwork(cfg, seed, num_clients, base_params)
