"""Reading run directories: the one place a study reads what runs wrote (``summary.json``,
``metrics.jsonl``, ``timings.jsonl``), so a change to the run directory's layout is made
once (:class:`sfedlora.runtime.results.RunDir` writes them)."""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY, METRICS, TIMINGS = "summary.json", "metrics.jsonl", "timings.jsonl"
ENVIRONMENT = "environment.jsonl"


def is_finished(run_dir: Path) -> bool:
    """Whether the run wrote its summary (it ran every round)."""
    return (Path(run_dir) / SUMMARY).is_file()


def finished_runs(folder: Path) -> list[Path]:
    """The finished runs directly under ``folder``, in name order."""
    return [p.parent for p in sorted(Path(folder).glob(f"*/{SUMMARY}"))]


def summary(run_dir: Path) -> dict:
    """The run's ``summary.json``."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def _lines(run_dir: Path, name: str) -> list[dict]:
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {name}; is it a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics(run_dir: Path) -> list[dict]:
    """Every line of the run's ``metrics.jsonl`` (one per round, in order)."""
    return _lines(run_dir, METRICS)


def labels(run_dir: Path) -> list[str]:
    """The run's label names (``labels.json``; a causal-LM run has none)."""
    path = Path(run_dir) / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else []


def timings(run_dir: Path) -> list[dict]:
    """Every line of the run's ``timings.jsonl`` (wall-clock seconds per round)."""
    return _lines(run_dir, TIMINGS)


def environments(run_dir: Path) -> list[dict]:
    """Every record of the run's ``environment.jsonl``, one per process that ran it (a
    resumed run has several); empty when the run wrote none."""
    path = Path(run_dir) / ENVIRONMENT
    return _lines(run_dir, ENVIRONMENT) if path.is_file() else []


def commit(record: dict) -> str | None:
    """The source commit an environment record names (None: it names none)."""
    return (record.get("source") or {}).get("commit")


def hardware(record: dict) -> str:
    """What the process computed on, as a report names it: the GPU, or the CPU with the
    kernels torch chose for it ("CPU (AVX2 kernels)"). Float results can differ in their
    last digits between instruction sets, so a study says which ran each run."""
    if not record:
        return "an unrecorded machine"
    if device := record.get("cuda_device"):
        return str(device)
    return f"CPU ({record.get('torch_cpu_capability', 'unknown')} kernels)"


def write_record(path: Path, **payload) -> None:
    """A benchmark's measurement as JSON: ``payload``, the command that made it and this
    process's environment (its commit among them), so a results page's table
    regenerates from the file and says what produced it."""
    import sys

    from sfedlora.core.environment import describe

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", *sys.argv]), **payload,
              "environment": describe()}
    path.write_text(json.dumps(record, indent=1) + "\n")


def read_record(path: Path) -> dict:
    """What :func:`write_record` wrote."""
    return json.loads(Path(path).read_text())
