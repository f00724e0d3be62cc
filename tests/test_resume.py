"""A run killed at any round resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfedlora.cli import main
from sfedlora.config import ConfigError
from sfedlora.core.checkpoint import CheckpointError, load_checkpoint
from sfedlora.runtime.simulation import Simulation


def _args(tiny_model_dir, tiny_data_file, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name={tiny_model_dir}", "model.max_length=16", "data.source=files",
        f"data.train_path={tiny_data_file}", "data.dirichlet_alpha=1.0",
        "data.min_partition_size=5", "clients.num=4", "clients.per_round=3", "rounds=6",
        "local.steps=3", "local.batch_size=8", "local.lr=0.05", "lora.rank=4",
        "local.keep_optimizer_state=true", "method=sfed", "progress=false",
        "checkpoint.every=1", f"output_dir={out}", *extra,
    ]


def _default_sigint() -> None:
    # A shell that runs the tests in the background starts children with SIGINT
    # ignored; Python then installs no KeyboardInterrupt handler. Restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "sfedlora", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _rounds_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_rounds(proc: subprocess.Popen, out: Path, k: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _rounds_logged(out) < k:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "run did not progress"
        time.sleep(0.02)


def _artifacts(out: Path) -> dict[str, bytes]:
    files = {"metrics.jsonl": (out / "metrics.jsonl").read_bytes()}
    for f in sorted((out / "adapters").glob("*/adapter_model.safetensors")):
        files[str(f.relative_to(out))] = f.read_bytes()
    return files


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tiny_model_dir, tiny_data_file, tmp_path):
    """Client states in the checkpoint (memory store) or in per-round files the
    checkpoint refers to (disk store): both resume to the uninterrupted result."""
    reference = tmp_path / "reference"
    done = _cli(*_args(tiny_model_dir, tiny_data_file, reference))
    assert done.wait(timeout=300) == 0, done.communicate()

    for store in ("memory", "disk"):
        kill_after = random.randint(1, 4)
        print(f"{store}: killing during round {kill_after + 2}")
        crashed = tmp_path / f"crashed-{store}"
        args = _args(tiny_model_dir, tiny_data_file, crashed, f"clients.state_store={store}")
        proc = _cli(*args)
        # Round k's metrics line is written before round k's checkpoint, so once round
        # k + 1 is logged the checkpoint of round k is on disk; the kill lands in round
        # k + 2.
        _wait_for_rounds(proc, crashed, kill_after + 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (crashed / "summary.json").exists()
        assert load_checkpoint(crashed / "checkpoint.safetensors").round >= kill_after
        assert (crashed / "clients").is_dir() == (store == "disk")

        resumed = _cli("--resume", str(crashed))
        assert resumed.wait(timeout=300) == 0, resumed.communicate()
        ours, theirs = _artifacts(crashed), _artifacts(reference)
        assert ours.keys() == theirs.keys() and len(ours) == 5  # metrics + 4 adapters
        assert ours == theirs, store
        assert len(ours["metrics.jsonl"].splitlines()) == 6


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(sig, tiny_model_dir, tiny_data_file,
                                                           tmp_path):
    out = tmp_path / "run"
    proc = _cli(*_args(tiny_model_dir, tiny_data_file, out, "checkpoint.every=0", "rounds=60"))
    _wait_for_rounds(proc, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"sfedlora run --resume {out}" in err
    assert load_checkpoint(out / "checkpoint.safetensors").round >= 2


def test_resume_refuses_a_config_that_changes_results(tiny_config, tmp_path):
    cfg = tiny_config("rounds=2")
    Simulation(cfg).run()
    with pytest.raises(ConfigError) as err:
        Simulation.resume(cfg.output_dir, ["lora.rank=8", "local.lr=0.5", "progress=true"])
    msg = str(err.value)
    assert "lora.rank: 4 -> 8" in msg and "local.lr: 0.01 -> 0.5" in msg
    assert "progress" not in msg  # harmless settings may change
    sim = Simulation.resume(cfg.output_dir, ["progress=false", "rounds=2"])
    assert sim.done_rounds == 2


def test_resume_continues_where_the_checkpoint_left_off(tiny_config, tmp_path):
    full = tiny_config("rounds=4", f"output_dir={tmp_path}/full")
    Simulation(full).run()
    part = tiny_config("rounds=4", f"output_dir={tmp_path}/part")
    sim = Simulation(part)
    original = sim.run_round

    def interrupt_at_3(r):
        if r == 3:
            raise KeyboardInterrupt
        return original(r)

    sim.run_round = interrupt_at_3
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    (tmp_path / "part/metrics.jsonl").unlink()  # the checkpoint carries the metrics so far
    Simulation.resume(tmp_path / "part").run()
    assert (tmp_path / "part/metrics.jsonl").read_bytes() == \
        (tmp_path / "full/metrics.jsonl").read_bytes()
    # each process that wrote the run says where it started: rounds 1-2, then 3-4
    writers = [json.loads(line) for line in
               (tmp_path / "part/environment.jsonl").read_text().splitlines()]
    assert [w["from_round"] for w in writers] == [1, 3]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.safetensors").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="not an sfedlora checkpoint"):
        load_checkpoint(run_dir / "checkpoint.safetensors")
    (run_dir / "config.yaml").write_text("rounds: 2\n")
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert not marker.exists()
