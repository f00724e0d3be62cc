"""Client states on disk (issue 19): every kind of state round-trips bit for bit, a run
gives the same metrics with either store, and reads are "as of" a round."""

from __future__ import annotations

import json

import pytest
import torch

from sfedlora.config import ConfigError
from sfedlora.core.records import ClientState
from sfedlora.runtime.client_states import DiskStates, MemoryStates
from sfedlora.runtime.simulation import Simulation


def _full_state(seed: int) -> ClientState:
    """Every kind a client keeps: private tensors, optimizer state (tensors and
    numbers, integer keys), error-feedback residuals, method-owned tensors."""
    g = torch.Generator().manual_seed(seed)
    return ClientState(
        private={"m.lora_B.default.weight": torch.randn(8, 4, generator=g),
                 "m.classifier.weight": torch.randn(3, 8, generator=g, dtype=torch.float64)},
        optimizer={"state": {0: {"step": torch.tensor(3.0),
                                 "exp_avg": torch.randn(8, 4, generator=g)}},
                   "param_groups": [{"lr": 0.01, "params": [0], "base_lr": 0.01}]},
        residual={"m.lora_A.default.weight": torch.randn(4, 8, generator=g)},
        method={"personal.m.lora_A.default.weight": torch.randn(4, 8, generator=g)},
    )


def _same(a: ClientState, b: ClientState) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k])
                                                                        for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(map(eq, x, y))
        return x == y
    return all(eq(getattr(a, f), getattr(b, f))
               for f in ("private", "optimizer", "residual", "method"))


def test_every_kind_of_state_round_trips_bit_for_bit_through_the_cache_and_disk(tmp_path):
    states = DiskStates(5, tmp_path / "clients", cache_size=2)
    written = {cid: _full_state(cid) for cid in range(5)}
    for cid, state in written.items():
        states.after(cid, 1, state)
    assert len(states._cache) == 2  # only the most recent stay in memory
    fresh = DiskStates(5, tmp_path / "clients")
    fresh.load_state_dict({"disk": "clients", "round": 1})
    for cid in range(5):
        assert _same(states[cid], written[cid]) and _same(fresh[cid], written[cid])
    assert _same(fresh.before(3, 1), ClientState())  # round 1 trains from nothing


def test_reads_are_as_of_the_checkpointed_round(tmp_path):
    states = DiskStates(2, tmp_path / "clients")
    states.after(0, 1, _full_state(1))
    states.checkpointed(1)
    states.after(0, 2, _full_state(2))  # trained after the checkpoint, then killed
    resumed = DiskStates(2, tmp_path / "clients")
    resumed.load_state_dict(states.state_dict() | {"round": 1})
    assert _same(resumed[0], _full_state(1)) and _same(resumed.before(0, 2), _full_state(1))
    resumed.after(0, 2, _full_state(2))  # the resumed run trains round 2 again
    resumed.checkpointed(2)
    resumed.after(0, 3, _full_state(3))
    files = sorted(p.name for p in (tmp_path / "clients/client-0").iterdir())
    assert files == ["round-2.safetensors", "round-3.safetensors"]  # round 1 not needed


def test_a_run_on_disk_states_equals_the_same_run_in_memory(tiny_config, tmp_path):
    from sfedlora.runtime.client_states import client_states

    base = ("method=fdlora", "local.keep_optimizer_state=true", "comm.up.density=0.5",
            "comm.up.error_feedback=true", "clients.per_round=2", "rounds=3")
    # auto picks the disk above the threshold (4 clients > 3)
    auto = tiny_config(*base, "clients.state_store=auto", "clients.state_store_threshold=3",
                       f"output_dir={tmp_path / 'auto'}")
    assert isinstance(client_states(auto), DiskStates)
    Simulation(tiny_config(*base, "clients.state_store=memory",
                           f"output_dir={tmp_path / 'mem'}")).run()
    sim = Simulation(tiny_config(*base, "clients.state_store=disk",
                                 f"output_dir={tmp_path / 'disk'}"))
    sim.run()
    assert isinstance(sim.pool.states, DiskStates)
    mem = (tmp_path / "mem/metrics.jsonl").read_text()
    assert mem == (tmp_path / "disk/metrics.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "disk/clients").iterdir()) == [
        f"client-{c}" for c in range(4)]
    summary = json.loads((tmp_path / "disk/summary.json").read_text())
    assert summary["round"] == 3


def test_a_small_population_stays_in_memory_and_an_unwritable_place_is_refused_first(
        tiny_config, tmp_path):
    assert isinstance(Simulation(tiny_config()).pool.states, MemoryStates)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where a directory would have to be (root or not)
    with pytest.raises(ConfigError, match="is not a writable directory"):
        Simulation(tiny_config("clients.state_store=disk", f"output_dir={blocker / 'run'}"))


def test_a_resume_removes_states_written_after_its_checkpoint(tmp_path):
    """Client 0 trained rounds 2 and 3 after the checkpoint of round 1, then the run was
    killed. In the resumed timeline client 0 does not train round 2 (say it dropped), so
    round 3 would read round 2's stale state as its own; the resume removes it."""
    states = DiskStates(2, tmp_path / "clients")
    states.after(0, 1, _full_state(1))
    states.checkpointed(1)
    states.after(0, 2, _full_state(2))
    states.after(0, 3, _full_state(3))
    resumed = DiskStates(2, tmp_path / "clients")
    resumed.load_state_dict({"disk": "clients", "round": 1})
    files = sorted(p.name for p in (tmp_path / "clients/client-0").iterdir())
    assert files == ["round-1.safetensors"]
    assert _same(resumed.before(0, 3), _full_state(1))


def test_a_flower_node_drops_the_states_of_a_timeline_it_no_longer_serves(tmp_path):
    from sfedlora.runtime.flower.node_state import NodeState

    node = NodeState(tmp_path, cid=0)
    node.enter_timeline("first", 0)
    for r in (1, 2, 3):
        node.save(r, _full_state(r), checkpointed=1 if r > 1 else 0)
    node.enter_timeline("first", 0)  # the same server process: nothing is touched
    assert sorted(node.states.rounds()) == [1, 2, 3]
    NodeState(tmp_path, cid=0).enter_timeline("second", 1)  # resumed from round 1
    assert sorted(node.states.rounds()) == [1]
    assert _same(node.load(at_most=2), _full_state(1))


def test_client_states_reach_the_disk_before_and_after_their_rename(tmp_path, monkeypatch):
    """The file is fsynced before it replaces the old one, and its directory after
    (so the rename itself survives a power cut), as checkpoints are."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    DiskStates(1, tmp_path / "clients").after(0, 4, _full_state(4))
    assert events == [("fsync", ".round-4.safetensors.tmp"),
                      ("replace", "round-4.safetensors"), ("fsync", "client-0")]
