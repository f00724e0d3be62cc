"""What a run ran on: the code's commit, library versions, Python, the CPU and the
kernels torch picked for it.

The same config and seed repeat a run bit for bit on one machine with one set of
libraries, but not across them: another CPU (torch and MKL choose their kernels by
the instruction set) or another transformers release can round a loss differently in
the eighth digit, and top-k selection turns that into another trajectory. Each process
that writes a run (the first, and each resume) appends this record to the run's
``environment.jsonl``, so a figure that does not repeat can be traced to what changed.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

# the libraries whose releases can change a run's numbers or its messages
PACKAGES = ("sfedlora", "torch", "transformers", "peft", "safetensors", "numpy",
            "tokenizers", "flwr", "opacus")
SOURCE = Path(__file__).resolve().parent  # the sfedlora package being run


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def source_commit(source: Path = SOURCE) -> dict[str, str | bool] | None:
    """The git commit of the checkout ``source`` lies in and whether its tracked files
    differ from it; None when ``source`` is not tracked by a git checkout (an installed
    wheel, also one inside some other repository) or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
    try:
        if not git("ls-files", "--", "."):
            return None
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": bool(changed)}


@functools.cache
def process_source(source: Path = SOURCE) -> dict[str, str | bool] | None:
    """:func:`source_commit` as this process first saw it. A process runs the code it
    imported at its start; a sweep that runs for hours must not name a commit checked
    out while it ran (nor call its code modified for an edit made since)."""
    return source_commit(source)


def describe() -> dict:
    """This process's environment, as one JSON-ready record."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "packages": package_versions(),
        "source": process_source(),
        "argv": sys.argv,
    }
