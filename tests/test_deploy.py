"""Flower's deployment engine on loopback: TLS, node authentication, every process
stopped, a node killed mid-round (issue 5)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import server_inbox

from sfedlora.config import to_yaml
from sfedlora.runtime.simulation import Simulation

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow  # each starts a deployment: processes, TLS, heartbeats

COMPARED = ("train_loss", "personalized_accuracy", "personalized_loss", "global_accuracy",
            "adapter_output_norm")


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(expected: list[dict], got: list[dict]) -> None:
    """Every round's ``COMPARED`` metrics equal to 1e-5 (absent where not evaluated)."""
    for a, b in zip(expected, got, strict=True):
        assert a.get("dropped") == b.get("dropped")
        for key in COMPARED:
            if a.get(key) is None:
                assert b.get(key) is None, (a["round"], key)
            else:
                assert math.isclose(a[key], b[key], abs_tol=1e-5), (a["round"], key)


@pytest.fixture
def started(monkeypatch) -> list:
    """The deployments started during the test (this module's tests run beside each
    other, so "no process left" is checked per deployment)."""
    from sfedlora.runtime.flower import deploy

    made, original = [], deploy.LocalDeployment.__post_init__

    def record(self):
        original(self)
        made.append(self)

    monkeypatch.setattr(deploy.LocalDeployment, "__post_init__", record)
    return made


