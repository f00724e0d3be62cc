"""The run directory: resolved config, metrics (also as TensorBoard events), timings,
summary, PEFT adapters, and what each process that wrote it ran on.

``metrics.jsonl`` holds only deterministic values (bit-identical for the same config
and seed); wall-clock seconds go to ``timings.jsonl`` for that reason.

A run never destroys another: a new run refuses a directory that holds one (unless
told to overwrite it), a lock keeps a second process out of a directory being written,
and without ``output_dir`` every run gets a new timestamped directory under ``runs/``,
with ``runs/latest`` pointing at the newest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sfedlora.core.checkpoint import FILENAME as CHECKPOINT_FILE
from sfedlora.core.checkpoint import Checkpoint, save_checkpoint
from sfedlora.core.environment import describe
from sfedlora.core.records import SUMMARY_METRICS
from sfedlora.runtime.tracking import MetricWriter, TensorBoardWriter
from sfedlora.settings import ConfigError, ExperimentConfig, to_yaml

log = logging.getLogger(__name__)

RUNS_ROOT = Path("runs")  # where runs without an output_dir go
LATEST = "latest"
LOCK_FILE = ".lock"
# what a run writes: a directory holding any of these holds a run
ENVIRONMENT_FILE = "environment.jsonl"
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", CHECKPOINT_FILE, "summary.json",
               "timings.jsonl", "labels.json", "run.log", "adapters", "samples",
               "tensorboard", "clients", ENVIRONMENT_FILE)


def new_run_path(method: str, root: Path = RUNS_ROOT) -> Path:
    """A directory name no run has used: ``root/<UTC time>-<method>[-k]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path, k = root / f"{stamp}-{method}", 1
    while path.exists():
        k += 1
        path = root / f"{stamp}-{method}-{k}"
    return path


def resolve_output_dir(cfg: ExperimentConfig) -> Path:
    """The config's ``output_dir``, or a new timestamped one (then written into the
    config, so its ``config.yaml`` and a resume name the real directory)."""
    if cfg.output_dir is None:
        cfg.output_dir = str(new_run_path(cfg.method))
    return Path(cfg.output_dir)


def point_latest(path: Path, root: Path = RUNS_ROOT) -> None:
    """Make ``root/latest`` a symlink to ``path`` (a directory of ``root``), replacing
    an older link atomically; a real directory of that name is left alone."""
    link = root / LATEST
    if link.exists() and not link.is_symlink():
        log.warning("%s is a directory, not a link; not pointing it at %s", link, path)
        return
    tmp = root / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(path).name)  # relative: the runs folder may move
    os.replace(tmp, link)


def run_outputs(path: Path) -> list[str]:
    """The files of a run that ``path`` holds (empty: free for a new run)."""
    return [name for name in RUN_OUTPUTS if (Path(path) / name).exists()]


def refuse_occupied(path: Path, overwrite: bool = False) -> None:
    """Raise :class:`ConfigError` when ``path`` holds a run and ``overwrite`` is off,
    naming what is there and how to continue or replace it."""
    found = run_outputs(path)
    if not found or overwrite:
        return
    resume = (f"continue it with --resume {path}, " if CHECKPOINT_FILE in found else "")
    raise ConfigError(
        f"output_dir={str(path)!r} holds another run ({', '.join(found)}); {resume}pass "
        "--overwrite to replace it, or set another output_dir (or none: a new directory "
        "under runs/)")


def held_elsewhere(path: str | Path) -> bool:
    """Whether another process holds the run directory's lock, that is, is writing
    that run now (a run that process crashed out of holds none)."""
    lock = Path(path) / LOCK_FILE
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock, where this process took it
    return False


