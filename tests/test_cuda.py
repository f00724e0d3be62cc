"""Runs on a CUDA device (skipped where there is none, as on CI): every method with
unusual client-side mechanics trains, evaluates and checkpoints with the model on the
GPU while client state stays on the CPU.

These arms once failed only on a GPU (a codec or the fusion search met a CUDA and a CPU
tensor), which no CPU test could see.
"""

import pytest
import torch

from sfedlora.methods import REGISTRY
from sfedlora.simulation import Simulation

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
             "tsfa.latency_budget_s=100"],
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
