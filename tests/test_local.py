"""method=local, the no-federation reference (issue 20, part 1): nothing crosses the
wire, and each client's adapter is exactly what training it alone gives."""

from __future__ import annotations

import pytest
import torch

from sfedlora.config import ConfigError
from sfedlora.core.records import ClientState
from sfedlora.runtime.simulation import Simulation


def test_local_sends_nothing_and_equals_isolated_training(tiny_config):
    sim = Simulation(tiny_config("method=local", "clients.num=3", "rounds=3",
                                 "local.lr=0.01"))
    records = [sim.run_round(r).metrics for r in (1, 2, 3)]
    assert all(m["bytes_up"] == 0 and m["bytes_down"] == 0 for m in records)
    assert sim.server.state == {} and records[-1]["norm_A_mean"] is None
    exp = sim.pool.exp
    worker = exp.worker
    for cid in range(3):
        alone = ClientState()  # the same client, its own data, nobody else, same seed
        for r in (1, 2, 3):
            worker.fit(cid, alone, b"", exp.client_train[cid], r)
        ours = sim.client_adapter(cid)
        theirs = worker.inits.assemble(cid, alone, {})
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    others = [sim.client_adapter(c) for c in range(3)]
    name = next(n for n in others[0] if ".lora_A." in n)
    assert not torch.equal(others[0][name], others[1][name])  # each its own A draw


@pytest.mark.parametrize("override", ["privacy.enabled=true", "server.optimizer=adamw"])
def test_local_refuses_server_side_settings(override, tiny_config):
    with pytest.raises(ConfigError, match="method=local does not work"):
        tiny_config("method=local", "lora.a_init=shared", override)