class RunDir:
    def __init__(self, path: str | Path, writers: Sequence[MetricWriter] = (),
                 execution: dict | None = None):
        """``writers``: metric writers beside the built-in TensorBoard one (the Flower
        ServerApp's log of each round). ``execution``: how the run is executed, where
        that is not the plain way (a batched sweep's), recorded in its environment
        record; such a run's log takes only its own thread's records."""
        self.path = Path(path)
        self.execution = execution
        self._log_handler: logging.Handler | None = None
        self._lock: int | None = None
        self._extra_writers = list(writers)
        self.writers: list[MetricWriter] = []
        self._untracked: list[dict] = []  # logged records the writers have not seen

    def _acquire(self) -> None:
        """An exclusive lock on the directory for this process, released when the run
        closes or the process dies (``flock``), so a crashed run never blocks a resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another process (pid {holder}) is writing the run in "
                              f"{self.path}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def start(self, cfg: ExperimentConfig, label_names: list[str],
              resume_after: int | None = None, metrics: list[str] = (),
              overwrite: bool = False) -> None:
        """Prepare the directory: lock it, and for a new run refuse one that holds
        another run (``overwrite``: delete that run's files first). On resume,
        ``metrics.jsonl`` is rewritten from the checkpoint's copy and timing lines
        after the checkpoint's round are dropped (those rounds run again). Either way
        this process's environment is appended to ``environment.jsonl`` with the first
        round it runs, so a resumed run says which rounds ran where."""
        self._acquire()
        if resume_after is None:
            try:
                refuse_occupied(self.path, overwrite)
            except ConfigError:
                self.close()
                raise
            for name in run_outputs(self.path):
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if self.path.parent.resolve() == RUNS_ROOT.resolve():
                point_latest(self.path)
        if resume_after is None:
            (self.path / "config.yaml").write_text(to_yaml(cfg))
            (self.path / "timings.jsonl").write_text("")
        else:
            self._truncate_after("timings.jsonl", resume_after)
        self._append(ENVIRONMENT_FILE, {"from_round": (resume_after or 0) + 1,
                                        "started_at": time.time(), **describe(),
                                        **({"execution": self.execution}
                                           if self.execution else {})})
        (self.path / "metrics.jsonl").write_text("".join(metrics))
        (self.path / "labels.json").write_text(json.dumps(label_names))
        self.writers = [TensorBoardWriter(self.path, (resume_after or 0) + 1
                                          if resume_after else 0), *self._extra_writers]
        self._log_handler = logging.FileHandler(self.path / "run.log",
                                                mode="w" if resume_after is None else "a")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        if self.execution:  # other runs share the process, each in a thread of its own
            thread = threading.get_ident()
            self._log_handler.addFilter(lambda record: record.thread == thread)
        logging.getLogger("sfedlora").addHandler(self._log_handler)

    def _truncate_after(self, name: str, round_idx: int) -> None:
        path = self.path / name
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = []
        for line in lines:
            if not line.endswith("\n"):  # a line cut short by a crash
                break
            if json.loads(line)["round"] > round_idx:
                break
            kept.append(line)
        path.write_text("".join(kept))

    def log_samples(self, round_idx: int, samples: list[dict]) -> None:
        """Generated answers of one evaluation (causal-lm), for reading by a person."""
        if not samples:
            return
        out = self.path / "samples"
        out.mkdir(exist_ok=True)
        with open(out / f"round_{round_idx:04d}.jsonl", "w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")

    def metrics_lines(self) -> list[str]:
        return (self.path / "metrics.jsonl").read_text().splitlines(keepends=True)

    def last_metrics(self) -> dict | None:
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return json.loads(lines[-1]) if lines else None

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        save_checkpoint(self.path / CHECKPOINT_FILE, ckpt)

    def _append(self, name: str, record: dict) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, record: dict) -> None:
        """Append to ``metrics.jsonl`` (what checkpoints and resume rely on), and queue
        the record for the metric writers (:meth:`track`)."""
        self._append("metrics.jsonl", record)
        self._untracked.append(record)

    def track(self) -> None:
        """Hand the queued records to the metric writers (TensorBoard). Kept apart from
        :meth:`log_metrics` so the loop can mark a round done the moment its line is
        written, and an interrupt in between never leaves a logged round unrecorded."""
        while self._untracked:
            for writer in self.writers:
                writer.write(self._untracked[0])
            self._untracked.pop(0)

    def log_timing(self, record: dict) -> None:
        self._append("timings.jsonl", record)

    def write_adapters(self, adapters: dict[str, dict[str, bytes] | None],
                       exact_lora: tuple[dict[str, torch.Tensor], int] | None = None
                       ) -> list[Path]:
        """Write PEFT adapters (``name -> file name -> bytes``, as ``save_pretrained``
        wrote them where the adapter lives) under ``adapters/``. ``exact_lora``
        replaces their LoRA factors where what was learned lives elsewhere (FLoRA's
        merged base weights, see :meth:`ServerStage.export_lora`)."""
        written = []
        for name, files in adapters.items():
            if files is None:
                log.warning("%s: no adapter to export (its node is gone)", name)
                continue
            out = self.path / "adapters" / name
            for rel, data in files.items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
            if exact_lora is not None and (out / "adapter_model.safetensors").is_file():
                _replace_lora(out, *exact_lora)  # (not a record of an adapter on a node)
            written.append(out)
        return written

    def finish(self, cfg: ExperimentConfig, base_path: str, last: dict,
               wall_seconds: float) -> dict:
        summary = {str(k): last.get(k) for k in SUMMARY_METRICS}
        summary.update(
            method=cfg.method,
            scaling=cfg.scaling if cfg.lora.adapter == "lora" else "vera",
            a_init=cfg.a_init,
            gamma=cfg.gamma,
            rank=cfg.lora.rank,
            clients_per_round=cfg.clients_per_round,
            base_model=base_path,
            wall_seconds=wall_seconds,
        )
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        self.close()
        return summary

    def close(self) -> None:
        """Detach the run's log file and close the metric writers (also when the run
        fails)."""
        for writer in self.writers:
            writer.close()
        self.writers = []
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None
        if self._log_handler is not None:
            logging.getLogger("sfedlora").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def _replace_lora(adapter_dir: Path, factors: dict[str, torch.Tensor], rank: int) -> None:
    """Rewrite a saved PEFT adapter's LoRA factors as ``factors`` of rank ``rank`` at
    scale 1 (``r = lora_alpha = rank``); the head and other saved modules stay."""
    weights_path = adapter_dir / "adapter_model.safetensors"
    saved = load_file(str(weights_path))
    for name, t in factors.items():
        saved[name.replace(".default.", ".")] = t.contiguous()
    save_file(saved, str(weights_path), metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    config_path.write_text(json.dumps(config, indent=2))