def _deployment_id(cli_pid: int, timeout: float = 120) -> str:
    """The marker of the deployment that the ``sfedlora deploy-local`` process
    ``cli_pid`` started (its children carry it in their environment)."""
    import contextlib

    import psutil

    from sfedlora.runtime.flower.deploy import MARKER

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(cli_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if marker := child.environ().get(MARKER):
                    return marker
        time.sleep(0.2)
    raise AssertionError(f"deploy-local ({cli_pid}) started no process in {timeout}s")


@pytest.fixture
def config_file(tiny_config, tmp_path):
    def make(*overrides):
        cfg = tiny_config("method=sfed", "clients.num=2", "rounds=2", "eval.every=2",
                          "checkpoint.every=0", *overrides)
        path = tmp_path / "config.yaml"
        path.write_text(to_yaml(cfg))
        return cfg, path
    return make


def test_tls_is_required_and_an_unregistered_node_is_refused(tmp_path):
    import httpx

    from sfedlora.runtime.flower.credentials import make_node_key
    from sfedlora.runtime.flower.deploy import LocalDeployment, marked_processes

    with LocalDeployment(tmp_path / "work") as deployment:
        deployment.start_superlink()
        with pytest.raises(httpx.HTTPError):  # no plain-text endpoint
            httpx.get(f"http://{deployment.address}/health", timeout=5)
        key = make_node_key(deployment.workdir / "keys", "registered")
        node_id = deployment.register(key)
        deployment.start_node(0, key)
        intruder = deployment.start_node(
            1, make_node_key(deployment.workdir / "keys", "intruder"), max_retries=1)
        assert intruder.popen.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in intruder.log.read_text()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = deployment.supernodes()
            if [n["status"] for n in nodes] == ["online"]:
                break
            time.sleep(1)
        assert [(int(n["node-id"]), n["status"]) for n in nodes] == [(node_id, "online")]
        deployment_id = deployment.id
    assert marked_processes(deployment_id) == []


def _kill_when_training(node, round_idx: int, stop: threading.Event) -> None:
    """Kill ``node`` once its ``round_idx``-th training message has arrived."""
    while not stop.is_set():
        if node.log.read_text(errors="replace").count("Receiving: train message") >= round_idx:
            node.kill()
            return
        time.sleep(0.2)


def test_a_node_killed_mid_round_is_dropped_and_the_run_finishes(config_file, tmp_path):
    """The nodes run Flower's SuperExec, whose per-message ClientApp processes hand the
    messages to the node's long-lived worker (``serving="worker"``; the other tests
    run the default, the node runtime)."""
    from sfedlora.runtime.flower.config import as_run_config
    from sfedlora.runtime.flower.credentials import make_node_key
    from sfedlora.runtime.flower.deploy import LocalDeployment, marked_processes

    run_dir = tmp_path / "run"
    # The SuperLink reports the dead node after two missed 30 s heartbeats, well within
    # the round timeout: this is the "Node Unavailable" path, not the timeout path.
    _, path = config_file("rounds=1", "clients.min_clients=1", "flower.round_timeout=120",
                          f"output_dir={run_dir}")
    stop = threading.Event()
    with LocalDeployment(tmp_path / "work") as deployment:
        deployment.start_superlink()
        for cid in range(2):
            key = make_node_key(deployment.workdir / "keys", f"node-{cid}")
            deployment.register(key)
            deployment.start_node(cid, key, serving="worker")
        killer = threading.Thread(target=_kill_when_training,
                                  args=(deployment.nodes[1], 1, stop), daemon=True)
        killer.start()
        try:
            status = deployment.wait(deployment.submit(as_run_config(str(path), [])), 400)
        finally:
            stop.set()
        assert not deployment.nodes[1].alive() and deployment.nodes[0].alive()
        deployment_id = deployment.id
    assert marked_processes(deployment_id) == []

    assert status == "finished:completed"
    (last,) = _lines(run_dir)
    assert last["round"] == 1 and last["dropped"] == [1] and last["clients"] == [0]
    assert last["aggregated"] is True and last["unscored"] == [1]
    assert 0.0 <= last["personalized_accuracy"] <= 1.0
    assert [p.name for p in (run_dir / "adapters").iterdir()] == ["client_0"]


@pytest.mark.parametrize(("args", "message"), [
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--nodes", "2", "method=fedavg"], "method='fedavg'"),
    (["--nodes", "2", "--resume", "no/such/run"], "no checkpoint at"),
    (["--nodes", "2", "lora.rank=0"], "lora.rank"),
    (["--nodes", "2", "--compute-slots", "-3"], "--compute-slots) must be at least 1"),
])
def test_deploy_local_refuses_bad_input_before_starting_anything(args, message, capsys,
                                                                started):
    from sfedlora.cli import main

    assert main(["deploy-local", *args]) == 2
    assert message in capsys.readouterr().err
    assert started == []


def test_an_unknown_serving_mode_is_refused_before_anything_starts(started):
    from sfedlora.config import ConfigError
    from sfedlora.runtime.flower.deploy import deploy_local

    with pytest.raises(ConfigError, match=r"serving \(--serving\) must be one of "
                                          r"\['per-message', 'runtime', 'worker'\]"):
        deploy_local(None, [], 2, serving="fast")
    assert started == []


def test_sigterm_mid_run_stops_every_process(config_file, tmp_path):
    """What a scheduler (SLURM, Kubernetes) sends; Ctrl-C takes the same path."""
    import signal
    import subprocess
    import sys

    from sfedlora.runtime.flower.deploy import marked_processes

    _, path = config_file(f"output_dir={tmp_path / 'run'}")
    cli = subprocess.Popen([sys.executable, "-m", "sfedlora.cli", "deploy-local", str(path),
                            "--nodes", "2"], stderr=subprocess.PIPE, text=True)
    deployment = _deployment_id(cli.pid)
    deadline = time.monotonic() + 120
    while len(marked_processes(deployment)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)  # the SuperLink and 2 nodes
    assert len(marked_processes(deployment)) >= 3
    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 130 and "every process the deployment started is stopped" in err
    assert marked_processes(deployment) == []
    assert (tmp_path / "run" / "deploy" / "superlink.log").is_file()


def _by_name(values, names, spec) -> dict:
    """A flat upload vector back to its tensors (numpy), by name."""
    import math

    out, offset = {}, 0
    for n in names:
        size = math.prod(spec[n].shape)
        out[n] = values[offset:offset + size].reshape(spec[n].shape)
        offset += size
    return out


def test_deploy_local_runs_securely_matches_plain_sums_and_leaves_no_process(
        config_file, tmp_path, monkeypatch, started):
    """A TLS deployment of SFed-LoRA with node authentication, 3 nodes, one round (the
    Flower simulation's secagg case runs two), secure aggregation: no message the
    ServerApp received holds a private part or a client's training numbers, the run equals the
    in-process one (the same client code; a secure aggregate does not depend on the
    secret masks), each round's aggregate is the plain
    weighted mean of the same uploads within the quantisation bound, nothing the server
    wrote (its logs, the run directory) holds an individual update, and every process
    the deployment started is gone. The nodes take turns at computing
    (``compute_slots=1``), which changes no result."""
    import numpy as np
    from safetensors.torch import load_file

    from sfedlora.core.checkpoint import load_checkpoint
    from sfedlora.privacy.secagg import client as secure_client
    from sfedlora.runtime.flower.deploy import deploy_local, marked_processes

    cfg, path = config_file("method=sfed", "clients.num=3", "privacy.secure_aggregation=true",
                            "rounds=1", "eval.every=1", "checkpoint.every=1")
    inbox_log = tmp_path / "inbox.jsonl"  # the ServerApp runs in a process of its own
    run_dir = deploy_local(str(path), [f"output_dir={tmp_path / 'deployed'}",
                                       f"flower.inbox_log={inbox_log}"], nodes=3, timeout=600,
                           state_dir=tmp_path / "state", compute_slots=1)
    # no message the ServerApp received holds B, the head or a client's training numbers
    server_inbox.assert_nothing_private(server_inbox.logged(inbox_log), cfg)
    (deployment,) = started  # SuperLink, SuperNodes, their children and workers are gone
    assert marked_processes(deployment.id) == []
    assert run_dir == tmp_path / "deployed"
    logs = sorted(p.name for p in (run_dir / "deploy").iterdir())
    assert logs == ["serverapp.log", "superlink.log", *(f"supernode-{c}{kind}.log" for c in range(3)
                                       for kind in ("", ".runtime"))]
    assert json.loads((run_dir / "summary.json").read_text())["round"] == 1
    # the clients' adapters hold their B and head: saved on their nodes, never sent
    # (SFed-LoRA has no global adapter: its B is per client)
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == [
        "client_0", "client_1", "client_2"]
    for cid in range(3):
        assert [p.name for p in (run_dir / f"adapters/client_{cid}").iterdir()] == [
            "on_node.json"]

    seen: dict[tuple[int, int], tuple] = {}  # (round, client) -> (values, weight)
    original = secure_client.upload_vector

    def spy(worker, cid, round_idx, *args):
        seen[(round_idx, cid)] = out = original(worker, cid, round_idx, *args)
        return out

    monkeypatch.setattr(secure_client, "upload_vector", spy)
    sim = Simulation(cfg.model_copy(update={"output_dir": str(tmp_path / "local")}))
    sim.run()
    local, deployed = _lines(tmp_path / "local"), _lines(run_dir)
    assert [m["round"] for m in deployed] == [1] and all(m["aggregated"] for m in deployed)
    for a, b in zip(local, deployed, strict=True):
        for key in (*COMPARED, "norm_A_mean"):
            if key == "train_loss":  # a masked reply carries no loss: absent in both
                assert a[key] is None and b[key] is None
                continue
            assert math.isclose(a[key], b[key], abs_tol=1e-5), key
        assert a["bytes_up_per_client"] == b["bytes_up_per_client"]  # protocol included

    spec = sim.server.spec
    names = sorted(sim.server.names_for(sim.method.plan(1).upload))
    bound = sim.uploads.error_bound(3)
    for r in (1,):
        uploads = [seen[(r, c)] for c in range(3)]
        plain = _by_name(sum(w * v for v, w in uploads) / sum(w for _, w in uploads),
                         names, spec)
        a_plain = np.concatenate([plain[n].reshape(-1) for n in names if ".lora_A." in n])
        slack = bound * np.sqrt(a_plain.size) + 1e-5  # per coordinate, over every A
        assert abs(deployed[r - 1]["norm_A_mean"] - np.linalg.norm(a_plain)) <= slack
    final = load_checkpoint(run_dir / "checkpoint.safetensors").server["state"]
    for n in names:  # the deployed state after the round, every uploaded tensor
        assert np.abs(final[n].double().numpy() - plain[n]).max() <= bound + 1e-5, n

    clients = [_by_name(v, names, spec) for v, _ in seen.values()]
    for file in sorted(run_dir.rglob("*")):
        if not file.is_file() or file.name.startswith("supernode-"):
            continue  # the nodes' own logs are the clients' side
        data = file.read_bytes()
        for upload in clients:
            for t in upload.values():
                assert t.reshape(-1)[:8].astype(np.float32).tobytes() not in data, file
        if file.suffix == ".safetensors":
            for t in load_file(file).values():
                for upload in clients:
                    assert not any(u.shape == tuple(t.shape) and np.allclose(
                        t.double().numpy(), u, rtol=0, atol=1e-7) for u in upload.values()), file


class _DropsOne:
    """An in-process pool in which client ``cid`` drops out of round ``round_idx``: the
    in-process run of what a deployment does when that client's message fails."""

    def __init__(self, pool, cid: int, round_idx: int):
        self.pool, self.dropped = pool, (round_idx, cid)

    def fit(self, round_idx, downloads, then=None):
        kept = {c: d for c, d in downloads.items() if (round_idx, c) != self.dropped}
        return self.pool.fit(round_idx, kept, then)

    def __getattr__(self, name):
        return getattr(self.pool, name)


def _kill_serving(status_file, train: int, stop, killed: list) -> None:
    """SIGKILL the node runtime's serving process whose status is ``status_file`` while
    it serves its ``train``-th training message (it has answered ``train - 1``)."""
    import os
    import signal

    while not stop.is_set():
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):  # not started yet
            status = {"serving": None}
        if status["serving"] == "train" and status["served"].get("train", 0) == train - 1:
            os.kill(status["pid"], signal.SIGKILL)
            killed.append(status["pid"])
            return
        time.sleep(0.01)


