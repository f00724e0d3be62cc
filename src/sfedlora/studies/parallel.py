"""A planned study's runs as up to N processes at once (``sfedlora study --jobs N``), or
up to R at a time in this process with their clients in shared passes (``--batched R``).

``--shard K/M`` splits each sweep statically, so a shard that finishes early waits for
the others before an arm's extension or its reporting runs can start, and someone has to
start the next stage by hand. Here one parent keeps N runs going: it asks the study what
each arm must run next (:meth:`~sfedlora.studies.protocol.PlannedStudy.due`, from what
has finished on disk), starts those runs as ``sfedlora run`` processes, and asks again
as each ends, so an arm's extension and reporting runs start as soon as its selection
allows. Selection runs go first: they unblock the rest. Each run is exactly the run the
one-process path makes (the same config, the same directory), so the study's tables
and report do not depend on how it was run; the parent writes them at the end through
the one-process path, which finds every run finished.

Written here rather than with a pool library: what is ready changes as runs finish, and
each run must be a process of its own (a crashed run loses nothing else, and torch's
threads are set per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sfedlora.config import load_config
from sfedlora.runtime.results import held_elsewhere
from sfedlora.studies import runs as run_files
from sfedlora.studies.plan import PlanError
from sfedlora.studies.protocol import PlannedStudy
from sfedlora.studies.sweep import expand, same_experiment


@dataclass(frozen=True)
class PendingRun:
    arm: str
    stage: str
    run_dir: Path
    settings: list[str]  # the run's overrides, output_dir included


class Process(Protocol):
    """What the runner needs of a started run (``subprocess.Popen`` has it)."""

    def poll(self) -> int | None: ...


Launch = Callable[[list[str], Path], Process]  # (command, log file) -> started run


def pending(study: PlannedStudy, stage: str, arms: Sequence[str]) -> Iterator[PendingRun]:
    """The unfinished runs ``stage`` (``select``, ``report`` or ``all``) can start now,
    selection runs first."""
    due = {arm: study.due(arm) for arm in arms}
    order = ("select",) if stage == "select" else ("report",) if stage == "report" else \
        ("select", "report")
    for which in order:
        for arm, found in due.items():
            if found is None or found[0] != which:
                continue
            for run in expand(found[1]):
                run_dir = study.stage_dir(arm, which) / "runs" / run.name
                if not run_files.is_finished(run_dir):
                    yield PendingRun(arm, which, run_dir, [
                        *study.plan.arm_settings(arm), *run.overrides,
                        f"output_dir={run_dir}", "progress=false"])


def command(study: PlannedStudy, run: PendingRun) -> list[str]:
    """The ``sfedlora run`` command of ``run``: a resume where an earlier attempt left a
    checkpoint, else a fresh run replacing what an interrupted attempt left (after
    checking it is the same experiment, as the one-process path does)."""
    cli = [sys.executable, "-m", "sfedlora"]
    if (run.run_dir / "checkpoint.safetensors").is_file():
        return [*cli, "run", "--resume", str(run.run_dir), "progress=false"]
    config = str(study.root / study.plan.config)
    same_experiment(run.run_dir, load_config(config, run.settings))
    return [*cli, "run", config, *run.settings, "--overwrite"]


def _popen(args: list[str], log_file: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    with log_file.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def run_parallel(study: PlannedStudy, stage: str, arms: Sequence[str] | None, jobs: int,
                 launch: Launch = _popen, poll_seconds: float = 1.0) -> bool:
    """Run every run ``stage`` needs for ``arms`` (default every arm), at most ``jobs``
    at once, starting each as soon as what it depends on has finished; then
    :meth:`PlannedStudy.run` writes the tables and, for ``decide`` or ``all``, the
    report. A run that fails is reported with its log and not retried; the others go
    on, and a :class:`PlanError` lists the failures at the end. Each process gets
    ``OMP_NUM_THREADS=1`` unless the caller's environment sets it."""
    if jobs < 1:
        raise PlanError(f"--jobs {jobs}: give at least 1")
    if study.shard != "0/1":
        raise PlanError("--jobs and --shard split the same work; give one of them")
    arms = _known_arms(study, arms)
    logs = Path(tempfile.mkdtemp(prefix="sfedlora-study-"))
    running: dict[Path, tuple[Process, PendingRun]] = {}
    failed: dict[Path, Path] = {}

    def log_of(run: PendingRun) -> Path:
        return logs / f"{run.arm}-{run.stage}-{run.run_dir.name}.log"
    while stage != "decide":
        ready = [run for run in pending(study, stage, arms)
                 if run.run_dir not in running and run.run_dir not in failed]
        # a run another process is writing (an earlier parent's, a hand-started one)
        # is not started twice, and counts toward N: it uses the same machine
        elsewhere = [run for run in ready if held_elsewhere(run.run_dir)]
        free = max(0, jobs - len(running) - len(elsewhere))
        for run in [run for run in ready if run not in elsewhere][:free]:
            print(f"{run.arm} {run.stage} {run.run_dir.name} (log: {log_of(run)})",
                  flush=True)
            running[run.run_dir] = (launch(command(study, run), log_of(run)), run)
        if not running and not elsewhere:
            break
        # the study is asked again only once a run has ended: reading every run's
        # config to find what is due costs CPU the runs need
        for run_dir, run, code in _ended(running, poll_seconds,
                                         give_up_after=30 * poll_seconds if elsewhere
                                         else None):
            if code != 0 or not run_files.is_finished(run_dir):
                failed[run_dir] = log_of(run)
                print(f"{run.arm} {run.stage} {run_dir.name} failed (exit {code}); "
                      f"see {log_of(run)}", file=sys.stderr, flush=True)
    _refuse_failures({d: f"log: {f}" for d, f in failed.items()})
    return study.run(stage, arms)


