"""The Flower runtime gives the in-process simulator's numbers (issue 5)."""

from __future__ import annotations

import json
import math

import pytest

from sfedlora.config import ConfigError, to_yaml
from sfedlora.simulation import Simulation

pytest.importorskip("flwr")

COMPARED = ("train_loss", "grad_norm_A", "grad_norm_B", "personalized_accuracy",
            "personalized_loss", "global_accuracy", "global_loss", "adapter_output_norm")


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sfed", "fedit"])
def test_flower_simulation_equals_in_process(method, tiny_config, tmp_path, monkeypatch):
    from sfedlora.flower.simulation import run_simulation

    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    cfg = tiny_config(f"method={method}", "clients.num=3", "rounds=2", "eval.every=1",
                      "checkpoint.every=0", f"output_dir={tmp_path / 'local'}")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    Simulation(cfg).run()
    run_simulation(str(config_file), [f"output_dir={tmp_path / 'flower'}"], workers=2)

    local, flower = _lines(tmp_path / "local"), _lines(tmp_path / "flower")
    assert [m["round"] for m in flower] == [m["round"] for m in local] == [1, 2]
    for a, b in zip(local, flower, strict=True):
        for key in COMPARED:
            if a[key] is None:
                assert b[key] is None, key
            else:
                assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-5), (key, a, b)
        assert a["bytes_up_per_client"] == b["bytes_up_per_client"]
        assert a["bytes_down_per_client"] == b["bytes_down_per_client"]
        assert a["clients"] == b["clients"] and "dropped" not in b
    # the exported adapters come from the nodes and match the local ones
    assert sorted(p.name for p in (tmp_path / "flower" / "adapters").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "adapters").iterdir())


def test_client_state_round_trips_through_bytes():
    import torch

    from sfedlora.checkpoint import decode_client_state, encode_client_state
    from sfedlora.worker import ClientState

    state = ClientState(private={"b": torch.randn(3, 2)}, residual={"a": torch.ones(2)},
                        optimizer={"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1})
    back = decode_client_state(encode_client_state(state))
    assert torch.equal(back.private["b"], state.private["b"])
    assert torch.equal(back.residual["a"], state.residual["a"])
    assert back.optimizer["lr"] == 0.1 and back.optimizer["state"][0]["step"].item() == 3.0
    assert back.personal is None
    assert decode_client_state(b"") == ClientState()


def test_flower_refuses_what_it_cannot_run_yet(tiny_config):
    from sfedlora.flower.server_app import refuse_unsupported

    with pytest.raises(ConfigError, match="flora"):
        refuse_unsupported(tiny_config("method=flora"))


def _failing_client_app(run_config: dict, fail_client: int, fail_round: int):
    """The real ClientApp, except that one client's node fails one round."""
    from flwr.clientapp import ClientApp

    from sfedlora.flower import client_app

    app = ClientApp()

    @app.train()
    def train(msg, context):
        if (int(context.node_config["partition-id"]) == fail_client
                and int(msg.content["request"]["round"]) == fail_round):
            raise RuntimeError("node lost")
        return client_app.train(msg, context, run_config)

    app.evaluate()(lambda msg, context: client_app.evaluate(msg, context, run_config))
    app.query()(lambda msg, context: client_app.query(msg, context, run_config))
    return app


def test_a_failed_client_is_dropped_and_the_round_goes_on(tiny_config, tmp_path, monkeypatch):
    import sys

    from flwr.simulation import run_simulation
    from ray import cloudpickle  # the pickler Ray ships functions to its workers with

    from sfedlora.flower import server_app
    from sfedlora.flower.config import as_run_config
    from sfedlora.flower.simulation import QUIET_ENV

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this file
    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config("method=sfed", "clients.num=3", "clients.min_clients=2", "rounds=3",
                      "eval.every=1", f"output_dir={tmp_path / 'run'}")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    run_config = as_run_config(str(tmp_path / "config.yaml"), [])
    run_simulation(server_app.make_app(run_config),
                   _failing_client_app(run_config, fail_client=1, fail_round=2),
                   num_supernodes=3, backend_config={
                       "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
    lines = _lines(tmp_path / "run")
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert [m.get("dropped") for m in lines] == [None, [1], None]
    assert lines[1]["clients"] == [0, 2] and lines[1]["aggregated"] is True
    assert set(lines[1]["bytes_up_per_client"]) == {"0", "2"}
    assert lines[2]["clients"] == [0, 1, 2]  # the client is back the next round
    assert (tmp_path / "run" / "summary.json").is_file()
