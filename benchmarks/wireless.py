"""Wireless federated fine-tuning: accuracy against simulated time and bytes (issue 18).

SST-2, 10 clients, Dirichlet(0.5), all-MiniLM-L6-v2, over the narrow-band uplink of
``configs/wireless_sst2.yaml`` (``network.model=wireless``; equal seeds give every arm
the same partitions, placements and fading). Arms:

- ``fedit-dense``: FedIT, nothing compressed;
- ``fedit-dense-r4``: the same at rank 4, the rank TSFA's offline stage chose: what the
  rank alone does to time and accuracy (a reference; the lines stay the dense arm's);
- ``flasc``: FLASC, top-k 1/4 both ways;
- ``fedit-topk-ab``: FedIT with elementwise top-k of A and B separately
  (``comm.up.per_tensor``), at the density whose bytes match ``soft-k25``'s;
- ``soft-k25``, ``soft-k50``: SOFT at keep ratios 1/4 and 1/2, equal bandwidth;
- ``soft-svd``: SOFT at 1/4 with the SVD importance (``options.importance=svd``);
- ``tsfa``: TSFA, its latency budget ``BUDGET_SHARE`` of the dense arm's mean round
  latency (seed 0 at the dense arm's chosen rate), min-max bandwidth split, V = 1. Its
  rank is the config's (8), with the online stage alone (the planned arms below add
  the offline stage);
- ``tsfa-v4``, ``tsfa-v16``: TSFA at V = 4 and 16;
- ``tsfa-ef``: TSFA at V = 1 with error feedback (``comm.up.error_feedback``: the
  change of the components a round did not send is added to the client's next upload).
- ``tsfa-plan``, ``tsfa-plan-ef``: TSFA with both stages, without and with feedback: the
  rank its offline stage chose (``tsfa-plan.json`` beside the arms, made once from the
  study's config and budget by :func:`sfedlora.methods.soft.plan.make_plan`, read by
  every run through ``options.plan``), then the same online stage.

The TSFA arms' settings (rank, V, error feedback) are chosen like the rate: the report
takes the TSFA arm with the lowest seed-0 validation loss among those whose seed-0 mean
round latency is within 5% of the budget (:func:`choose_tsfa`), and reads TSFA's
targets from it.

TSFA's target is a time, not a round count, so the ``timed`` stage runs each TSFA
arm's chosen rate on past the 12 rounds every arm is tuned at (``TIMED``: 18 rounds,
evaluated every round) for seeds 0-2. The local schedule is constant and every draw is
seeded by (seed, round, client), so these runs repeat the tuned runs' first 12 rounds
(the report checks it) and only add rounds; the time at which TSFA first reaches the
line is read from them, at round resolution.

The ``confirm`` stage checks the TSFA verdicts on fresh seeds (``CONFIRM_SEEDS``: 3, 4,
5, never used to tune or choose anything): the dense arm at its chosen rate (12 rounds,
for the seeds' lines and half-times) and the TSFA arm chosen under each reading of the
latency target (two-sided, the study's rule, and one-sided) at its chosen rate, run to
``TIMED``. Both readings' verdicts are printed for every confirmed arm.

Every arm is tuned as in ``benchmarks/methods.py`` (the same ladder, chosen on the
clients' validation loss, seeds 1 and 2 at the chosen rate). The report gives per arm
the final personalised accuracy (mean ± 95% t-interval over 3 seeds), simulated
seconds and megabytes per run, the simulated time at which it first reached the
dense arm's final accuracy minus 1 point, each client's median seconds of local work
per round (what an importance rule costs), and for TSFA its mean round latency over
the budget. It checks the targets (TSFA: that accuracy in at most half the dense arm's
time; mean latency within 5% of the budget) and draws accuracy against simulated time
(mean over seeds) to ``docs/results/wireless/sst2-<size>/accuracy_vs_time.png``.

    python benchmarks/wireless.py --stage all [--size cpu|smoke] [--arms ...]
    python benchmarks/wireless.py --stage timed    # TSFA's runs past 12 rounds
    python benchmarks/wireless.py --stage confirm  # the TSFA verdicts on fresh seeds
    python benchmarks/wireless.py --stage report   # tables and figure from the runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from sfedlora.config import load_config
from sfedlora.methods.soft.options import TsfaOptions
from sfedlora.studies import readings, verdicts
from sfedlora.studies import runs as run_files
from sfedlora.studies.plots import save_figure
from sfedlora.studies.tables import values_pm
from sfedlora.studies.tuning import SEEDS, Study, Tuning, repeats, run_study, study_parser

ROOT = Path(__file__).resolve().parents[1]

DENSE, TSFA = "fedit-dense", "tsfa"
BUDGET_SHARE = 0.4  # TSFA's latency budget, as a share of the dense arm's mean latency
ARMS: dict[str, list[str]] = {
    DENSE: ["method=fedit"],
    "flasc": ["method=flasc", "comm.down.density=0.25", "comm.up.density=0.25"],
    # SOFT at 1/4 sends 1/4 of A and B plus component indices; elementwise top-k pays
    # a position per value (a bitmap: 1/32 of a float each), so 0.22 matches its bytes
    "fedit-topk-ab": ["method=fedit", "comm.up.density=0.22", "comm.up.per_tensor=true"],
    # dense FedIT at the rank TSFA's offline stage chose (4): a reference for what the
    # rank alone buys, not a TSFA candidate and not the line the targets are read at
    "fedit-dense-r4": ["method=fedit", "lora.rank=4"],
    "soft-k25": ["method=soft", "options.keep=0.25"],
    "soft-k50": ["method=soft", "options.keep=0.5"],
    "soft-svd": ["method=soft", "options.keep=0.25", "options.importance=svd"],
    TSFA: ["method=tsfa", "network.allocation=min_max"],  # + the budget (tsfa_budget)
    # TSFA's V on a ladder 4x apart (V = 1 is the config default, the arm above); the
    # report chooses one on validation loss within the latency target (choose_tsfa)
    "tsfa-v4": ["method=tsfa", "network.allocation=min_max", "options.v=4.0"],
    "tsfa-v16": ["method=tsfa", "network.allocation=min_max", "options.v=16.0"],
    # TSFA (V = 1) keeping what a round did not send for a later round, SOFT's optional
    # error feedback; chosen or not by the same rule as V (choose_tsfa)
    "tsfa-ef": ["method=tsfa", "network.allocation=min_max", "comm.up.error_feedback=true"],
    # TSFA with its offline stage too: + the planned rank and the plan (planned_overrides)
    "tsfa-plan": ["method=tsfa", "network.allocation=min_max"],
    "tsfa-plan-ef": ["method=tsfa", "network.allocation=min_max",
                     "comm.up.error_feedback=true"],
}
PLANNED = ("tsfa-plan", "tsfa-plan-ef")
PLAN = "tsfa-plan.json"  # beside the arms' folders
TSFA_ARMS = tuple(arm for arm, overrides in ARMS.items() if "method=tsfa" in overrides)
CONFIGS = {"sst2": "configs/wireless_sst2.yaml"}
SIZES = {
    "cpu": (),
    "smoke": ("rounds=2", "local.steps=1", "eval.every=1", "checkpoint.every=0",
              "data.max_train_examples=600", "data.max_test_examples=40"),
}
OUT = ROOT / "docs/results/wireless"
LATENCY_TOLERANCE = 0.05  # TSFA's target: mean round latency within 5% of the budget
TARGET_DROP = 0.01  # TSFA's target: the dense arm's final accuracy minus 1 point
# past half the dense arm's time in every seed (TSFA's rounds take about 1.45 s against
# dense's 3.6 s, so half the dense time is about round 15)
REPEATED = ("personalized_accuracy", "simulated_seconds", "bytes_total")
TIMED = {"cpu": ("rounds=18", "eval.every=1"), "smoke": ("rounds=3",)}
CONFIRM_SEEDS = (3, 4, 5)  # the confirm stage's fresh seeds (tuning used 0-2)


def reader(args) -> Tuning:
    """The study's runs on the command line's size and output folder (for reading:
    which overrides made them does not matter)."""
    return Tuning.from_args(Study(ARMS, CONFIGS, SIZES, root=ROOT), args)


def tuning(args, arm: str) -> Tuning:
    """The study as ``arm`` runs it (TSFA's arms with the budget the dense arm set)."""
    return Tuning.from_args(study(argparse.Namespace(**{**vars(args), "arms": [arm]})), args)


def study(args) -> Study:
    arms = dict(ARMS)
    if set(TSFA_ARMS) & set(args.arms):
        budget = f"options.latency_budget_s={tsfa_budget(args)!r}"
        arms.update({arm: [*ARMS[arm], budget] for arm in TSFA_ARMS})
        if set(PLANNED) & set(args.arms):
            planned = planned_overrides(args, budget)
            arms.update({arm: [*arms[arm], *planned] for arm in PLANNED})
    return Study(arms, CONFIGS, SIZES, root=ROOT)


def plan_path(args) -> Path:
    return reader(args).arm_dir(DENSE).parent / PLAN


def planned_overrides(args, budget: str) -> list[str]:
    """The planned arms' rank and plan: TSFA's offline stage (``sfedlora tsfa-plan``) on
    the study's config under the TSFA arms' budget, made once (the report stage never
    makes it) and kept, so that every run and shard reads the same choice."""
    from sfedlora.methods.soft.plan import make_plan, read_plan
    from sfedlora.runtime.simulation import run_rounds

    path = plan_path(args)
    if not path.exists():
        if args.stage == "report":
            return []
        cfg = load_config(ROOT / CONFIGS[args.dataset],
                          [*ARMS[TSFA], budget, *SIZES[args.size], *args.overrides])
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_text(json.dumps(make_plan(cfg, run_rounds), indent=1) + "\n")
        part.replace(path)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path  # runs from ROOT
    return [f"lora.rank={read_plan(path)['rank']}", f"options.plan={shown}"]


def plan_table(args) -> list[str]:
    """The offline stage's pilots and choice, from the committed plan."""
    from sfedlora.methods.soft.plan import read_plan

    if not (path := plan_path(args)).exists():
        return []
    plan = read_plan(path)
    rows = [f"| {p['rank']} | {p['first_loss']:.4f} | {p['last_loss']:.4f} | "
            f"{p['loss_ratio_per_round']:.4f} | {p['variance']:.4f} | "
            f"{p['latency_s_at_min_keep']:.3f} | {p['bound']:.4f} | "
            f"{'yes' if p['feasible'] else 'no'} |" for p in plan["pilots"]]
    return [f"TSFA's offline stage ({PLAN}: SOFT pilots of {len(plan['pilots'])} ranks, "
            f"budget {plan['latency_budget_s']:.3f} s, bound {plan['bound']}): rank "
            f"**{plan['rank']}** for the planned arms ({', '.join(PLANNED)}).", "",
            "| rank | first loss | last loss | q / round | v | T at min keep (s) | bound "
            "| within budget |", "|---|---|---|---|---|---|---|---|", *rows]


def timed(args) -> bool:
    """The ``timed`` stage: each TSFA arm at its chosen rate, seeds 0-2, run to
    ``TIMED``."""
    if args.stage not in ("timed", "all"):
        return True
    return _run_on(args, [a for a in TSFA_ARMS if a in args.arms], "timed",
                   lambda arm: TIMED[args.size])


def _run_on(args, arms: list[str], stage: str, extra: Callable[[str], tuple[str, ...]],
            seeds: tuple[int, ...] = (0, *SEEDS)) -> bool:
    """Each of ``arms`` at its chosen rate for ``seeds``, with ``extra(arm)`` overrides,
    into ``<arm>/<stage>/runs/``; False while other shards still hold some runs."""
    done = True
    for arm in arms:
        done &= tuning(args, arm).run_on(arm, stage, extra(arm), seeds)
    return done


def chosen_by_reading(candidates: list[Candidate]) -> dict[str, str]:
    """The TSFA arm each reading of the latency target chooses, the study's rule
    first: {arm: the readings that chose it}."""
    reading: dict[str, str] = {}
    for name, arm in (("the study's two-sided", pick_tsfa(candidates)),
                      ("the one-sided", pick_tsfa(candidates, at_most_over_budget))):
        if arm is not None:
            reading[arm] = f"{reading[arm]} and {name}" if arm in reading else name
    return reading


def confirmed_arms(args) -> list[str]:
    """The arms the ``confirm`` stage runs: the dense arm (the lines and half-times)
    and the TSFA arm chosen under each reading of the latency target."""
    return [DENSE, *chosen_by_reading(tsfa_candidates(args))]


def confirm(args) -> bool:
    """The ``confirm`` stage: :func:`confirmed_arms` at their chosen rates on
    ``CONFIRM_SEEDS``, the dense arm at its tuned length, TSFA run to ``TIMED``."""
    if args.stage not in ("confirm", "all"):
        return True
    return _run_on(args, confirmed_arms(args), "confirm",
                   lambda arm: () if arm == DENSE else TIMED[args.size], CONFIRM_SEEDS)


def tsfa_budget(args) -> float:
    """``BUDGET_SHARE`` of the dense arm's mean round latency (seed 0, chosen rate)."""
    dense = [r for r in reader(args).chosen_runs(DENSE) if load_config(r / "config.yaml").seed == 0]
    if not dense:
        raise SystemExit(f"the {TSFA} arm's budget comes from the {DENSE} arm: run its "
                         f"ladder first (--arms {DENSE})")
    latencies = [m["latency_seconds"] for m in run_files.metrics(dense[0])]
    return round(BUDGET_SHARE * statistics.fmean(latencies), 6)


def _curve(run: Path) -> list[tuple[float, float]]:
    """(simulated seconds, personalised accuracy) at every evaluated round."""
    return readings.curve(run, "simulated_seconds")


def _local_seconds(run: Path) -> float:
    """Median over rounds of the round's training wall time per client (every client
    trains every round here)."""
    per_round = load_config(run / "config.yaml").clients_per_round
    timings = run_files.timings(run)
    return statistics.median(t["train"] / per_round for t in timings)


def report(args) -> str:
    """Per arm: final accuracy, simulated time, bytes, local seconds, and the simulated
    time at which each seed first reached the dense arm's final accuracy minus 1 point
    at the same seed (the same partition, placements and fading), and at the mean
    line (the dense arm's mean final minus 1 point) for the figure."""
    dense = reader(args).chosen_by_seed(DENSE)
    if not dense:
        raise SystemExit(f"no finished {DENSE} runs under {reader(args).arm_dir(DENSE)}")
    line, dense_time, mean_line = lines_and_times(dense)
    lines = [f"Lines: {DENSE}'s final accuracy minus {TARGET_DROP:.2f} per seed "
             f"({', '.join(f'{s}: {v:.4f}' for s, v in sorted(line.items()))}; mean "
             f"{mean_line:.3f}); {DENSE} ran {statistics.fmean(dense_time.values()):.1f} "
             "simulated s.", "",
             *TABLE_HEAD]
    chosen, choice = choose_tsfa(args)
    choice += ["", *rate_check(args)]
    if set(PLANNED) & set(args.arms) and (plan := plan_table(args)):
        choice += ["", *plan]
    curves, verdicts = {}, {}
    for arm in args.arms:
        runs = reader(args).chosen_by_seed(arm)
        if not runs:
            continue
        lines.append(_row(arm, runs, line, mean_line))
        drawn = arm not in TSFA_ARMS or arm == chosen  # of TSFA, the arm chosen
        if drawn:
            curves[arm] = [_curve(r) for r in runs.values()]
        if arm in TSFA_ARMS and (longer := reader(args).stage_runs(arm, "timed")):
            last = run_files.metrics(next(iter(longer.values())))[-1]["round"]
            label = f"{arm}, run on to {last} rounds"
            lines.append(_row(label, longer, line, mean_line))
            if drawn:
                curves[label] = [_curve(r) for r in longer.values()]
    for arm in (a for a in TSFA_ARMS if a in args.arms):
        if runs := reader(args).chosen_by_seed(arm):
            verdicts[arm] = tsfa_verdicts(args, arm, runs, line, dense_time)
    figure(curves, mean_line, Path(args.out) / f"sst2-{args.size}" / "accuracy_vs_time.png")
    headline = ([f"**{chosen}** (chosen on validation):", *verdicts.pop(chosen)]
                if chosen in verdicts else [])
    others = [row for arm, text in verdicts.items()
              for row in (f"{arm} (not chosen):", *text, "")]
    return "\n".join([*lines, "", *choice, "", *headline, "", *others,
                      *confirmation(args)]).rstrip()


def lines_and_times(dense: dict[int, Path]) -> tuple[dict[int, float], dict[int, float],
                                                     float]:
    """From the dense arm's runs by seed: each seed's line (its final accuracy minus
    ``TARGET_DROP``), its simulated time, and the mean line."""
    line = {s: _curve(r)[-1][1] - TARGET_DROP for s, r in dense.items()}
    dense_time = {s: run_files.metrics(r)[-1]["simulated_seconds"] for s, r in dense.items()}
    return line, dense_time, statistics.fmean(line.values())


class Candidate(NamedTuple):
    """One TSFA arm's seed-0 tuned run at its chosen rate, as :func:`choose_tsfa` sees
    it."""

    arm: str
    rank: int
    v: float
    error_feedback: bool
    lr: float
    val_loss: float | None
    latency_ratio: float  # mean round latency over the budget


def within_budget(latency_ratio: float) -> bool:
    """TSFA's latency target as the study reads it: the mean round latency within 5% of
    the budget on either side (the online stage should spend its budget, not only stay
    under it)."""
    return verdicts.within(latency_ratio, LATENCY_TOLERANCE)


def at_most_over_budget(latency_ratio: float) -> bool:
    """The one-sided reading of the latency target: at most 5% over the budget. Not the
    study's rule; :func:`choose_tsfa` reports what it would choose."""
    return verdicts.at_most_over(latency_ratio, LATENCY_TOLERANCE)


def pick_tsfa(candidates: list[Candidate],
              admissible: Callable[[float], bool] = within_budget) -> str | None:
    """The candidate with the lowest validation loss among those whose latency ratio is
    ``admissible`` (ties: the first); None if none is."""
    return verdicts.lowest_admissible(candidates, admissible)


def tsfa_candidates(args) -> list[Candidate]:
    """Each TSFA arm's seed-0 tuned run at its chosen rate, as the choice sees it."""
    candidates = []
    for arm in (a for a in TSFA_ARMS if a in args.arms):
        if not (chosen := reader(args).chosen_runs(arm)):
            continue
        run = chosen[0]  # the ladder's seed-0 run at the chosen rate
        cfg = load_config(run / "config.yaml")
        val = run_files.summary(run).get("personalized_val_loss")
        options = TsfaOptions.model_validate(cfg.options)
        candidates.append(Candidate(arm, cfg.lora.rank, options.v,
                                    cfg.codec("up").error_feedback,
                                    cfg.local.lr, val,
                                    readings.mean_latency(run) / options.latency_budget_s))
    return candidates


def choose_tsfa(args) -> tuple[str | None, list[str]]:
    """TSFA's rank, V and error feedback, chosen like a learning rate: among the TSFA
    arms (each at its own chosen rate), the one whose seed-0 tuned run has the lowest
    mean **validation** loss, among those whose seed-0 mean round latency is within 5%
    of the budget (the latency target is a constraint, the accuracy the objective; no
    test figure enters). Returns the arm and a table of the candidates."""
    candidates = tsfa_candidates(args)
    chosen_arm = pick_tsfa(candidates)
    one_sided = pick_tsfa(candidates, at_most_over_budget)
    table = ["TSFA's settings (rank, V, error feedback), chosen on seed 0's validation loss among "
             "the arms whose mean round latency is within 5% of the budget:", "",
             "| arm | rank | V | error feedback | lr | val loss (seed 0) | latency / budget "
             "(seed 0) | within 5% | chosen |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {c.arm} | {c.rank} | {c.v:g} | {'yes' if c.error_feedback else 'no'} | "
              f"{c.lr:.1e} | "
              f"{'none' if c.val_loss is None else f'{c.val_loss:.4f}'} | {c.latency_ratio:.3f} "
              f"| {'yes' if within_budget(c.latency_ratio) else 'no'} | "
              f"{'**yes**' if c.arm == chosen_arm else ''} |" for c in candidates]
    if one_sided != chosen_arm:
        table += ["", f"Chosen if the latency target were one-sided (mean latency at most 5% "
                      f"over the budget; a check of the rule's reading, not used): {one_sided}."]
    return chosen_arm, table


def rate_check(args, count: int = 3) -> list[str]:
    """Where the arms' rates would differ if chosen on the mean of seed 0's last
    ``count`` validation losses instead of its last one (the rule every arm is tuned
    by); a check of how much a choice hinges on one evaluation."""
    moved = []
    for arm in args.arms:
        recent = reader(args).rate_on_recent_evaluations(arm, count)
        if recent is not None and (chosen := reader(args).chosen_rate(arm)) != recent:
            moved.append(f"{arm}: {recent:.1e} instead of {chosen:.1e}")
    return [f"Rates chosen on the mean of seed 0's last {count} validation losses instead "
            f"of its last (a check of the rule; not used): "
            f"{'; '.join(moved) if moved else 'the same for every arm'}."]


TABLE_HEAD = ("| arm | pers. acc (final) | simulated s | MB up + down | s to the seed's "
              "line | s to the mean line | local s / client / round | lr | seeds |",
              "|---|---|---|---|---|---|---|---|---|")


def _row(label: str, runs: dict[int, Path], line: dict[int, float], mean_line: float) -> str:
    """One table row: final accuracy, simulated time, bytes, time to the lines, local
    seconds, the rate and the seed count."""
    finals = [_curve(r)[-1][1] for r in runs.values()]
    seconds = [run_files.metrics(r)[-1]["simulated_seconds"] for r in runs.values()]
    megabytes = [run_files.metrics(r)[-1]["bytes_total"] / 1e6 for r in runs.values()]
    reached = [readings.time_to(runs[s], line[s]) for s in sorted(set(runs) & set(line))]
    reached_mean = [readings.time_to(r, mean_line) for r in runs.values()]
    local = statistics.median(_local_seconds(r) for r in runs.values())
    lr = load_config(next(iter(runs.values())) / "config.yaml").local.lr
    return (f"| {label} | {values_pm(finals)} | {values_pm(seconds, 1)} | "
            f"{values_pm(megabytes, 2)} | {values_pm(reached, 1)} | "
            f"{values_pm(reached_mean, 1)} | {local:.3f} | {lr:.1e} | {len(runs)} |")


BOTH_READINGS = (("within 5%", within_budget), ("at most 5% over", at_most_over_budget))


def time_verdict(source: dict[int, Path], line: dict[int, float],
                 dense_time: dict[int, float], what: str) -> str:
    """TSFA's time target: each seed reaches its line in at most half the dense run's
    simulated time at that seed, read from ``source`` (the ``what`` runs)."""
    paired = sorted(set(source) & set(dense_time))
    reached = {s: readings.time_to(source[s], line[s]) for s in paired}
    fast = [reached[s] <= dense_time[s] / 2 for s in paired]
    per_seed = ", ".join(f"seed {s}: {readings.reached(source[s], reached[s], line[s])} of "
                         f"{dense_time[s] / 2:.1f}" for s in paired)
    rounds = load_config(next(iter(source.values())) / "config.yaml").rounds
    return (f"TSFA reaching the seed's line within half the dense run's time, read from "
            f"its {what} runs ({rounds} rounds; {per_seed}): "
            f"{'met' if fast and all(fast) else 'MISSED'} ({sum(fast)} of {len(fast)} "
            "seeds in time)")


def latency_verdict(what: str, group: dict[int, Path], budget: float,
                    rounds: int | None = None,
                    targets: tuple = (("within 5%", within_budget),)) -> str:
    """TSFA's latency target: the mean round latency (every round, or the first
    ``rounds``; mean over seeds) against the budget, under each of ``targets``."""
    latency = statistics.fmean(readings.mean_latency(r, rounds) for r in group.values())
    ratio = latency / budget
    count = rounds or load_config(next(iter(group.values())) / "config.yaml").rounds
    outcome = "; ".join(f"{name}: {'met' if admissible(ratio) else 'MISSED'}"
                        for name, admissible in targets)
    return (f"TSFA's mean round latency over its {what} runs ({count} rounds) "
            f"{latency:.3f} s / budget {budget:.3f} s = {ratio:.3f} (target {outcome})")


def _budget(runs: dict[int, Path]) -> float:
    cfg = load_config(next(iter(runs.values())) / "config.yaml")
    return TsfaOptions.model_validate(cfg.options).latency_budget_s


def tsfa_verdicts(args, arm: str, runs: dict[int, Path], line: dict[int, float],
                  dense_time: dict[int, float]) -> list[str]:
    """A TSFA arm's two targets: each seed reaches its line in at most half the dense
    run's simulated time (read from the timed runs where they exist, else from the
    tuned runs); the mean round latency (every round, mean over seeds; over the tuned
    runs and over the timed ones) is within 5% of the budget."""
    longer = reader(args).stage_runs(arm, "timed")
    lines = [time_verdict(longer or runs, line, dense_time, "timed" if longer else "tuned")]
    lines += [latency_verdict(name, group, _budget(runs))
              for name, group in (("tuned", runs), ("timed", longer)) if group]
    if longer:
        same = [s for s in sorted(set(longer) & set(runs))
                if repeats(longer[s], runs[s], REPEATED)]
        lines.append(f"The timed runs repeat the tuned runs' evaluated rounds exactly "
                     f"(accuracy, seconds, bytes): {len(same)} of "
                     f"{len(set(longer) & set(runs))} seeds")
    return lines


def confirmation(args) -> list[str]:
    """The ``confirm`` stage's runs, read like the tuned ones: the fresh seeds' lines
    from the dense arm, a table row per arm, and each confirmed TSFA arm's targets
    under both readings of the latency target (over the tuned length and over all
    its rounds)."""
    dense = reader(args).stage_runs(DENSE, "confirm")
    reading = chosen_by_reading(tsfa_candidates(args))
    arms = {arm: runs for arm in reading
            if (runs := reader(args).stage_runs(arm, "confirm"))}
    if not dense or not arms:
        return []
    line, dense_time, mean_line = lines_and_times(dense)
    per_seed = ", ".join(f"{s}: {v:.4f}" for s, v in sorted(line.items()))
    seconds = statistics.fmean(dense_time.values())
    text = [f"Confirmation on fresh seeds ({', '.join(map(str, sorted(dense)))}; never used "
            f"to tune or choose anything): lines {per_seed}; {DENSE} ran {seconds:.1f} "
            "simulated s.", "",
            *TABLE_HEAD, _row(DENSE, dense, line, mean_line),
            *(_row(arm, runs, line, mean_line) for arm, runs in arms.items()), ""]
    for arm, runs in arms.items():
        tuned_rounds = load_config(reader(args).chosen_runs(arm)[0] / "config.yaml").rounds
        text += [f"{arm} (chosen under {reading[arm]} reading of the latency target):",
                 time_verdict(runs, line, dense_time, "confirm"),
                 latency_verdict("confirm", runs, _budget(runs), tuned_rounds, BOTH_READINGS),
                 latency_verdict("confirm", runs, _budget(runs), None, BOTH_READINGS), ""]
    return text


def figure(curves: dict[str, list[list[tuple[float, float]]]], target: float,
           path: Path) -> None:
    """Personalised accuracy against simulated seconds, the mean over each arm's runs
    at each evaluated round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in curves.items():
        points = min(len(c) for c in runs)
        xs = [statistics.fmean(c[i][0] for c in runs) for i in range(points)]
        ys = [statistics.fmean(c[i][1] for c in runs) for i in range(points)]
        ax.plot(xs, ys, marker="o", markersize=3, label=arm)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8,
               label="dense final - 1 pt (mean over seeds)")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("personalised accuracy (mean over seeds)")
    ax.set_title("SST-2, 10 clients, Dir(0.5), narrow-band uplink")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = study_parser(__doc__.splitlines()[0], list(ARMS), OUT, list(SIZES),
                          stages=("timed", "confirm"))
    args = parser.parse_args(argv)
    args.arms = [a for a in ARMS if a in args.arms]  # the dense arm first: TSFA's
    return run_study(lambda arm: tuning(args, arm), args.arms, args.stage,  # budget
                     lambda: report(args),  # comes from it
                     after_tuning=lambda: timed(args) and confirm(args))


if __name__ == "__main__":
    raise SystemExit(main())
