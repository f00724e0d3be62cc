"""Tuned comparisons: every arm's learning rate chosen the same way, on validation data.

A :class:`Study` names the arms (name: config overrides), the base config of each
dataset and the overrides of each budget ("size"). A :class:`Tuning` is one study on
one dataset at one size, written under ``out``:

1. ``ladder``: the adapter's learning rate (``local.lr``) over :attr:`Study.ladder`
   (rungs 4x apart) at seed 0; the rung with the lowest mean client **validation** loss
   (never the test part) is chosen (:func:`best_rung`). A choice at an end of the
   ladder extends it by one rung on that side, up to ``max_extend`` times, so no arm is
   judged at a rate clipped by the ladder.
2. ``seeds``: the chosen rate again with :attr:`Study.seeds`.
3. a study's own stages run an arm's chosen rate on (:meth:`Tuning.run_on`), and its
   report reads the chosen runs (:meth:`Tuning.chosen_runs`).

Runs go to ``<out>/<dataset>-<size>/<arm>/<stage>/runs/`` through
:func:`~sfedlora.studies.sweep.run_sweep` (or the ``runner`` given), so a rerun skips
finished runs, resumes interrupted ones, and a report regenerates from the committed
run files (every read goes through :mod:`sfedlora.studies.runs`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sfedlora.config import load_config
from sfedlora.studies import runs as run_files
from sfedlora.studies.sweep import LR_KEY, parse_grid, parse_shard, run_sweep

LADDER = (2e-3, 8e-3, 3.2e-2)  # 4x apart (extended where the best sits at an end)
SEEDS = (1, 2)  # the seeds stage's seeds (the ladder runs seed 0)


@dataclass(frozen=True)
class Study:
    """What a tuned comparison runs: its arms (name: overrides), base configs per
    dataset (paths relative to ``root``) and budgets per size."""

    arms: dict[str, list[str]]
    configs: dict[str, str]
    sizes: dict[str, tuple[str, ...]]
    root: Path = Path(".")
    ladder: tuple[float, ...] = LADDER
    seeds: tuple[int, ...] = SEEDS


def best_rung(rows: Sequence[dict]) -> tuple[float, bool, bool]:
    """The rung (``lr``) with the lowest ``val_loss``, and whether it is the lowest /
    highest rung tried (a loss that is not finite counts as worst)."""
    def key(r):
        v = r["val_loss"]
        return v if v is not None and math.isfinite(v) else math.inf

    rates = sorted({r["lr"] for r in rows})
    best = min(rows, key=key)["lr"]
    return best, best == rates[0], best == rates[-1]


def repeats(longer: Path, run: Path,
            keys: tuple[str, ...] = ("personalized_accuracy", "bytes_total")) -> bool:
    """Whether ``longer`` has ``run``'s evaluated rounds with equal figures (``keys``)."""
    by_round = {m["round"]: m for m in run_files.metrics(longer)}
    return all(r["round"] in by_round and all(by_round[r["round"]].get(k) == r.get(k)
                                             for k in keys)
               for r in run_files.metrics(run) if r.get("personalized_accuracy") is not None)


# (config, grid, out, overrides, shard, on_start) -> True once every run has finished
Runner = Callable[..., bool]


