"""A run never destroys another (issue 21, part 5): occupied directories are refused,
--overwrite replaces, a lock keeps a second process out, the default output_dir is a
new directory per run, and a crash while writing a checkpoint leaves the previous one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sfedlora.cli import main
from sfedlora.config import ConfigError, to_yaml
from sfedlora.core.checkpoint import load_checkpoint
from sfedlora.runtime.results import RunDir
from sfedlora.runtime.simulation import Simulation


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """One finished 2-round run (the shared expensive setup of this module)."""
    from sfedlora.config import load_config

    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.max_length=16",
                             "data.source=files", f"data.train_path={tiny_data_file}",
                             "clients.num=3", "rounds=2", "local.steps=2", "progress=false",
                             f"output_dir={out}"])
    Simulation(cfg).run()
    return cfg, out


def test_a_new_run_refuses_a_directory_holding_a_run(finished, capsys):
    cfg, out = finished
    before = (out / "metrics.jsonl").read_bytes()
    config = out.parent / "again.yaml"
    config.write_text(to_yaml(cfg))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert "config.yaml" in err and "checkpoint.safetensors" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing was touched
    with pytest.raises(ConfigError, match="holds another run"):
        Simulation(cfg).run()  # the library refuses too, not only the CLI
    assert (out / "metrics.jsonl").read_bytes() == before


def test_overwrite_replaces_the_run(finished, tmp_path):
    cfg, _ = finished
    target = tmp_path / "run"
    Simulation(cfg.model_copy(update={"output_dir": str(target)})).run()
    (target / "adapters" / "stale").mkdir()  # something only the old run had
    again = cfg.model_copy(update={"output_dir": str(target), "rounds": 1})
    summary = Simulation(again).run(overwrite=True)
    assert summary["round"] == 1
    assert not (target / "adapters" / "stale").exists()
    assert len((target / "metrics.jsonl").read_text().splitlines()) == 1
    # the replaced run's environment went with it
    assert len((target / "environment.jsonl").read_text().splitlines()) == 1


def test_a_second_process_is_refused_by_the_lock(tmp_path):
    held = RunDir(tmp_path / "run")
    held._acquire()
    try:
        code = ("from sfedlora.runtime.results import RunDir\n"
                f"RunDir({str(tmp_path / 'run')!r})._acquire()\n")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0
        assert f"another process (pid {os.getpid()})" in other.stderr
    finally:
        held.close()
    RunDir(tmp_path / "run")._acquire()  # released: free again


def test_without_output_dir_every_run_gets_its_own_directory(finished, tmp_path,
                                                             monkeypatch):
    cfg, _ = finished
    monkeypatch.chdir(tmp_path)
    first = cfg.model_copy(update={"output_dir": None, "rounds": 1})
    second = cfg.model_copy(update={"output_dir": None, "rounds": 1})
    Simulation(first).run()
    Simulation(second).run()
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all((p / "summary.json").is_file() for p in runs)
    assert first.output_dir != second.output_dir
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == (tmp_path / second.output_dir).resolve()


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(finished, tmp_path,
                                                                     monkeypatch):
    from sfedlora.core import checkpoint

    _, out = finished
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes((out / "checkpoint.safetensors").read_bytes())
    old = load_checkpoint(path)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")  # the process dies mid-write
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, old)
    assert load_checkpoint(path).round == old.round == 2