def test_a_runtime_killed_mid_round_drops_its_client_for_that_round_and_loses_no_state(
        config_file, tmp_path):
    """Node 1's serving process is killed while it trains round 2: its supervisor
    answers that message with an error at once (no wait for Flower's task heartbeat to
    lapse), client 1 counts as dropped in round 2, and the new serving process answers
    the next message (the evaluation), scoring client 1 with the state it kept after
    round 1: the run equals the in-process run in which client 1 drops out of round 2."""
    from sfedlora.runtime.experiment import build_experiment
    from sfedlora.runtime.flower.config import as_run_config
    from sfedlora.runtime.flower.credentials import make_node_key
    from sfedlora.runtime.flower.deploy import LocalDeployment
    from sfedlora.runtime.pool import InProcessPool

    inbox_log = tmp_path / "inbox.jsonl"  # every reply the ServerApp received
    cfg, path = config_file("clients.min_clients=1", "local.steps=20",
                            f"output_dir={tmp_path / 'run'}", f"flower.inbox_log={inbox_log}")
    stop, killed = threading.Event(), []
    with LocalDeployment(tmp_path / "work", state_dir=tmp_path / "state") as deployment:
        deployment.start_superlink()
        for cid in range(2):
            key = make_node_key(deployment.workdir / "keys", f"node-{cid}")
            deployment.register(key, cid)
            deployment.start_node(cid, key)
        killer = threading.Thread(target=_kill_serving, daemon=True,
                                  args=(deployment.runtime_status(1), 2, stop, killed))
        killer.start()
        try:
            status = deployment.wait(deployment.submit(as_run_config(str(path), [])), 400)
        finally:
            stop.set()
        deployment.copy_logs(tmp_path / "logs", None)
    assert status == "finished:completed" and len(killed) == 1
    runtime_log = (tmp_path / "logs" / "supernode-1.runtime.log").read_text()
    assert runtime_log.count(" serves the SuperNode at ") == 2  # the killed one, its successor
    assert "answering its task with an error" in runtime_log
    # the supervisor's answer, not the one Flower gives when the task's heartbeat lapses
    received = [json.loads(x) for x in inbox_log.read_text().splitlines()]
    errors = [m["error"] for m in received if "error" in m]
    assert errors == ["the node's runtime process died (-9) while serving this message"]

    deployed = _lines(tmp_path / "run")
    assert [m.get("dropped") for m in deployed] == [None, [1]]
    assert [m["clients"] for m in deployed] == [[0, 1], [0]]
    assert deployed[1].get("unscored", []) == []  # the new serving process scored client 1
    local_cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "local")})
    Simulation(local_cfg, _DropsOne(InProcessPool(build_experiment(local_cfg)), 1, 2)).run()
    _assert_same_metrics(_lines(tmp_path / "local"), deployed)


