"""A study's plan, fixed before its first run, and the verdicts it allows.

A plan (``plan.yaml`` in the study's folder under ``docs/results/``) says, before any
of the study's runs exist: the question, the arms (each a list of settings), the
settings every arm shares (the budget), the ladder each arm is tuned on (on
validation data, with the selection seeds only), the seeds that choose (never
reported) and the at least five seeds that report, the evaluation rounds (the same
for every arm), the metrics, and each decision rule: which arm against which control,
on which reading, by what margin.

Readings that count a crossing (seconds or bytes to a target line) count it only when
the line holds for ``hold`` consecutive evaluations (3 by default), so a single lucky
evaluation decides nothing; each such rule also reads the metric at a fixed time or
byte budget. A verdict is the paired difference by seed with its 95% interval: the arm
wins when the interval clears the margin, the control when it falls below minus the
margin, and otherwise it is unresolved.

:func:`plan_precedes` checks the order in git: the commit that added the plan is an
ancestor of the commit every run of the study names in its ``environment.jsonl``.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sfedlora.settings.loading import read_yaml
from sfedlora.studies import runs, stats

MIN_REPORTING_SEEDS = 5
# what an arm may not set for itself: every arm is evaluated on the same rounds, runs
# the same budget and is reported on the plan's seeds
SHARED_KEYS = ("rounds", "seed", "eval.every", "eval.at_start")

Reading = Literal["final", "at_seconds", "at_bytes", "seconds_to", "bytes_to"]
X_OF = {"at_seconds": "simulated_seconds", "seconds_to": "simulated_seconds",
        "at_bytes": "bytes_total", "bytes_to": "bytes_total"}


class PlanError(ValueError):
    """A plan that cannot be followed; the message names the field and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


BASELINE = "baseline:"  # a control that is a figure of the arm's own runs


class Rule(_Model):
    """One decision: ``arm`` against ``control`` on ``reading`` of ``metric``. The
    control is another arm, or ``baseline:<key>``: the summary figure ``key`` of the
    arm's own runs (``baseline:majority_baseline_accuracy``: does the arm learn beyond
    always predicting its client's majority label?)."""

    name: str
    arm: str
    control: str
    metric: str = "personalized_accuracy"
    reading: Reading = "final"
    budget: float | None = Field(None, gt=0, description="at_seconds / at_bytes: the budget")
    line: float | None = Field(None, description="seconds_to / bytes_to: the target line")
    line_below_control: float | None = Field(
        None, ge=0, description="seconds_to / bytes_to: instead of a fixed line, the "
        "control's final metric minus this, per seed (0.01: equal accuracy within a point)")
    line_arm: str | None = Field(
        None, description="line_below_control: draw the line below this arm's final "
        "metric instead of the control's (every arm read at one arm's line)")
    compare: Literal["difference", "ratio"] = Field(
        "difference", description="difference: arm minus control, which must clear the "
        "margin; ratio: how many times better the arm's reading is (control / arm where "
        "less is better), whose interval must clear the target")
    target: float | None = Field(None, gt=0, description="compare=ratio: the ratio to reach")
    hold: int = Field(3, gt=0, description="consecutive evaluations the line must hold")
    higher_is_better: bool = True  # of the metric (a loss: false)
    margin: float = Field(0.0, ge=0, description="the difference the interval must clear")
    mechanism: str = Field(description="the one-line mechanism the rule tests")

    @model_validator(mode="after")
    def _reading_needs(self) -> Rule:
        if self.reading.startswith("at_") and self.budget is None:
            raise ValueError(f"rule {self.name!r}: reading={self.reading} needs a budget")
        if self.reading.endswith("_to") and (self.line is None) == \
                (self.line_below_control is None):
            raise ValueError(f"rule {self.name!r}: reading={self.reading} needs a line, "
                             "or line_below_control (not both)")
        if (self.compare == "ratio") != (self.target is not None):
            raise ValueError(f"rule {self.name!r}: compare=ratio goes with a target, and "
                             "a target with compare=ratio")
        if self.line_arm is not None and self.line_below_control is None:
            raise ValueError(f"rule {self.name!r}: line_arm goes with line_below_control")
        if self.line_below_control is not None and self.line_arm is None and \
                self.control.startswith(BASELINE):
            raise ValueError(f"rule {self.name!r}: line_below_control needs an arm as the "
                             "control")
        return self

    @property
    def lower_wins(self) -> bool:
        """Whether a smaller reading is better: seconds or bytes to a line, or a metric
        where lower is better."""
        return self.reading.endswith("_to") or not self.higher_is_better

    def ratio(self, arm: float, control: float) -> float:
        """How many times better the arm's reading is than the control's (control / arm
        where less is better)."""
        better, worse = (control, arm) if self.lower_wins else (arm, control)
        return better / worse if worse else math.inf

    @property
    def baseline(self) -> str | None:
        """The summary key a ``baseline:`` control reads; None when it is an arm."""
        return self.control.removeprefix(BASELINE) if self.control.startswith(BASELINE) \
            else None


