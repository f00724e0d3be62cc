"""The Flower runtime gives the in-process simulator's numbers for every method and
task, and a killed Flower run resumes (issues 5 and 17)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import pytest
import server_inbox
import torch

from sfedlora.config import to_yaml
from sfedlora.runtime.simulation import Simulation

pytest.importorskip("flwr")

def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(local: list[dict], flower: list[dict]) -> None:
    """Every metric of every round: numbers to 1e-5, byte counts and the rest exactly."""
    assert [m["round"] for m in flower] == [m["round"] for m in local]
    for a, b in zip(local, flower, strict=True):
        assert set(a) == set(b), set(a) ^ set(b)
        for key, value in a.items():
            if isinstance(value, float):
                # perplexity = exp(loss): 1e-5 on the loss is 1e-5 relative on it
                rel = 1e-5 if "perplexity" in key else 0
                assert math.isclose(value, b[key], rel_tol=rel, abs_tol=1e-5), (key, a, b)
            else:
                assert value == b[key], key
        assert "dropped" not in b and "unscored" not in b


CASES = {  # name: (config factory fixture, overrides)
    # FedIT's and SFed-LoRA's paths are covered by fedex and central (FedIT's averages)
    # and by secagg (sfed, private B and head, securely aggregated A)
    # mixed ranks and partial participation: nodes that missed rounds catch up on merges
    "flora": ("tiny_config", ["method=flora", "lora.client_ranks=[1,2,4]",
                              "clients.per_round=2", "rounds=3"]),
    # one round: the nodes' perplexity, generation and samples; state kept across
    # rounds on the nodes is every other case's
    "causal-lm": ("tiny_lm_config", ["method=fedsa", "eval.generate=2", "rounds=1"]),
    # issue 20: residual merges with catch-up, SVD re-factorisations, the pooled trainer
    "fedex": ("tiny_config", ["method=fedex", "clients.per_round=2", "rounds=3"]),
    "flexlora": ("tiny_config", ["method=flexlora", "lora.client_ranks=[1,2,4]", "rounds=2"]),
    # fedsvd: test_a_two_node_ray_cluster_gives_the_in_process_result
    "central": ("tiny_config", ["method=central", "clients.per_round=2", "rounds=2"]),
    # issue 18: delta-coded downloads; each node keeps the version it holds, and
    # SFed-LoRA's first A is coded against the mean of the clients' draws
    "delta-down": ("tiny_config", ["method=sfed", "comm.down.delta=true",
                                   "comm.down.density=0.1", "comm.down.bits=8",
                                   "clients.per_round=2", "rounds=3"]),
    # issue 21: the four exchanges of secure aggregation over the Message API
    "secagg": ("tiny_config", ["method=sfed", "privacy.secure_aggregation=true", "rounds=2"]),
    # issue 37: private parts (FDLoRA's personal copy, all of local's adapter) stay on
    # the nodes; every case checks what the server received
    "fdlora": ("tiny_config", ["method=fdlora", "rounds=2"]),
    "local": ("tiny_config", ["method=local", "rounds=2"]),
    # issue 18: TSFA's keep ratio travels with the download, the clients' importance
    # reports with their uploads, and error feedback's residuals stay on the nodes;
    # the narrow band makes the budget bind, so the keep ratio falls below 1
    "tsfa": ("tiny_config", ["method=tsfa", "network.model=wireless",
                             "network.allocation=min_max", "network.bandwidth_hz=2e3",
                             "options.latency_budget_s=3", "options.keep_choices=[0.25,0.5,1.0]",
                             "options.v=0.01", "comm.up.error_feedback=true", "rounds=3"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_flower_simulation_equals_in_process(case, request, tmp_path, monkeypatch):
    from sfedlora.runtime.flower.simulation import run_simulation

    fixture, overrides = CASES[case]
    make = request.getfixturevalue(fixture)
    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    cfg = make(*overrides, "clients.num=3", "eval.every=1",
               "checkpoint.every=0", f"output_dir={tmp_path / 'local'}")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    Simulation(cfg).run()
    inbox = server_inbox.intercept(monkeypatch)
    # one worker serves every node (its model catches up to whichever node a message
    # names); flora's case runs two, as a machine with two cores would
    run_simulation(str(config_file), [f"output_dir={tmp_path / 'flower'}",
                                      f"flower.inbox_log={tmp_path / 'inbox.jsonl'}"],
                   workers=2 if case == "flora" else 1)

    _assert_same_run(_lines(tmp_path / "local"), _lines(tmp_path / "flower"))
    # the exported adapters come from the nodes and equal the local ones
    _assert_same_adapters(tmp_path / "local", tmp_path / "flower")
    for folder in (tmp_path / "flower/adapters").glob("client_*"):  # kept on the node
        assert [p.name for p in folder.iterdir()] == ["on_node.json"]
    received = server_inbox.contents(inbox)
    assert server_inbox.logged(tmp_path / "inbox.jsonl") == received  # the log is complete
    server_inbox.assert_nothing_private(received, cfg)
    if case == "tsfa":  # the schedule sparsified, so residuals were kept and sent
        assert min(m["tsfa_keep"] for m in _lines(tmp_path / "flower")) < 1
    if case == "causal-lm":  # the nodes generated the same answers
        assert (sorted((tmp_path / "flower/samples").iterdir())[-1].read_text()
                == sorted((tmp_path / "local/samples").iterdir())[-1].read_text())


def _adapter_folder(run_dir, name: str) -> Path:
    """Where adapter ``name`` of a run is: in its run directory, or for a client's
    adapter of a Flower run, on its node (the run directory records only where)."""
    folder = run_dir / "adapters" / name
    if (folder / "on_node.json").is_file():
        assert [p.name for p in folder.iterdir()] == ["on_node.json"]
        return Path(json.loads((folder / "on_node.json").read_text())["path"])
    return folder


def _assert_same_adapters(a_dir, b_dir) -> None:
    """The in-process run's adapters (``a_dir``) against the Flower run's: the global one
    from its run directory, each client's from where its node saved it (the Flower run
    directory records only that place: a client's adapter holds its private parts)."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in (a_dir / "adapters").iterdir())
    assert names == sorted(p.name for p in (b_dir / "adapters").iterdir()) and names
    for name in names:
        a = load_file(_adapter_folder(a_dir, name) / "adapter_model.safetensors")
        b = load_file(_adapter_folder(b_dir, name) / "adapter_model.safetensors")
        assert set(a) == set(b)
        for key, t in a.items():
            assert torch.allclose(t, b[key], rtol=0, atol=1e-5), (name, key)


