"""Runs on a CUDA device (skipped where there is none, as on CI): every method with
unusual client-side mechanics trains, evaluates and checkpoints with the model on the
GPU while client state stays on the CPU.

These arms once failed only on a GPU (a codec or the fusion search met a CUDA and a CPU
tensor), which no CPU test could see.
"""

import pytest
import torch

from sfedlora.methods import REGISTRY
from sfedlora.runtime.simulation import Simulation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# A method plus what it needs (mixed ranks, compressed messages, optimizer state).
ARMS = {name: [] for name in REGISTRY}
ARMS.update({
    "flasc": ["comm.down.density=0.25", "comm.up.density=0.25"],
    "flocora": [],
    "fedsa": ["local.keep_optimizer_state=true"],
    "fedit": ["local.keep_optimizer_state=true"],
    "hetlora": ["lora.client_ranks=[2,4]"],
    "flora": ["lora.client_ranks=[2,4]"],
    "flexlora": ["lora.client_ranks=[2,4]"],
    "tsfa": ["network.model=wireless", "network.allocation=min_max",
             "options.latency_budget_s=100"],
})


@pytest.mark.parametrize("method", sorted(ARMS))
def test_method_runs_on_cuda_with_client_state_on_cpu(tiny_config, method):
    cfg = tiny_config(f"method={method}", *ARMS[method], "model.device=cuda", "rounds=2",
                      "checkpoint.every=1")
    sim = Simulation(cfg)
    summary = sim.run()
    assert summary["round"] == 2
    states = sim.pool.states
    for cid in states:
        state = states[cid]
        for tensors in (state.private, state.method, state.residual):
            assert all(t.device.type == "cpu" for t in (tensors or {}).values())
        for moments in (state.optimizer or {}).get("state", {}).values():
            assert all(t.device.type == "cpu" for t in moments.values()
                       if isinstance(t, torch.Tensor))


# Issue 18's mechanics that the per-method arms above leave at their defaults: SOFT's SVD
# importance and error feedback (scored on the client's CPU copy of a CUDA-trained
# upload), and TSFA's schedule over a wireless network with feedback.
WIRELESS = ["network.model=wireless", "network.bandwidth_hz=1e6"]
VARIANTS = {
    "soft-svd": ["method=soft", "options.importance=svd", *WIRELESS],
    "soft-feedback": ["method=soft", "comm.up.error_feedback=true", *WIRELESS],
    "tsfa-feedback": ["method=tsfa", "comm.up.error_feedback=true", *WIRELESS,
                      "network.allocation=min_max", "options.latency_budget_s=100"],
    "flasc-wireless": ["method=flasc", "comm.up.density=0.25", "comm.down.density=0.25",
                       *WIRELESS],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_wireless_variants_run_on_cuda(tiny_config, variant):
    sim = Simulation(tiny_config(*VARIANTS[variant], "model.device=cuda", "rounds=2"))
    for r in (1, 2):
        metrics = sim.run_round(r).metrics
        sent = metrics["bytes_up_per_client"]
        for cid, seconds in metrics["upload_seconds_per_client"].items():
            # the network charges the bytes that went up, as serialised
            bits = seconds * metrics["rate_bps_per_client"][cid]
            assert bits == pytest.approx(8 * sent[cid], rel=1e-9)


def test_delta_downloads_stay_bit_exact_with_the_model_on_cuda(tiny_config):
    """What each client holds equals what the server published, bit for bit, after
    rounds of partial participation with top-k 8-bit delta downloads."""
    sim = Simulation(tiny_config("method=fedit", "rounds=6", "clients.per_round=2",
                                 "comm.down.delta=true", "comm.down.density=0.1",
                                 "comm.down.bits=8", "model.device=cuda"))
    for r in range(1, 7):
        before = {n: t.cpu().clone() for n, t in sim.server.downlink.published.items()}
        metrics = sim.run_round(r).metrics
        for cid in metrics["clients"]:
            held = sim.pool.states[cid].held
            assert held["version"] == r - 1
            assert held["tensors"].keys() == before.keys()
            for name, tensor in before.items():
                assert torch.equal(held["tensors"][name].cpu(), tensor), name