class Arm(_Model):
    """An arm's settings; ``rung_from`` names another arm whose chosen rung this one
    runs instead of being tuned (what reusing a rate tuned elsewhere costs: an arm at
    r=256 run at the rate r=4 chose, against the same arm tuned at r=256)."""

    settings: list[str]
    rung_from: str | None = None


class Plan(_Model):
    question: str
    config: str = Field(description="the base config every run starts from, relative to "
                        "the repository root")
    arms: dict[str, Arm] = Field(description="arm name -> its settings (a list), or "
                                 "{settings: [...], rung_from: ARM}")
    common: list[str] = Field(default_factory=list, description="settings every arm shares")
    ladder: dict[str, list[float]] = Field(
        default_factory=dict, description="setting -> values each arm is tuned over")
    tune_on: str = Field("personalized_val_loss", description="the summary figure (of "
                         "validation data) choosing a rung: lowest mean over the selection "
                         "seeds wins (highest with tune_higher_is_better)")
    tune_higher_is_better: bool = Field(False, description="the tune_on figure is an "
                                        "accuracy rather than a loss")
    extend: int = Field(2, ge=0, description="a one-setting ladder whose choice sits at an "
                        "end gains a rung past it (the end rungs' ratio), at most this many")
    selection_seeds: list[int] = Field(description="seeds that choose; never reported")
    reporting_seeds: list[int] = Field(description="seeds that report")
    rounds: int = Field(gt=0)
    eval_every: int = Field(gt=0, description="every arm is evaluated on these rounds")
    metrics: list[str]
    rules: list[Rule]
    decision: str = Field("", description="how the rules' outcomes answer the question, "
                          "in words, fixed with the rules")

    @model_validator(mode="before")
    @classmethod
    def _arms_as_lists(cls, data):
        """An arm given as a bare list of settings is an arm tuned on its own."""
        if isinstance(data, dict) and isinstance(data.get("arms"), dict):
            data = {**data, "arms": {name: {"settings": arm} if isinstance(arm, list) else arm
                                     for name, arm in data["arms"].items()}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if len(set(self.reporting_seeds)) < MIN_REPORTING_SEEDS:
            raise ValueError(f"reporting_seeds: {len(set(self.reporting_seeds))} distinct "
                             f"seeds; a verdict needs at least {MIN_REPORTING_SEEDS}")
        if shared := sorted(set(self.selection_seeds) & set(self.reporting_seeds)):
            raise ValueError(f"seeds {shared} both choose and report; a seed that chose a "
                             "setting must not report it: use fresh reporting seeds")
        for name, arm in self.arms.items():
            source = self.arms.get(arm.rung_from) if arm.rung_from else None
            if arm.rung_from and (source is None or source.rung_from):
                raise ValueError(f"arm {name}: rung_from={arm.rung_from!r} must name an arm "
                                 "that is tuned itself")
        for arm, settings in {"common": self.common,
                              **{n: a.settings for n, a in self.arms.items()}}.items():
            if own := [s for s in settings if s.split("=")[0] in (*SHARED_KEYS, *self.ladder)]:
                raise ValueError(f"{arm} sets {own}: rounds, seeds, evaluation rounds and "
                                 "the ladder's settings are the plan's, the same for every "
                                 "arm; remove them from the arm")
        for rule in self.rules:
            named = ((rule.arm,) if rule.baseline else (rule.arm, rule.control)) + \
                ((rule.line_arm,) if rule.line_arm else ())
            missing = [a for a in named if a not in self.arms]
            if missing:
                raise ValueError(f"rule {rule.name!r} names arm(s) {missing}, which the plan "
                                 f"does not have (arms: {sorted(self.arms)})")
        return self

    @property
    def eval_rounds(self) -> list[int]:
        """The rounds every arm is evaluated on (the last always)."""
        return sorted({*range(self.eval_every, self.rounds + 1, self.eval_every), self.rounds})

    def arm_settings(self, arm: str) -> list[str]:
        """An arm's settings but the rung and seed: the common ones, the arm's and the
        plan's rounds and evaluation rounds."""
        return [*self.common, *self.arms[arm].settings, f"rounds={self.rounds}",
                f"eval.every={self.eval_every}", "eval.at_start=false"]

    def settings(self, arm: str, seed: int, rung: dict[str, float] | None = None
                 ) -> list[str]:
        """The settings of one run: :meth:`arm_settings`, the rung's and the seed."""
        return [*self.arm_settings(arm), *(f"{k}={v}" for k, v in (rung or {}).items()),
                f"seed={seed}"]


def load_plan(path: Path) -> Plan:
    """The plan in ``path`` (YAML), or a :class:`PlanError` naming what is wrong."""
    try:
        return Plan.model_validate(read_yaml(Path(path).read_text()))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}"
                             for e in exc.errors())
        raise PlanError(f"{path}: {problems}") from None