@dataclass(frozen=True)
class Tuning:
    """One study on one dataset at one size. ``overrides`` apply to every arm;
    ``shard`` ``K/M`` runs every M-th run of each sweep from K; ``runner`` runs a
    sweep (default :func:`~sfedlora.studies.sweep.run_sweep`; a test passes its own)."""

    study: Study
    dataset: str
    size: str
    out: Path
    overrides: tuple[str, ...] = ()
    shard: str = "0/1"
    max_extend: int = 2
    runner: Runner = field(default=run_sweep, repr=False)

    @classmethod
    def from_args(cls, study: Study, args: argparse.Namespace) -> Tuning:
        """From a study's command line (:func:`study_parser`; a reader needs only
        ``dataset``, ``size`` and ``out``)."""
        return cls(study, args.dataset, args.size, Path(args.out),
                   tuple(getattr(args, "overrides", ())), getattr(args, "shard", "0/1"),
                   getattr(args, "max_extend", 2))

    @property
    def folder(self) -> Path:
        return self.out / f"{self.dataset}-{self.size}"

    def arm_dir(self, arm: str) -> Path:
        return self.folder / arm

    def arm_overrides(self, arm: str, extra: Sequence[str] = ()) -> list[str]:
        return [*self.study.arms[arm], *self.study.sizes[self.size], *extra,
                *self.overrides]

    def sweep(self, arm: str, stage: str, grid: list[str], extra: Sequence[str] = ()
              ) -> bool:
        """Run ``grid`` under an arm's overrides (and ``extra`` after the size's) into
        ``<arm>/<stage>/runs/``; False while other shards still hold some of its runs."""
        return self.runner(str(self.study.root / self.study.configs[self.dataset]),
                           parse_grid(grid), self.arm_dir(arm) / stage,
                           self.arm_overrides(arm, extra), shard=parse_shard(self.shard),
                           on_start=lambda name: print(f"{arm} {stage} {name}", flush=True))

    # --- the ladder and the choice ----------------------------------------------------

    def ladder_results(self, arm: str) -> list[dict]:
        """Finished ladder runs of an arm: learning rate, final validation loss and the
        run's summary."""
        rows = []
        for run in run_files.finished_runs(self.arm_dir(arm) / "ladder" / "runs"):
            s = run_files.summary(run)
            lr = load_config(run / "config.yaml").local.lr
            rows.append({"lr": lr, "val_loss": s.get("personalized_val_loss"), **s})
        return rows

    def chosen_rate(self, arm: str) -> float | None:
        """The rate an arm's finished ladder chose (None before any rung finished)."""
        rows = self.ladder_results(arm)
        return best_rung(rows)[0] if rows else None

    def rate_on_recent_evaluations(self, arm: str, count: int = 3) -> float | None:
        """The rung a sturdier rule would choose: the lowest mean validation loss over
        each seed-0 ladder run's last ``count`` evaluations rather than its last one. A
        check of the choice, not a second one (a run that oscillates can end on a high
        point, and the rule should not hinge on it): studies report the rate
        :func:`best_rung` picks, and print where this one differs."""
        rows = []
        for run in run_files.finished_runs(self.arm_dir(arm) / "ladder" / "runs"):
            losses = [m["personalized_val_loss"] for m in run_files.metrics(run)
                      if m.get("personalized_val_loss") is not None][-count:]
            rows.append({"lr": load_config(run / "config.yaml").local.lr,
                         "val_loss": sum(losses) / len(losses) if losses else None})
        return best_rung(rows)[0] if rows else None

    def ladder(self, arm: str) -> bool:
        """Sweep the ladder at seed 0, adding a rung past whichever end the best rate
        sits at, up to ``max_extend`` rungs beyond the study's ladder in all. Rungs an
        earlier call added stay in (and count), so a rerun of a finished ladder trains
        nothing and writes its tables with every rung."""
        base = self.study.ladder
        rates = sorted({*base, *(r["lr"] for r in self.ladder_results(arm))})
        while True:
            if not self.sweep(arm, "ladder", [f"{LR_KEY}={','.join(map(repr, rates))}",
                                               "seed=0"]):
                return False  # other shards are still running this arm
            best, low, high = best_rung(self.ladder_results(arm))
            if not (low or high) or len(rates) - len(base) >= self.max_extend:
                return True
            rates = sorted({*rates, best / 4 if low else best * 4})

    def seeds(self, arm: str) -> bool:
        return self.sweep(arm, "seeds", [f"{LR_KEY}={self.chosen_rate(arm)!r}",
                                         f"seed={','.join(map(str, self.study.seeds))}"])

    def tune(self, arm: str, stage: str = "all") -> bool:
        """The ladder and seeds stages ``stage`` asks for; False while other shards
        are still running this arm."""
        if stage in ("ladder", "all") and not self.ladder(arm):
            return False
        return not (stage in ("seeds", "all") and not self.seeds(arm))

    # --- the chosen runs ----------------------------------------------------------------

    def chosen_runs(self, arm: str) -> list[Path]:
        """An arm's run directories at its chosen rate: the ladder's seed-0 run, then
        the seeds' runs (the rows a tuned comparison reports)."""
        rows = self.ladder_results(arm)
        if not rows:
            return []
        best, *_ = best_rung(rows)
        base = self.arm_dir(arm)
        runs = [run for run in run_files.finished_runs(base / "ladder/runs")
                if load_config(run / "config.yaml").local.lr == best]
        return runs + run_files.finished_runs(base / "seeds/runs")

    def chosen_by_seed(self, arm: str) -> dict[int, Path]:
        """:meth:`chosen_runs` keyed by seed (equal seeds: equal partitions across
        arms)."""
        return {load_config(r / "config.yaml").seed: r for r in self.chosen_runs(arm)}

    def run_on(self, arm: str, stage: str, extra: tuple[str, ...],
               seeds: tuple[int, ...] | None = None) -> bool:
        """An arm's chosen rate run again for ``seeds`` (default: 0 and the study's)
        with ``extra`` overrides after the size's (more rounds, denser evaluation) into
        ``<arm>/<stage>/runs/``: the arm is tuned like every other, then runs on where a
        study reads a time or a byte count rather than a final figure. With a constant
        schedule and every draw seeded by (seed, round, client) such runs repeat the
        tuned runs' rounds (:func:`repeats`)."""
        chosen = self.chosen_runs(arm)
        if not chosen:
            raise SystemExit(f"the {stage} stage runs {arm} at its chosen rate: tune it "
                             f"first (--arms {arm} --stage all)")
        lr = load_config(chosen[0] / "config.yaml").local.lr
        seeds = (0, *self.study.seeds) if seeds is None else seeds
        return self.sweep(arm, stage, [f"{LR_KEY}={lr!r}", f"seed={','.join(map(str, seeds))}"],
                          extra)

    def stage_runs(self, arm: str, stage: str) -> dict[int, Path]:
        """An arm's finished runs of one stage, keyed by seed."""
        return {load_config(run / "config.yaml").seed: run
                for run in run_files.finished_runs(self.arm_dir(arm) / stage / "runs")}

    def publish(self, text: str) -> None:
        """Print a study's report and keep it as ``<out>/<dataset>-<size>/table.md``."""
        (self.folder / "table.md").write_text(text + "\n")
        print(text)


