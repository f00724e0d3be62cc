"""Experiment tracking: where each round's metrics go besides ``metrics.jsonl``.

A :class:`MetricWriter` receives every logged metrics record; the run directory holds
a list of them. TensorBoard's is built in (``tensorboard --logdir runs``); a W&B or
MLflow writer is a class with the same two methods (``wandb.log(scalars,
step=round)``, ``mlflow.log_metrics(scalars, step=round)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from sfedlora.core.records import Metric


class MetricWriter(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a metrics record, nested dicts as ``key/subkey`` (per-client
    values group under their metric); booleans, lists, strings and None are skipped."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)


class TensorBoardWriter:
    """Scalars for every numeric metric, at step = round, under ``RUN/tensorboard``.
    On resume, events at or after the first re-run round are purged, so a curve never
    holds a round twice."""

    def __init__(self, run_dir: Path, first_round: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=first_round or None)

    def write(self, record: dict) -> None:
        step = int(record[Metric.ROUND])
        for name, value in scalars({k: v for k, v in record.items() if k != Metric.ROUND}):
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
