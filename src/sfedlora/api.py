"""The Python API: a run from a notebook or a script, the same run ``sfedlora run`` makes.

    import sfedlora

    result = sfedlora.run("configs/demo.yaml", "method=fedit", "rounds=2")
    result.metrics            # one row per round (pandas)
    result.summary["personalized_accuracy"]
    model = result.load_adapter()   # the global adapter on its base model, in PEFT

``config`` is a YAML path, a nested dict, an :class:`~sfedlora.config.ExperimentConfig`
or None (the offline main job's defaults); ``overrides`` are ``dotted.key=value``
strings, as on the command line. Nothing is left behind in the process between calls
(each run builds its own model and closes its files), so a second call works, and
progress bars use tqdm's auto backend, which renders in Jupyter. :func:`sweep` is the
same entry for a grid of runs (``sfedlora sweep``).

Layer 10, beside the CLI (which calls it). May import: every layer below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfedlora.config import ExperimentConfig, load_config, resolve, validate
from sfedlora.settings import apply_overrides
from sfedlora.studies import runs as run_files


@dataclass(frozen=True)
class Result:
    """A finished run: its directory, config and summary; metrics and adapters are
    read from the directory when asked for."""

    run_dir: Path
    config: ExperimentConfig
    summary: dict[str, Any] = field(repr=False)

    @property
    def metrics(self):
        """Every ``metrics.jsonl`` line as a pandas DataFrame, one row per round."""
        import pandas as pd

        return pd.DataFrame(run_files.metrics(self.run_dir))

    def adapters(self) -> dict[str, Path]:
        """The exported PEFT adapters by name (``global``, ``client_<i>``)."""
        folder = self.run_dir / "adapters"
        return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()} if \
            folder.is_dir() else {}

    def load_adapter(self, name: str = "global"):
        """Adapter ``name`` on a fresh copy of its base model, as plain PEFT loads it:
        the base model class is the one the adapter's own ``task_type`` names (a
        classifier gets the run's label count)."""
        from peft import PeftConfig, PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        path = self.adapters().get(name)
        if path is None:
            raise KeyError(f"no adapter {name!r} in {self.run_dir / 'adapters'}; it has "
                           f"{sorted(self.adapters())}")
        peft_config = PeftConfig.from_pretrained(path)
        labels = run_files.labels(self.run_dir)
        bases = {"SEQ_CLS": lambda p: AutoModelForSequenceClassification.from_pretrained(
                     p, num_labels=len(labels)),
                 "CAUSAL_LM": AutoModelForCausalLM.from_pretrained}
        base = bases[str(peft_config.task_type)](peft_config.base_model_name_or_path)
        return PeftModel.from_pretrained(base, path)


def experiment_config(config: str | Path | Mapping | ExperimentConfig | None = None,
                      overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """``config`` (a YAML path, a nested dict, a config object or None for the
    defaults) with ``overrides`` applied, resolved against its method and task."""
    if config is None or isinstance(config, str | Path):
        return load_config(config, list(overrides))
    if isinstance(config, ExperimentConfig):
        config = config.model_dump(mode="json")
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a path, a dict or an ExperimentConfig, not "
                        f"{type(config).__name__}")
    import copy

    return validate(apply_overrides(copy.deepcopy(dict(config)), list(overrides)))


def run(config: str | Path | Mapping | ExperimentConfig | None = None, *overrides: str,
        overwrite: bool = False) -> Result:
    """Run one experiment in this process and return its :class:`Result`. A run
    directory that holds another run is refused unless ``overwrite``."""
    sim = simulation(experiment_config(config, overrides), overwrite)
    return finish(sim, sim.run(overwrite=overwrite))


@dataclass(frozen=True)
class SweepResult:
    """A sweep's directory: every run (a :class:`Result` each, by run name) and the
    tables over them, once every shard has finished."""

    out: Path
    finished: bool

    @property
    def results(self):
        """``results.csv``: one row per run, its grid values and final metrics."""
        import pandas as pd

        return pd.read_csv(self.out / "results.csv")

    @property
    def table(self):
        """``table.csv``: mean, spread and count over seeds per grid cell."""
        import pandas as pd

        return pd.read_csv(self.out / "table.csv")

    def runs(self) -> dict[str, Result]:
        """Every finished run of the sweep by name."""
        found = {}
        for run_dir in sorted((self.out / "runs").iterdir()):
            if run_files.is_finished(run_dir):
                found[run_dir.name] = Result(run_dir, load_config(run_dir / "config.yaml"),
                                             run_files.summary(run_dir))
        return found


def sweep(config: str | Path | Mapping | ExperimentConfig | None,
          grid: Mapping[str, Sequence], *overrides: str, out: str | Path = "runs/sweep",
          shard: tuple[int, int] = (0, 1),
          on_start: Callable[[str], None] | None = None, batched: int = 1,
          tune_on: str = "loss") -> SweepResult:
    """Run the cross product of ``grid`` over ``config`` (``sfedlora sweep`` makes the
    same runs): ``{"local.lr": [1e-4, 1e-3], "seed": [0, 1]}`` gives four runs; a key
    ``"a+b"`` with tuple values varies two keys together. Each run is an ordinary run
    directory under ``out/runs/``; calling again skips finished runs and resumes
    interrupted ones, and ``shard=(k, m)`` lets m processes share one sweep.
    ``on_start`` is called with each run's name as it starts. ``batched=R`` runs R runs
    at a time in this process, their clients trained in shared passes (each run's
    directory is what it would be alone, up to the passes' summation order). A grid
    with a ``local.lr`` ladder also gets best_lr tables, chosen on the mean validation
    ``tune_on``: ``"loss"`` (lowest) or ``"accuracy"`` (highest)."""
    from sfedlora.studies.sweep import run_sweep

    grid = {key: [tuple(v) if isinstance(v, list) else v for v in values]
            for key, values in grid.items()}
    out = Path(out)
    done = run_sweep(None, dict(grid), out, overrides, shard=shard, on_start=on_start,
                     load=lambda items: experiment_config(config, items), batched=batched,
                     tune_on=tune_on)
    return SweepResult(out, done)


def simulation(cfg: ExperimentConfig, overwrite: bool = False):
    """The in-process run of ``cfg``, after refusing an occupied ``output_dir`` (before
    any model loads)."""
    from sfedlora.runtime.results import refuse_occupied
    from sfedlora.runtime.simulation import Simulation

    if cfg.output_dir is not None:
        refuse_occupied(Path(cfg.output_dir), overwrite)
    return Simulation(cfg if cfg.is_resolved else resolve(cfg))


def finish(sim, summary: dict[str, Any]) -> Result:
    """The :class:`Result` of a simulation that has run."""
    return Result(sim.run_dir, sim.cfg, summary)