Together = Callable[[list[tuple[str, object]]], dict[str, object]]  # run_together's shape


def run_batched(study: PlannedStudy, stage: str, arms: Sequence[str] | None, batched: int,
                together: Together | None = None) -> bool:
    """Run every run ``stage`` needs for ``arms``, up to ``batched`` at a time in this
    process with their clients trained in shared passes
    (:func:`~sfedlora.runtime.batched.lockstep.run_together`): every run that can start
    now goes into the next batch (selection runs first), and the study is asked again
    when a batch has ended. The runs are the ones the other paths make, so the tables
    and report are too; failures are handled as :func:`run_parallel` does."""
    if batched < 2:
        raise PlanError(f"--batched {batched}: give at least 2 (1 is the plain path)")
    if study.shard != "0/1":
        raise PlanError("--batched and --shard split the same work; give one of them")
    arms = _known_arms(study, arms)
    if together is None:
        from sfedlora.runtime.batched.lockstep import run_together as together
    config = str(study.root / study.plan.config)
    failed: dict[Path, str] = {}
    while stage != "decide":
        ready = [run for run in pending(study, stage, arms)
                 if run.run_dir not in failed and not held_elsewhere(run.run_dir)]
        if not ready:
            break
        batch = {str(run.run_dir): run for run in ready[:batched]}
        configs = []
        for name, run in batch.items():
            cfg = load_config(config, run.settings)
            same_experiment(run.run_dir, cfg)
            configs.append((name, cfg))
            print(f"{run.arm} {run.stage} {run.run_dir.name}", flush=True)
        for name, outcome in together(configs).items():
            run_dir = batch[name].run_dir
            if isinstance(outcome, BaseException) or not run_files.is_finished(run_dir):
                failed[run_dir] = repr(outcome)
                print(f"{batch[name].arm} {batch[name].stage} {run_dir.name} failed: "
                      f"{outcome!r}", file=sys.stderr, flush=True)
    _refuse_failures(failed)
    return study.run(stage, arms)


def _refuse_failures(failed: dict[Path, str]) -> None:
    """Name every failed run (and why) once the others have finished."""
    if failed:
        raise PlanError(f"{len(failed)} run(s) failed: " + "; ".join(
            f"{d} ({why})" for d, why in failed.items()) + "; fix the cause and run the "
            "same command again (finished runs are kept)")


def _known_arms(study: PlannedStudy, arms: Sequence[str] | None) -> list[str]:
    arms = list(arms or study.plan.arms)
    if unknown := [a for a in arms if a not in study.plan.arms]:
        raise PlanError(f"--arms {unknown}: the plan's arms are {list(study.plan.arms)}")
    return arms


def _ended(running: dict[Path, tuple[Process, PendingRun]], poll_seconds: float,
           give_up_after: float | None = None) -> list[tuple[Path, PendingRun, int]]:
    """Wait until at least one of ``running`` has ended (or ``give_up_after`` seconds,
    to look again at runs another process is writing); remove and return those that
    have, with their exit codes."""
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    while True:
        time.sleep(poll_seconds)
        ended = [(run_dir, run, code) for run_dir, (process, run) in running.items()
                 if (code := process.poll()) is not None]
        for run_dir, _, _ in ended:
            del running[run_dir]
        if ended or (deadline is not None and time.monotonic() >= deadline):
            return ended
