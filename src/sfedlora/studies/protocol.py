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
   written as ``<study>/report.md``, which regenerates byte for byte from the committed
   runs.

Runs go through :func:`~sfedlora.studies.sweep.run_sweep`, so a rerun skips finished
runs, resumes interrupted ones, and ``shard`` K/M splits each sweep over M processes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfedlora.config import load_config
from sfedlora.studies import runs as run_files
from sfedlora.studies.plan import (
    X_OF,
    Plan,
    PlanError,
    Rule,
    Verdict,
    decide,
    final_value,
    load_plan,
    plan_precedes,
    reading,
)
from sfedlora.studies.stats import mean_ci
from sfedlora.studies.sweep import expand, parse_shard, run_sweep
from sfedlora.studies.tables import markdown_table, mean_pm

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
        return table + "\n\n" + _time_to_go(to_go, self.all_runs())

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
        """The study's report: the chosen rungs, each metric per arm over the
        reporting seeds, every rule's verdict with its per-seed readings, and whether
        the plan preceded every run."""
        plan = self.plan
        lines = [f"# {self.folder.name}: report", "",
                 f"Generated from the committed runs by `sfedlora study "
                 f"{_relative(self.plan_path, self.root)} --stage decide`; the plan is "
                 "[plan.yaml](plan.yaml).", "", f"**Question.** {plan.question}", "",
                 f"Reporting seeds {plan.reporting_seeds} (selection seeds "
                 f"{plan.selection_seeds} chose each arm's rung on `{plan.tune_on}` and are "
                 f"not reported); {plan.rounds} rounds, evaluated on rounds "
                 f"{plan.eval_rounds}.", ""]
        if plan.decision:
            lines += [f"**Decision rule (fixed with the plan).** {plan.decision}", ""]
        lines += ["## Arms", ""]
        rows = []
        for arm in plan.arms:
            chosen, means = self.choice(arm)
            values = sorted(r[0][1] for r in means) if len(plan.ladder) == 1 else None
            at_end = values is not None and len(values) > 1 and \
                next(iter(chosen.values())) in (values[0], values[-1])
            runs = self.reporting_runs(arm)
            cells = []
            for metric in plan.metrics:
                got = [run_files.summary(r).get(metric) for r in runs.values()]
                got = [g / _scale(metric) for g in got if g is not None]
                cells.append(mean_pm(*mean_ci(got)) if got else "-")
            rung = ", ".join(f"{k}={v:g}" for k, v in chosen.items())
            if source := plan.arms[arm].rung_from:
                rung += f" ({source}'s)"
            rows.append([arm, rung + (" (ladder end)" if at_end else ""), *cells, len(runs)])
        lines += [markdown_table(["arm", "chosen", *map(_heading, plan.metrics), "seeds"],
                                 rows), "",
                  "Mean ± half-width of the 95% t-interval over the reporting seeds.", "",
                  "## Verdicts", ""]
        verdicts = [self.verdict(rule) for rule in plan.rules]
        lines += [markdown_table(["rule", "reading", "arm against control, paired (95%)",
                                  "must clear", "outcome"],
                                 [v.summary_cells() for v in verdicts]), ""]
        for rule, verdict in zip(plan.rules, verdicts, strict=True):
            lines += [f"- {verdict.sentence()}", ""]
            lines += [_per_seed_table(self, rule), ""]
        lines += _what_ran(self)
        problems = plan_precedes(self.plan_path, self.all_runs())
        lines += ["## Order", "", "The plan's commit precedes every run's: " +
                  ("yes." if not problems else "**no**:"), ""]
        lines += [f"- {p}" for p in problems]
        return "\n".join(lines).rstrip() + "\n"

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


NO_COMMIT = "none"


def _run_provenance(run: Path) -> tuple[dict[str, float], set[str]]:
    """The commits a run's processes name, each with when the first of them started,
    and the hardware they ran on (a run that recorded nothing: no commit, unrecorded)."""
    records = run_files.environments(run) or [{}]
    commits: dict[str, float] = {}
    for record in records:
        commit = run_files.commit(record) or NO_COMMIT
        commits[commit] = min(commits.get(commit, math.inf),
                              record.get("started_at", math.inf))
    return commits, {run_files.hardware(record) for record in records}


def _all_one(found: set[str], kinds: str, unknown: str) -> str:
    """"yes." when ``found`` is one recorded value, else how many and whether some runs
    recorded none (``unknown``)."""
    if len(found) == 1 and unknown not in found:
        return "yes."
    named = f"no, {len(found - {unknown})} {kinds}"
    return named + (" and runs that recorded none." if unknown in found else ".")