def _client_actor_niceness(pid: int) -> list[int]:
    """The niceness of each Ray worker below ``pid`` that hosts a Flower ClientApp."""
    import psutil

    niceness = []
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "ClientAppActor" in " ".join(proc.cmdline()):
                niceness.append(proc.nice())
    return niceness


def _kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (Ray's workers too)."""
    import os
    import signal

    import psutil

    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=30)


@pytest.mark.slow
def test_a_killed_flower_run_resumes_to_the_uninterrupted_result(tiny_config, tmp_path,
                                                                  monkeypatch):
    """SIGKILL of the whole process group after a checkpointed round, then
    ``sfedlora flower-sim --resume``: the same metrics and adapters as the run without
    interruption (in-process, which an uninterrupted Flower run equals:
    ``test_flower_simulation_equals_in_process``). Private state (sfed's B and head)
    lives on the nodes, and partial participation leaves clients whose newest state is
    rounds old."""
    import subprocess
    import sys
    import time

    from sfedlora.core.checkpoint import CheckpointError, load_checkpoint

    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    settings = ("method=sfed", "clients.num=3", "clients.per_round=2", "rounds=4",
                "eval.every=1", "checkpoint.every=1")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(tiny_config(*settings)))
    Simulation(tiny_config(*settings, f"output_dir={tmp_path / 'whole'}")).run()

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sfedlora", "flower-sim", str(config_file),
           f"output_dir={killed}", "--workers", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, saved = time.monotonic() + 600, 0
    try:
        while saved < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.suppress(CheckpointError):
                saved = load_checkpoint(killed / "checkpoint.safetensors").round
        niceness = _client_actor_niceness(proc.pid)
    finally:
        _kill_tree(proc.pid)
    assert 2 <= saved < 4 and not (killed / "summary.json").exists(), saved
    # the clients' Ray workers compete for the CPU at the priority of the run itself
    # (Ray's default, 15, left this test waiting minutes beside a busy test worker)
    assert niceness and set(niceness) == {0}, niceness

    resumed = subprocess.run([sys.executable, "-m", "sfedlora", "flower-sim", "--resume",
                              str(killed), "--workers", "2"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(_lines(tmp_path / "whole"), _lines(killed))
    _assert_same_adapters(tmp_path / "whole", killed)


def test_client_state_round_trips_through_bytes():
    import torch

    from sfedlora.core.checkpoint import decode_client_state, encode_client_state
    from sfedlora.core.records import ClientState

    state = ClientState(private={"b": torch.randn(3, 2)}, residual={"a": torch.ones(2)},
                        optimizer={"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1})
    back = decode_client_state(encode_client_state(state))
    assert torch.equal(back.private["b"], state.private["b"])
    assert torch.equal(back.residual["a"], state.residual["a"])
    assert back.optimizer["lr"] == 0.1 and back.optimizer["state"][0]["step"].item() == 3.0
    assert back.method is None
    assert decode_client_state(b"") == ClientState()


def _failing_client_app(run_config: dict, fail_client: int, fail_round: int):
    """The real ClientApp, except that one client's node fails one round."""
    from flwr.clientapp import ClientApp

    from sfedlora.runtime.flower import handlers

    app = ClientApp()

    @app.train()
    def train(msg, context):
        if (int(context.node_config["partition-id"]) == fail_client
                and int(msg.content["request"]["round"]) == fail_round):
            raise RuntimeError("node lost")
        return handlers.train(msg, context, run_config)

    app.evaluate()(lambda msg, context: handlers.evaluate(msg, context, run_config))
    app.query()(lambda msg, context: handlers.query(msg, context, run_config))
    return app


@pytest.mark.slow
def test_a_failed_client_is_dropped_and_the_round_goes_on(tiny_config, tmp_path, monkeypatch):
    import sys

    from flwr.simulation import run_simulation
    from ray import cloudpickle  # the pickler Ray ships functions to its workers with

    from sfedlora.runtime.flower import server_app
    from sfedlora.runtime.flower.config import as_run_config
    from sfedlora.runtime.flower.simulation import QUIET_ENV

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
                       "init_args": {"address": "local", "num_cpus": 2,
                                     "include_dashboard": False}})
    lines = _lines(tmp_path / "run")
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert [m.get("dropped") for m in lines] == [None, [1], None]
    assert lines[1]["clients"] == [0, 2] and lines[1]["aggregated"] is True
    assert set(lines[1]["bytes_up_per_client"]) == {"0", "2"}
    assert lines[2]["clients"] == [0, 1, 2]  # the client is back the next round
    assert (tmp_path / "run" / "summary.json").is_file()


class _Context:  # the one field of flwr's Context that routing reads
    def __init__(self, partition_id: int | None):
        self.node_config = {} if partition_id is None else {"partition-id": partition_id}


def test_a_simulated_node_serves_the_named_client_and_a_deployed_node_only_its_own():
    from sfedlora.config import ConfigError
    from sfedlora.runtime.flower.config import ANY_NODE_KEY
    from sfedlora.runtime.flower.handlers import message_client

    simulated, deployed = {ANY_NODE_KEY: True}, {}
    assert message_client(_Context(3), simulated, {"client": 7}) == 7
    assert message_client(_Context(None), simulated, {"client": 7}) == 7
    assert message_client(_Context(3), deployed, {"client": 3}) == 3
    assert message_client(_Context(3), deployed, {}) == 3  # a message that names none
    with pytest.raises(ConfigError, match="client 7 reached the node of partition-id=3"):
        message_client(_Context(3), deployed, {"client": 7})
    with pytest.raises(ConfigError, match="no partition-id in its node config"):
        message_client(_Context(None), deployed, {"client": 7})


def test_a_simulation_routes_messages_to_virtual_nodes_in_turn(tiny_config):
    from sfedlora.runtime.flower.pool import FlowerPool

    class Grid:  # asked only for its node ids: sending a message would fail here
        def get_node_ids(self):
            return [905, 17, 3, 600]

    pool = FlowerPool(tiny_config("clients.num=3"), Grid(), any_node=True)
    assert pool.free_nodes == [3, 17, 600]  # one per client, no node map asked for
    assert pool._trips([2, 0, 1]) == [{0: 3, 1: 17, 2: 600}]
    pool = FlowerPool(tiny_config("clients.num=3", "flower.virtual_nodes=2"), Grid(),
                      any_node=True)
    assert pool._trips([2, 0, 1]) == [{0: 3, 1: 17}, {2: 3}]  # a node serves one at a time
    pool.any_node, pool.nodes = False, {0: 7, 1: 7, 2: 8}  # a deployment: its own node
    assert pool._trips([2, 0, 1]) == [{0: 8, 1: 7}, {2: 7}]


def test_clients_parallel_under_flower_says_it_does_not_apply(tiny_config, caplog):
    from sfedlora.runtime.flower.pool import FlowerPool

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

    with caplog.at_level(logging.WARNING):
        FlowerPool(tiny_config("clients.num=3"), Grid(), any_node=True)
        assert "clients.parallel" not in caplog.text
        FlowerPool(tiny_config("clients.num=3", "clients.parallel=3"), Grid(), any_node=True)
    assert "clients.parallel=3 is for the in-process runtime" in caplog.text


def test_backend_config_reserves_what_flower_client_resources_says(tiny_config):
    from sfedlora.runtime.flower.simulation import backend_config

    local = backend_config(tiny_config("flower.client_resources.num_cpus=2"), workers=6)
    assert local["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert local["init_args"]["num_cpus"] == 6  # Ray on this machine, 6 CPUs: 3 workers
    assert local["init_args"]["address"] == "local"  # never a cluster left running here
    joined = backend_config(tiny_config("flower.ray_address=auto"))
    assert joined["init_args"]["address"] == "auto"
    assert "num_cpus" not in joined["init_args"]  # Ray refuses it when joining a cluster


@pytest.mark.parametrize(("overrides", "message"), [
    (("flower.client_resources.num_gpus=0.5",), "model.device=cpu keeps the model off"),
    (("flower.client_resources.num_gpus=1.5", "model.device=auto"), "a fraction of one GPU"),
    (("flower.client_resources.num_cpus=0",), "num_cpus"),
])
def test_bad_flower_resources_are_refused_naming_the_field(tiny_config, overrides, message):
    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_gpu_workers_without_a_gpu_and_workers_with_a_cluster_are_refused(tiny_config):
    from sfedlora.config import ConfigError
    from sfedlora.runtime.flower.simulation import backend_config

    if not torch.cuda.is_available():
        cfg = tiny_config("flower.client_resources.num_gpus=0.25", "model.device=auto")
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            backend_config(cfg)
    with pytest.raises(ConfigError, match="drop --workers"):
        backend_config(tiny_config("flower.ray_address=auto"), workers=4)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_processes(marks: tuple[str, ...]) -> list:
    """Processes started for this cluster: those naming its temp dir or port, and
    everything they started (Ray renames its workers, so names alone do not tell)."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if any(m in line for m in marks):
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    return list(found.values())


@pytest.fixture
def two_node_ray_cluster():
    """A head and a second node of one CPU each on this machine, as `ray start` makes
    them on two machines; every process they started is killed afterwards (never
    `ray stop`, which would stop any other Ray on the machine too)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import psutil

    ray = str(Path(sys.executable).parent / "ray")
    # a short path of its own: Ray's socket paths under it must fit in 107 bytes
    port, temp = _free_port(), Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # workers at the priority of the test (docs/guides/flower.md), not Ray's 15
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
    marks = (str(temp), f":{port}")
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=1",
                        "--include-dashboard=false", f"--temp-dir={temp}",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        procs = _ray_processes(marks)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    assert not _ray_processes(marks), "a Ray process of the test cluster survived"


@pytest.mark.slow
def test_a_two_node_ray_cluster_gives_the_in_process_result(tiny_config, two_node_ray_cluster,
                                                            tmp_path, monkeypatch):
    """flower.ray_address joins a running cluster: its two nodes (one worker each)
    train the clients, and every metric and adapter equals the in-process run's."""
    import ray

    from sfedlora.runtime.flower.simulation import run_simulation

    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    cfg = tiny_config("method=fedsvd", "rounds=2", "clients.num=3", "eval.every=1",
                      "checkpoint.every=0", f"output_dir={tmp_path / 'local'}")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    Simulation(cfg).run()
    run_simulation(str(config_file), [f"output_dir={tmp_path / 'flower'}",
                                      f"flower.ray_address={two_node_ray_cluster}"])
    assert not ray.is_initialized()  # the driver left the cluster at the end
    _assert_same_run(_lines(tmp_path / "local"), _lines(tmp_path / "flower"))
    _assert_same_adapters(tmp_path / "local", tmp_path / "flower")