def study_parser(description: str, arms: list[str], out: Path, sizes: list[str],
                 stages: tuple[str, ...] = (), datasets: Sequence[str] = ("sst2",)
                 ) -> argparse.ArgumentParser:
    """The command line of a one-dataset tuned study: stages (``stages`` adds a study's
    own, run after tuning), size, arms, output folder, shard, ladder extension."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stage", choices=["ladder", "seeds", *stages, "report", "all"],
                        default="all")
    parser.add_argument("--size", choices=sizes, default="cpu")
    parser.add_argument("--arms", nargs="+", default=arms, choices=arms)
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--max-extend", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every arm")
    parser.set_defaults(dataset=datasets[0])
    return parser


def run_study(tuning_for: Callable[[str], Tuning], arms: Sequence[str], stage: str,
              report: Callable[[], str],
              after_tuning: Callable[[], bool] | None = None) -> int:
    """A one-dataset tuned study: each arm's ladder and seeds under ``tuning_for(arm)``
    (in ``arms`` order), then ``after_tuning()`` if given (a study's own stage; False
    while other shards still run it), then ``report()`` kept and printed."""
    for arm in arms:
        if not tuning_for(arm).tune(arm, stage):
            return 0  # other shards are still running this arm
    if after_tuning is not None and not after_tuning():
        return 0
    if stage in ("report", "all"):
        tuning_for(arms[0]).publish(report())
    return 0
