"""A study run by its plan: tune on the selection seeds, report on the others, decide.

:class:`PlannedStudy` follows a committed ``plan.yaml`` (:mod:`.plan`) in three stages:

1. ``select``: every arm over the plan's ladder, once per selection seed, into
   ``<study>/runs/<arm>/select/``. The rung with the lowest mean ``tune_on`` figure
   (validation data: never the test part) over the selection seeds is chosen; a
   one-setting ladder whose choice sits at an end gains a rung past it, up to
   ``plan.extend`` rungs, so no arm is judged at a rate the ladder clipped.
2. ``report``: the chosen rung on the reporting seeds, into ``<arm>/report/``. These
   runs, and only these, are reported.
3. ``decide``: each rule's reading per reporting seed, the paired difference with its
   95% interval, the outcome, and a check that the plan's commit precedes every run;
   written as ``<study>/report.md`` (:mod:`.report`), which regenerates byte for byte
   from the committed runs.

Runs go through :func:`~sfedlora.studies.sweep.run_sweep`, so a rerun skips finished
runs, resumes interrupted ones, and ``shard`` K/M splits each sweep over M processes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfedlora.config import load_config
from sfedlora.studies import runs as run_files
from sfedlora.studies.plan import (
    Plan,
    PlanError,
    Rule,
    Verdict,
    decide,
    final_value,
    load_plan,
    reading,
)
from sfedlora.studies.report import render, time_to_go
from sfedlora.studies.sweep import expand, parse_shard, run_sweep
from sfedlora.studies.tables import markdown_table

Rung = dict[str, float]


@dataclass(frozen=True)
class PlannedStudy:
    """One study: its plan, its folder (the plan's), the repository root its config
    path is relative to, and the sweep runner (a test passes its own)."""

    plan: Plan
    folder: Path
    root: Path
    shard: str = "0/1"
    runner: Callable[..., bool] = field(default=run_sweep, repr=False)

    @classmethod
    def load(cls, plan_path: Path, root: Path | None = None, **kwargs) -> PlannedStudy:
        plan_path = Path(plan_path)
        root = root if root is not None else _repository_root(plan_path)
        return cls(load_plan(plan_path), plan_path.parent, root, **kwargs)

    @property
    def plan_path(self) -> Path:
        return self.folder / "plan.yaml"

    def stage_dir(self, arm: str, stage: str) -> Path:
        return self.folder / "runs" / arm / stage

    def _sweep(self, arm: str, stage: str, grid: dict[str, list]) -> bool:
        """Run ``grid`` (the rung settings and ``seed``) under the arm's settings into
        ``<arm>/<stage>/``; False while other shards still hold some of its runs."""
        return self.runner(str(self.root / self.plan.config), grid,
                           self.stage_dir(arm, stage), self.plan.arm_settings(arm),
                           shard=parse_shard(self.shard),
                           on_start=lambda name: print(f"{arm} {stage} {name}", flush=True))

    # --- select ------------------------------------------------------------------------

    def ladder(self, arm: str) -> dict[str, list[float]]:
        """The plan's ladder, plus any rung an earlier selection added past an end."""
        ladder = {k: list(v) for k, v in self.plan.ladder.items()}
        for rung, _ in self.selection_runs(arm):
            for key, value in rung.items():
                if value not in ladder[key]:
                    ladder[key] = sorted([*ladder[key], value])
        return ladder

    def selection_runs(self, arm: str) -> list[tuple[Rung, Path]]:
        """The arm's finished selection runs with the rung each ran."""
        return [(_rung(run, self.plan.ladder), run) for run in
                run_files.finished_runs(self.stage_dir(arm, "select") / "runs")]

    def choice(self, arm: str) -> tuple[Rung, dict[tuple, float]]:
        """The chosen rung (the best mean ``tune_on`` over the selection seeds: lowest,
        or highest with ``tune_higher_is_better``; a figure that is not finite counts as
        worst; among exact ties the smallest rung, so the lowest learning rate) and each
        complete rung's mean; an arm with ``rung_from`` takes that arm's."""
        if source := self.plan.arms[arm].rung_from:
            return self.choice(source)
        sign = -1.0 if self.plan.tune_higher_is_better else 1.0
        by_rung: dict[tuple, list[float]] = {}
        for rung, run in self.selection_runs(arm):
            value = run_files.summary(run).get(self.plan.tune_on)
            value = sign * value if value is not None and math.isfinite(value) else math.inf
            by_rung.setdefault(tuple(rung.items()), []).append(value)
        scores = {rung: float(np.mean(v)) for rung, v in by_rung.items()
                  if len(v) == len(self.plan.selection_seeds)}
        if not scores:
            raise PlanError(f"{arm}: no rung has finished on every selection seed; run "
                            "the select stage first")
        best = min(scores, key=lambda r: (scores[r], r))
        return dict(best), {rung: sign * v for rung, v in scores.items()}

    def selection_finished(self, arm: str) -> bool:
        """Whether the select stage is over: every rung has run on every selection seed
        and no further rung is due (the choice is inside the ladder, or the extension is
        spent). The report stage waits for it, so a shard that finishes early cannot
        report a rung chosen from part of the ladder. An arm with ``rung_from`` waits for
        that arm's."""
        if source := self.plan.arms[arm].rung_from:
            return self.selection_finished(source)
        ladder = self.ladder(arm)
        done = {(tuple(rung.items()), load_config(run / "config.yaml").seed)
                for rung, run in self.selection_runs(arm)}
        rungs = [dict(zip(ladder, values, strict=True))
                 for values in itertools.product(*ladder.values())]
        if any((tuple(r.items()), s) not in done for r in rungs
               for s in self.plan.selection_seeds):
            return False
        if len(ladder) != 1:
            return True
        ((key, values),) = ladder.items()
        return self.choice(arm)[0][key] not in (values[0], values[-1]) or \
            len(values) - len(self.plan.ladder[key]) >= self.plan.extend or len(values) < 2

    def select(self, arm: str) -> bool:
        """Run the ladder on the selection seeds, extending a one-setting ladder past an
        end the choice sits at; False while other shards still run the arm. An arm with
        ``rung_from`` is not tuned: it has nothing to select."""
        if self.plan.arms[arm].rung_from:
            return True
        ladder = self.ladder(arm)
        while True:
            if not self._sweep(arm, "select",
                               {**ladder, "seed": list(self.plan.selection_seeds)}):
                return False
            if (extended := self._extended(arm, ladder)) is None:
                return True
            # the next sweep covers the added rung (runs already finished are skipped)
            ladder = extended

    def _extended(self, arm: str, ladder: dict[str, list[float]],
                  say: bool = True) -> dict[str, list[float]] | None:
        """``ladder`` (every rung of it finished) with the rung past the end its choice
        sits at, by the end rungs' ratio; None where no rung is due (the choice is
        inside, the extension is spent, or the ladder has several settings)."""
        if len(ladder) != 1:
            return None
        ((key, values),) = ladder.items()
        chosen = self.choice(arm)[0][key]
        added = len(values) - len(self.plan.ladder[key])
        if len(values) < 2 or added >= self.plan.extend or \
                chosen not in (values[0], values[-1]):
            return None
        low = chosen == values[0]
        ratio = values[1] / values[0] if low else values[-1] / values[-2]
        step = float(f"{chosen / ratio if low else chosen * ratio:.6g}")
        if say:
            print(f"{arm}: the choice {key}={chosen:g} sits at the ladder's end; adding "
                  f"{step:g}", flush=True)
        return {key: sorted([*values, step])}

    def due(self, arm: str) -> tuple[str, dict[str, list]] | None:
        """The stage and grid ``arm`` must run next, from what has finished on disk:
        its ladder (extended once every rung of it has finished and the choice sits at
        an end) on the selection seeds, then its chosen rung on the reporting seeds;
        None once both are done, or while an arm with ``rung_from`` waits for its
        source's selection. The parallel runner (:mod:`.parallel`) asks this again as
        each run finishes."""
        if not self.plan.arms[arm].rung_from and not self.selection_finished(arm):
            ladder = self.ladder(arm)
            grid = {**ladder, "seed": list(self.plan.selection_seeds)}
            if all(run_files.is_finished(self.stage_dir(arm, "select") / "runs" / r.name)
                   for r in expand(grid)):
                grid = {**self._extended(arm, ladder, say=False),
                        "seed": list(self.plan.selection_seeds)}
            return "select", grid
        if not self.selection_finished(arm):
            return None  # rung_from: its source is still selecting
        chosen, _ = self.choice(arm)
        if len(self.reporting_runs(arm)) == len(set(self.plan.reporting_seeds)):
            return None
        return "report", {**{k: [v] for k, v in chosen.items()},
                          "seed": list(self.plan.reporting_seeds)}

    # --- report ------------------------------------------------------------------------

    def report(self, arm: str) -> bool:
        if not self.selection_finished(arm):
            raise PlanError(f"{arm}: its select stage has not finished (a rung or a "
                            "selection seed is missing, or a rung past the ladder's end is "
                            "due); run --stage select to its end first")
        chosen, _ = self.choice(arm)
        return self._sweep(arm, "report", {**{k: [v] for k, v in chosen.items()},
                                           "seed": list(self.plan.reporting_seeds)})

    def reporting_runs(self, arm: str) -> dict[int, Path]:
        """The arm's finished reporting runs by seed (at its chosen rung only)."""
        chosen, _ = self.choice(arm)
        found = {}
        for run in run_files.finished_runs(self.stage_dir(arm, "report") / "runs"):
            if _rung(run, self.plan.ladder) == chosen:
                found[load_config(run / "config.yaml").seed] = run
        return found

    def progress(self) -> str:
        """Where the study stands, from what has finished on disk: per arm, its finished
        selection and reporting runs, its chosen rung once selection is over, and the
        runs due next (a ladder's extension is due only once its rungs have finished, so
        the count covers what is known now). A plan's runs take hours to days; this says
        what is left without running anything."""
        rows, to_go = [], 0
        seeds = len(set(self.plan.reporting_seeds))
        for arm in self.plan.arms:
            selected = len(self.selection_runs(arm)) if not self.plan.arms[arm].rung_from \
                else "-"
            finished = self.selection_finished(arm)
            reported = len(self.reporting_runs(arm)) if finished else 0
            chosen = ", ".join(f"{k}={v:g}" for k, v in self.choice(arm)[0].items()) \
                if finished else "-"
            due = self.due(arm)
            if due is None:
                left = f"waits for {self.plan.arms[arm].rung_from}" if reported < seeds \
                    else "done"
            else:
                stage, grid = due
                folder = self.stage_dir(arm, stage) / "runs"
                count = sum(not run_files.is_finished(folder / r.name) for r in expand(grid))
                left = f"{stage}: {count}"
                to_go += count if stage == "select" else 0
            to_go += seeds - reported
            rows.append([arm, selected, f"{reported}/{seeds}", chosen, left])
        table = markdown_table(["arm", "selection runs done", "reporting runs done",
                                "chosen", "runs due next"], rows)
        return table + "\n\n" + time_to_go(to_go, self.all_runs())

    # --- decide ------------------------------------------------------------------------

    def readings(self, rule: Rule, arm: str, lines: dict[int, float] | None = None
                 ) -> dict[int, float]:
        """What ``rule`` reads of each of ``arm``'s reporting runs (``lines``: each
        seed's line, for a rule whose line is drawn below its control)."""
        return {seed: reading(rule, run_files.metrics(run), (lines or {}).get(seed))
                for seed, run in self.reporting_runs(arm).items()}

    def lines(self, rule: Rule) -> dict[int, float] | None:
        """Each seed's line of a rule drawn ``line_below_control`` under the final
        metric of its control (or of ``line_arm``); None for a fixed line or none."""
        if rule.line_below_control is None:
            return None
        return {seed: final_value(rule.metric, run_files.metrics(run)) -
                rule.line_below_control
                for seed, run in self.reporting_runs(rule.line_arm or rule.control).items()}

    def paired_readings(self, rule: Rule) -> tuple[dict[int, float], dict[int, float]]:
        """The rule's arm's and control's readings by reporting seed (a ``baseline:``
        control: that summary figure of the arm's own runs)."""
        lines = self.lines(rule)
        arm = self.readings(rule, rule.arm, lines)
        if rule.baseline:
            return arm, {seed: float(run_files.summary(run)[rule.baseline])
                         for seed, run in self.reporting_runs(rule.arm).items()}
        return arm, self.readings(rule, rule.control, lines)

    def verdict(self, rule: Rule) -> Verdict:
        return decide(rule, *self.paired_readings(rule), self.plan.reporting_seeds)

    def arm_runs(self, arm: str) -> list[Path]:
        """The arm's finished runs, selection then reporting."""
        return [run for stage in ("select", "report")
                for run in run_files.finished_runs(self.stage_dir(arm, stage) / "runs")]

    def all_runs(self) -> list[Path]:
        return [run for arm in self.plan.arms for run in self.arm_runs(arm)]

    def page(self) -> str:
        """The study's report (:func:`sfedlora.studies.report.render`)."""
        return render(self)

    def run(self, stage: str, arms: Sequence[str] | None = None) -> bool:
        """Run ``stage`` (``select``, ``report``, ``decide`` or ``all``) for ``arms``
        (default every arm); False while other shards are still running."""
        arms = list(arms or self.plan.arms)
        if unknown := [a for a in arms if a not in self.plan.arms]:
            raise PlanError(f"--arms {unknown}: the plan's arms are {list(self.plan.arms)}")
        for arm in arms:
            if stage in ("select", "all") and not self.select(arm):
                return False
        for arm in arms:
            if stage in ("report", "all") and not self.report(arm):
                return False
        if stage in ("decide", "all"):
            (self.folder / "report.md").write_text(self.page())
        return True


def _rung(run: Path, ladder: dict[str, list[float]]) -> Rung:
    """The ladder settings a run ran with (read from its resolved config)."""
    cfg = load_config(run / "config.yaml")
    return {key: functools.reduce(getattr, key.split("."), cfg) for key in ladder}


def _repository_root(path: Path) -> Path:
    for parent in Path(path).resolve().parents:
        if (parent / ".git").exists():
            return parent
    raise PlanError(f"{path} is not inside a git repository; give the root")