def _time_to_go(runs_left: int, finished: Sequence[Path]) -> str:
    """How much is left, in runs and, from the finished runs' own timings, in hours."""
    if runs_left == 0:
        return "Every run has finished."
    said = (f"At least {runs_left} runs to go (a ladder may still gain a rung past an "
            "end).")
    minutes = []  # each run's rounds, end to end (a resumed run's pause not counted)
    for run in finished:
        if (Path(run) / run_files.TIMINGS).is_file():
            minutes.append(sum(t["ended_at"] - t["started_at"] for t in
                               run_files.timings(run) if "started_at" in t) / 60)
    if not minutes:
        return said
    median = float(np.median(minutes))
    return (f"{said} The {len(minutes)} finished runs took a median of {median:.1f} "
            f"minutes each, as they ran: about {runs_left * median / 60:.1f} hours of "
            "runs, shared among `--jobs`.")


def _what_ran(study: PlannedStudy) -> list[str]:
    """The report's provenance section: per arm, the commits and the hardware its runs'
    ``environment.jsonl`` name, with how many runs each. A long study on one machine
    spans commits, and a machine's CPU can change under it; the reader should see both
    rather than assume one commit and one instruction set."""
    per_arm, first_seen = {}, {}
    for arm in study.plan.arms:
        runs = study.arm_runs(arm)
        commits, devices = Counter(), Counter()
        for run in runs:
            run_commits, run_devices = _run_provenance(run)
            commits.update(run_commits.keys())
            devices.update(run_devices)
            for commit, started in run_commits.items():
                first_seen[commit] = min(first_seen.get(commit, math.inf), started)
        per_arm[arm] = (len(runs), commits, devices)
    rows = []
    for arm, (count, commits, devices) in per_arm.items():
        ordered = sorted(commits, key=lambda c: (first_seen[c], c))
        rows.append([arm, count, ", ".join(f"{c[:7]} ({commits[c]})" for c in ordered),
                     ", ".join(f"{n} on {d}" for d, n in sorted(devices.items()))])
    every_device = {d for _, _, devices in per_arm.values() for d in devices}
    return ["## What ran them", "",
            "Each arm's finished runs, selection and reporting, by the commit and the "
            "hardware their `environment.jsonl` names, commits in the order they first "
            "ran (a run resumed by another process counts once under each commit and "
            "hardware its processes name).",
            "", markdown_table(["arm", "runs", "commits", "hardware"], rows), "",
            f"Every run from one commit: {_all_one(set(first_seen), 'commits', NO_COMMIT)} "
            "On one kind of hardware: "
            f"{_all_one(every_device, 'kinds', run_files.hardware({}))}", ""]


def _per_seed_table(study: PlannedStudy, rule: Rule) -> str:
    arm, control = study.paired_readings(rule)
    lines = study.lines(rule) or {}

    def compared(s: int) -> float | None:
        if s not in arm or s not in control or math.isinf(arm[s]) or math.isinf(control[s]):
            return None  # a line never held leaves nothing to compare
        if rule.compare == "difference":
            return arm[s] - control[s]
        return rule.ratio(arm[s], control[s])

    # a *_to reading is in its x's units (bytes to a line: shown in MB); the others
    # read the metric
    scale = _scale(X_OF[rule.reading]) if rule.reading.endswith("_to") else 1

    def read(value: float | None) -> str:
        """A reading, and a line never held (inf) said in words."""
        if value is not None and math.isinf(value):
            return "never held"
        return _fmt(None if value is None else value / scale)

    unit = " (MB)" if scale != 1 else ""
    head = ["seed", *(["line"] if lines else []), rule.arm + unit, rule.control + unit,
            "difference" if rule.compare == "difference" else "ratio"]
    return markdown_table(head, [[s, *([_fmt(lines.get(s))] if lines else []),
                                  read(arm.get(s)), read(control.get(s)),
                                  _fmt(compared(s))]
                                 for s in study.plan.reporting_seeds])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _scale(metric: str) -> float:
    """What a metric is divided by in a report: byte counts are shown in MB."""
    return 1e6 if metric.startswith("bytes") else 1


def _heading(metric: str) -> str:
    return f"{metric} (MB)" if _scale(metric) != 1 else metric


def _rung(run: Path, ladder: dict[str, list[float]]) -> Rung:
    """The ladder settings a run ran with (read from its resolved config)."""
    cfg = load_config(run / "config.yaml")
    return {key: functools.reduce(getattr, key.split("."), cfg) for key in ladder}


def _repository_root(path: Path) -> Path:
    for parent in Path(path).resolve().parents:
        if (parent / ".git").exists():
            return parent
    raise PlanError(f"{path} is not inside a git repository; give the root")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
