"""Every run says what it ran on (environment.jsonl): the code's commit, library
versions and the CPU kernels torch chose, the things that make a run repeat on one
machine and not on another."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from sfedlora.core.environment import process_source, source_commit
from sfedlora.runtime.simulation import Simulation


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_run_records_the_environment_it_ran_in(tiny_config):
    cfg = tiny_config("rounds=1")
    Simulation(cfg).run()
    lines = (Path(cfg.output_dir) / "environment.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["from_round"] == 1
    assert record["packages"]["torch"] == torch.__version__
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch_threads"] == torch.get_num_threads()
    assert set(record) >= {"python", "cpu", "platform", "source", "started_at"}


def test_the_source_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = _git(repo, "rev-parse", "HEAD")
    assert source_commit(repo / "pkg") == {"commit": head, "modified": False}
    assert process_source(repo / "pkg") == {"commit": head, "modified": False}
    (repo / "pkg" / "new.py").write_text("")  # untracked files are not the code run
    assert source_commit(repo / "pkg") == {"commit": head, "modified": False}
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    assert source_commit(repo / "pkg") == {"commit": head, "modified": True}
    # a process names the code it started with, not an edit made while it runs
    assert process_source(repo / "pkg") == {"commit": head, "modified": False}
    (tmp_path / "elsewhere").mkdir()
    assert source_commit(tmp_path / "elsewhere") is None  # not a checkout: no commit
    (repo / "site").mkdir()  # a package installed inside someone else's repository
    (repo / "site" / "code.py").write_text("")
    assert source_commit(repo / "site") is None