def test_deploy_local_killed_outright_and_resumed_equals_the_uninterrupted_run(
        config_file, tmp_path):
    """Every process of a deploy-local run SIGKILLed after round 1 (the machine lost
    power), then ``deploy-local --resume``: the metrics of every round and each client's
    exported adapter (B and head included, kept on its node) equal the in-process run's."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from sfedlora.runtime.flower.deploy import deploy_local, marked_processes

    run_dir, state = tmp_path / "run", tmp_path / "state"
    cfg, path = config_file("checkpoint.every=1", f"output_dir={run_dir}")
    cli = subprocess.Popen([sys.executable, "-m", "sfedlora.cli", "deploy-local", str(path),
                            "--nodes", "2", "--state-dir", str(state)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deployment = _deployment_id(cli.pid)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and cli.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(_lines(run_dir)) >= 1:
            break
        time.sleep(0.2)
    assert cli.poll() is None, "the run ended before it could be killed"
    procs = marked_processes(deployment)  # the nodes' workers included
    workdir = next(Path(arg).parent for p in procs for arg in p.cmdline()
                   if arg.endswith("superlink.db"))
    cli.kill()
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
    cli.wait()
    shutil.rmtree(workdir)  # what deploy-local would have removed on a clean exit

    deploy_local(None, [], 2, resume=str(run_dir), state_dir=state, timeout=400)
    Simulation(cfg.model_copy(update={"output_dir": str(tmp_path / "local")})).run()
    local, deployed = _lines(tmp_path / "local"), _lines(run_dir)
    assert [m["round"] for m in deployed] == [1, 2]
    _assert_same_metrics(local, deployed)
    for cid in range(2):
        on_node = json.loads((run_dir / f"adapters/client_{cid}/on_node.json").read_text())
        ours = load_file(tmp_path / f"local/adapters/client_{cid}/adapter_model.safetensors")
        theirs = load_file(Path(on_node["path"]) / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert (tensor - theirs[name]).abs().max() <= 1e-5, (cid, name)


def test_wait_asks_the_superlink_less_and_less_often_then_when_the_server_app_ends(
        monkeypatch):
    """Each status query is a ``flwr`` process (a second of CPU), so ``wait`` spaces them
    out until the run's ServerApp process is up, then asks when it ends (a zombie
    counts), and otherwise only every ``longest_poll`` seconds."""
    import itertools
    import types

    from sfedlora.runtime.flower import deploy

    clock, asked = [0.0], []
    monkeypatch.setattr(deploy, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    server_app = object()  # up from 4 s after the submission, ends at 301 s
    monkeypatch.setattr(deploy, "_ended", lambda proc: proc is server_app and clock[0] >= 301)
    deployment = object.__new__(deploy.LocalDeployment)
    deployment.processes = [types.SimpleNamespace(alive=lambda: True)]
    monkeypatch.setattr(deployment, "_server_app",
                        lambda: server_app if clock[0] >= 4 else None, raising=False)

    def status(run_id):
        asked.append(clock[0])
        return "finished:completed" if clock[0] >= 301 else "running"

    monkeypatch.setattr(deployment, "status", status, raising=False)
    assert deployment.wait(7) == "finished:completed"
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    # 2 s, then 1.5x as long, until the ServerApp is found (at 5 s); then every 60 s,
    # and at once when it ends, not at the next of those
    assert asked == [0.0, 2.0, 5.0, 65.0, 125.0, 185.0, 245.0, 301.0], asked
    assert gaps[2:-1] == [60.0] * 4
