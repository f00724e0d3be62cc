"""A planned study's report page (``report.md``), written from its finished runs
alone: the plan's question and decision rule, each arm's chosen rung and metrics over
the reporting seeds, every rule's verdict with its per-seed readings, which commits and
hardware ran the runs, and whether the plan's commit precedes every run. It
regenerates byte for byte from committed runs, so a results page can quote it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from sfedlora.studies import runs as run_files
from sfedlora.studies.plan import X_OF, Plan, Rule, Verdict, plan_precedes
from sfedlora.studies.stats import mean_ci
from sfedlora.studies.tables import markdown_table, mean_pm


class ReportedStudy(Protocol):
    """What a report reads of a study (:class:`sfedlora.studies.protocol.PlannedStudy`):
    its plan and folders, each arm's choice and runs, and each rule's readings."""

    plan: Plan
    folder: Path
    root: Path

    @property
    def plan_path(self) -> Path: ...

    def choice(self, arm: str) -> tuple[dict[str, float], dict[tuple, float]]: ...

    def reporting_runs(self, arm: str) -> dict[int, Path]: ...

    def verdict(self, rule: Rule) -> Verdict: ...

    def paired_readings(self, rule: Rule) -> tuple[dict[int, float], dict[int, float]]: ...

    def lines(self, rule: Rule) -> dict[int, float] | None: ...

    def arm_runs(self, arm: str) -> list[Path]: ...

    def all_runs(self) -> list[Path]: ...


def render(study: ReportedStudy) -> str:
    """The whole page, section by section."""
    lines = [*_header(study), *_arms(study), *_verdicts(study), *_what_ran(study),
             *_order(study)]
    return "\n".join(lines).rstrip() + "\n"


def _header(study: ReportedStudy) -> list[str]:
    plan = study.plan
    lines = [f"# {study.folder.name}: report", "",
             f"Generated from the committed runs by `sfedlora study "
             f"{_relative(study.plan_path, study.root)} --stage decide`; the plan is "
             "[plan.yaml](plan.yaml).", "", f"**Question.** {plan.question}", "",
             f"Reporting seeds {plan.reporting_seeds} (selection seeds "
             f"{plan.selection_seeds} chose each arm's rung on `{plan.tune_on}` and are "
             f"not reported); {plan.rounds} rounds, evaluated on rounds "
             f"{plan.eval_rounds}.", ""]
    if plan.decision:
        lines += [f"**Decision rule (fixed with the plan).** {plan.decision}", ""]
    return lines


def _arms(study: ReportedStudy) -> list[str]:
    """Each arm's chosen rung (flagged at a ladder's end) and each metric over the
    reporting seeds."""
    plan = study.plan
    rows = []
    for arm in plan.arms:
        chosen, means = study.choice(arm)
        values = sorted(r[0][1] for r in means) if len(plan.ladder) == 1 else None
        at_end = values is not None and len(values) > 1 and \
            next(iter(chosen.values())) in (values[0], values[-1])
        runs = study.reporting_runs(arm)
        cells = []
        for metric in plan.metrics:
            got = [run_files.summary(r).get(metric) for r in runs.values()]
            got = [g / _scale(metric) for g in got if g is not None]
            cells.append(mean_pm(*mean_ci(got)) if got else "-")
        rung = ", ".join(f"{k}={v:g}" for k, v in chosen.items())
        if source := plan.arms[arm].rung_from:
            rung += f" ({source}'s)"
        rows.append([arm, rung + (" (ladder end)" if at_end else ""), *cells, len(runs)])
    return ["## Arms", "",
            markdown_table(["arm", "chosen", *map(_heading, plan.metrics), "seeds"], rows),
            "", "Mean ± half-width of the 95% t-interval over the reporting seeds.", ""]


def _verdicts(study: ReportedStudy) -> list[str]:
    """Every rule's verdict: a summary table, then each rule's sentence and seeds."""
    verdicts = [study.verdict(rule) for rule in study.plan.rules]
    lines = ["## Verdicts", "",
             markdown_table(["rule", "reading", "arm against control, paired (95%)",
                             "must clear", "outcome"],
                            [v.summary_cells() for v in verdicts]), ""]
    for rule, verdict in zip(study.plan.rules, verdicts, strict=True):
        lines += [f"- {verdict.sentence()}", "", _per_seed_table(study, rule), ""]
    return lines


def _order(study: ReportedStudy) -> list[str]:
    problems = plan_precedes(study.plan_path, study.all_runs())
    return ["## Order", "", "The plan's commit precedes every run's: " +
            ("yes." if not problems else "**no**:"), "", *[f"- {p}" for p in problems]]


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


def time_to_go(runs_left: int, finished: Sequence[Path]) -> str:
    """How much of a study is left, in runs and, from the finished runs' own round
    timings, in hours (``sfedlora study --stage status``)."""
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


def _what_ran(study: ReportedStudy) -> list[str]:
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


def _per_seed_table(study: ReportedStudy, rule: Rule) -> str:
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


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