# --- readings -----------------------------------------------------------------------


# Readings are means of counts (k/n) and lines are sums of floats, so both carry
# rounding of about 1e-16; real differences between evaluations are at least 1/n.
ROUNDING = 1e-9


def sustained_crossing(points: Sequence[tuple[float, float]], line: float, hold: int = 3,
                       higher_is_better: bool = True) -> float:
    """``x`` of the first evaluation from which the metric is on the good side of
    ``line`` for ``hold`` consecutive evaluations; inf if it never is (a run too short
    to hold counts as not crossing). A value within float rounding of the line is on
    it: an accuracy of 406/500 read as 0.8119999999999999 against a line of
    0.822 - 0.01 = 0.812 is at the line, as the rule means."""
    run = 0
    for i, (_, value) in enumerate(points):
        good = value >= line - ROUNDING if higher_is_better else value <= line + ROUNDING
        run = run + 1 if good else 0
        if run == hold:
            return points[i - hold + 1][0]
    return math.inf


def value_at(points: Sequence[tuple[float, float]], budget: float) -> float:
    """The metric at the last evaluation within ``budget`` of ``x``; nan if none is."""
    within = [value for x, value in points if x <= budget]
    return within[-1] if within else math.nan


def final_value(metric: str, metrics: Sequence[dict]) -> float:
    """The metric at a run's last evaluation."""
    return [m[metric] for m in metrics if m.get(metric) is not None][-1]


def reading(rule: Rule, metrics: Sequence[dict], line: float | None = None) -> float:
    """What ``rule`` reads of one run's metrics lines (``line``: the seed's line, for a
    rule whose line is drawn below its control)."""
    if rule.reading == "final":
        return final_value(rule.metric, metrics)
    x = X_OF[rule.reading]
    points = [(m[x], m[rule.metric]) for m in metrics
              if m.get(rule.metric) is not None and x in m]
    if rule.reading.startswith("at_"):
        return value_at(points, rule.budget)
    line = rule.line if line is None else line
    if line is None:
        raise PlanError(f"rule {rule.name!r}: its line is drawn below the control's final "
                        "metric; pass the seed's line")
    return sustained_crossing(points, line, rule.hold, rule.higher_is_better)


# --- verdicts ------------------------------------------------------------------------


SHORT = "short of the margin"  # a verdict whose interval lies wholly below a margin > 0


@dataclass(frozen=True)
class Verdict:
    rule: Rule
    mean: float  # of arm - control, paired by seed
    half_width: float  # of its 95% t-interval
    seeds: list[int]
    never: dict[str, int]  # runs per arm that never held the line (a *_to reading)

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% interval: of the difference, or of the ratio (a ratio's interval is
        the exponential of its log's, so the mean is the geometric mean)."""
        low, high = self.mean - self.half_width, self.mean + self.half_width
        return (math.exp(low), math.exp(high)) if self.rule.compare == "ratio" else (low, high)

    @property
    def outcome(self) -> str:
        """``arm``, ``control``, :data:`SHORT` (the interval lies below a positive margin:
        the arm is not better by the margin) or ``unresolved``; for a
        ratio, ``met``, ``missed`` or ``unresolved`` against its target. A seed whose arm
        never held its line misses a ratio target outright."""
        if self.rule.compare == "ratio":
            if self.never.get(self.rule.arm):
                return "missed"
            if self.never:
                return "unresolved"
            low, high = self.interval
            return "met" if low >= self.rule.target else \
                "missed" if high < self.rule.target else "unresolved"
        if self.never:
            return "unresolved"
        low, high = self.mean - self.half_width, self.mean + self.half_width
        sign = -1 if self.rule.lower_wins else 1  # make "arm better" a positive gap
        low, high = sorted((sign * low, sign * high))
        if low > self.rule.margin:
            return self.rule.arm
        if high < -self.rule.margin:
            return self.rule.control
        if high < self.rule.margin:  # the arm may be better, but not by the margin
            return SHORT
        return "unresolved"

    def sentence(self) -> str:
        if self.rule.compare == "ratio":
            return self._ratio_sentence()
        r = self.rule
        winner = {r.arm: f"{r.arm} wins", r.control: f"{r.control} wins",
                  SHORT: f"the whole interval lies below {r.margin:g}: {r.arm} falls short "
                  "of the margin"}.get(self.outcome, "unresolved")
        never = "".join(f"; {note}" for note in self._never_notes())
        figure = (f"= {self.mean:+.4f} ± {self.half_width:.4f} (95%, paired over seeds "
                  f"{self.seeds}{never})") if not math.isnan(self.mean) else (
                  f"has no paired interval over seeds {self.seeds}{never}")
        return (f"{r.name}: {r.arm} - {r.control} on {r.reading} {r.metric} {figure}; "
                f"rule: the interval must clear {r.margin:g}; {winner}. "
                f"Mechanism: {r.mechanism}")

    def _never_notes(self) -> list[str]:
        return [f"{n} run(s) of {a} never held the line" for a, n in self.never.items()]

    def summary_cells(self) -> list[str]:
        """The verdict as one row of a summary table: the rule, what was read, the
        paired figure with its 95% interval, and the outcome."""
        r = self.rule
        figures = self._never_notes()
        if r.compare == "ratio" and not math.isnan(self.mean):
            low, high = self.interval
            figures.insert(0, f"{math.exp(self.mean):.2f}x ({low:.2f}x to {high:.2f}x)")
        elif not math.isnan(self.mean):
            figures.insert(0, f"{self.mean:+.4f} ± {self.half_width:.4f}")
        clear = f"{r.target:g}x" if r.compare == "ratio" else f"{r.margin:g}"
        outcome = f"{self.outcome} wins" if self.outcome in (r.arm, r.control) \
            else self.outcome
        return [r.name, f"{r.reading} {r.metric}", "; ".join(figures) or "-", clear, outcome]

    def _ratio_sentence(self) -> str:
        r = self.rule
        never = "".join(f"; {note}" for note in self._never_notes())
        figure = "" if math.isnan(self.mean) else (
            f" = {math.exp(self.mean):.2f}x (95% interval {self.interval[0]:.2f}x to "
            f"{self.interval[1]:.2f}x, geometric mean over seeds {self.seeds})")
        return (f"{r.name}: {r.arm} against {r.control} on {r.reading} {r.metric}"
                f"{figure}{never}; rule: the interval must clear {r.target:g}x; "
                f"{self.outcome}. Mechanism: {r.mechanism}")


def decide(rule: Rule, arm: dict[int, float], control: dict[int, float],
           seeds: Sequence[int]) -> Verdict:
    """The rule's verdict from each reporting seed's reading of the two arms. Every
    seed must have both; a run that never held its line (inf) leaves the verdict
    unresolved and is counted."""
    missing = [s for s in seeds if s not in arm or s not in control]
    if missing:
        raise PlanError(f"rule {rule.name!r}: no reading for seed(s) {missing}; run them "
                        "before deciding")
    never = {name: sum(math.isinf(values[s]) for s in seeds)
             for name, values in ((rule.arm, arm), (rule.control, control))}
    never = {name: n for name, n in never.items() if n}
    if never:
        return Verdict(rule, math.nan, math.nan, list(seeds), never)
    if rule.compare == "ratio":  # log of how many times better, paired by seed
        mean, half = stats.mean_ci([math.log(rule.ratio(arm[s], control[s])) for s in seeds])
        return Verdict(rule, mean, half, list(seeds), {})
    mean, half = stats.paired_difference([arm[s] for s in seeds], [control[s] for s in seeds])
    return Verdict(rule, mean, half, list(seeds), {})


# --- provenance -------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False, timeout=60)


def plan_commit(plan_path: Path) -> str | None:
    """The commit that first added ``plan_path``; None if git does not know it."""
    path = Path(plan_path).resolve()
    done = _git(path.parent, "log", "--diff-filter=A", "--format=%H", "--follow", "--",
                path.name)
    commits = done.stdout.split()
    return commits[-1] if done.returncode == 0 and commits else None


def run_commits(run_dir: Path) -> set[str]:
    """The source commits a run's processes named in ``environment.jsonl``."""
    return {runs.commit(r) for r in runs.environments(run_dir)} - {None}


def plan_precedes(plan_path: Path, run_dirs: Sequence[Path]) -> list[str]:
    """What breaks "the plan was committed before every run": each problem as a line
    (a run naming no commit, or a commit the plan's commit is not an ancestor of);
    empty when the order holds."""
    first = plan_commit(plan_path)
    if first is None:
        return [f"{plan_path} is not committed"]
    repo = Path(plan_path).resolve().parent
    problems = []
    for run in run_dirs:
        commits = run_commits(run)
        if not commits:
            problems.append(f"{run}: its environment.jsonl names no commit")
        for commit in sorted(commits):
            if _git(repo, "merge-base", "--is-ancestor", first, commit).returncode != 0:
                problems.append(f"{run}: ran at {commit[:10]}, which does not follow the "
                                f"plan's commit {first[:10]}")
    return problems
