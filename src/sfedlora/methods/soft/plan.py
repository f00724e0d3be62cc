"""TSFA's offline stage (``sfedlora tsfa-plan CONFIG``): short pilots choose the rank.

After Kim and Choi (arXiv 2505.00333); the bound below is a reconstruction from the
abstract, a surrogate whose every term is written to the plan so that another bound
can be applied to the same pilots.

For each candidate rank r in ``options.ranks``, a pilot runs SOFT (every component sent,
``options.keep=1``) for ``options.pilot_rounds`` rounds on the experiment's clients and
network, and measures:

- the loss decrease per round, as a ratio: q(r) = (L_P / L_1)^(1 / (P - 1)) from the
  mean training loss of the first and last pilot rounds;
- the variance of the averaged factors: v(r), the clients' uploads' weighted spread
  around their weighted mean, sum_k p_k ||x_k - x_bar||^2 / sum_k p_k ||x_k||^2 (A and
  B together), averaged over the pilot's rounds;
- the round latency at the smallest keep ratio, T_min(r): each pilot round's latency
  with every client's upload time scaled to the values the smallest keep sends.

The estimated bound after ``rounds`` rounds is

    bound(r) = L_P(r) * q(r)^(rounds - P) + v(r)

(the loss the measured rate of decrease reaches, plus the averaging's variance), and
the plan chooses the rank of least bound among those with T_min(r) <= the budget (the
online stage can then keep every round within it). The run reads the plan through
``options.plan`` and refuses a ``lora.rank`` other than the chosen one.

The pilots run through a ``run_rounds`` function the caller passes in (the runtime's
:func:`sfedlora.runtime.simulation.run_rounds`): a method sits below the runtimes and never
builds one itself.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sfedlora.core.adapters import AdapterLayout
from sfedlora.core.records import Metric
from sfedlora.methods.base import Part, ServerStage, Tensors, Update
from sfedlora.methods.soft.options import SoftOptions, TsfaOptions
from sfedlora.methods.soft.schedule import upload_values
from sfedlora.settings import ConfigError, ExperimentConfig, apply_overrides, validate

# (config, server stage) -> each round's metrics and the adapter's layout
RunRounds = Callable[[ExperimentConfig, ServerStage], tuple[list[dict], AdapterLayout]]


def read_plan(path: str | Path) -> dict[str, Any]:
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"options.plan={path}: no such file; write it with "
                         "`sfedlora tsfa-plan CONFIG --out PLAN`") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"options.plan={path} is not a plan (invalid JSON: {exc})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("rank"), int):
        raise ValueError(f"options.plan={path} has no chosen rank; write it with "
                         "`sfedlora tsfa-plan`")
    return plan


def spread(updates: list[Update]) -> float:
    """sum_k p_k ||x_k - x_bar||^2 / sum_k p_k ||x_k||^2 over the uploads' A and B, with
    p_k proportional to the client's examples (0 for fewer than two uploads)."""
    if len(updates) < 2:
        return 0.0
    weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    weights /= weights.sum()
    names = sorted(n for n in updates[0].tensors if ".lora_A." in n or ".lora_B." in n)
    flat = torch.stack([torch.cat([u.tensors[n].double().reshape(-1) for n in names])
                        for u in updates])
    mean = (weights[:, None] * flat).sum(0)
    spread_ = (weights * ((flat - mean) ** 2).sum(1)).sum()
    size = (weights * (flat ** 2).sum(1)).sum()
    return float(spread_ / size) if size > 0 else 0.0


class _SpreadRecorder(ServerStage):
    """A pilot's server stage: SOFT has none of its own; this records each round's
    :func:`spread`."""

    def __init__(self):
        self.spreads: list[float] = []

    def after_combine(self, round_idx: int, state: Tensors, updates) -> Tensors:
        self.spreads.append(spread(list(updates)))
        return state


def bound(last_loss: float, first_loss: float, pilot_rounds: int, rounds: int,
          variance: float) -> tuple[float, float]:
    """(q, bound): the per-round loss ratio and the estimated bound (module docstring)."""
    q = (last_loss / first_loss) ** (1 / (pilot_rounds - 1)) if first_loss > 0 else 1.0
    q = min(q, 1.0)  # a pilot whose loss rose is not extrapolated upwards
    return q, last_loss * q ** max(rounds - pilot_rounds, 0) + variance


def pilot(cfg: ExperimentConfig, rank: int, out: Path, run_rounds: RunRounds
          ) -> dict[str, Any]:
    """One rank's pilot (module docstring); its measured terms."""
    tsfa = TsfaOptions.model_validate(cfg.options)
    raw = cfg.model_dump(mode="json")  # SOFT sending everything, with TSFA's SOFT settings
    raw["options"] = {k: v for k, v in tsfa.model_dump(mode="json").items()
                      if k in SoftOptions.model_fields}
    pilot_cfg = validate(apply_overrides(raw, [
        "method=soft", "options.keep=1.0", f"lora.rank={rank}",
        f"rounds={tsfa.pilot_rounds}", "eval.every=0", "checkpoint.every=0",
        f"output_dir={out / f'rank-{rank}'}", "progress=false"]))
    recorder = _SpreadRecorder()
    rounds, layout = run_rounds(pilot_cfg, recorder)
    layers, always = _layout_values(layout)
    shrink = upload_values(tsfa.keep_choices[0], layers, always) / upload_values(1.0, layers,
                                                                                  always)
    t_min = sum(_latency_at(m, shrink) for m in rounds) / len(rounds)
    first, last = rounds[0][Metric.TRAIN_LOSS], rounds[-1][Metric.TRAIN_LOSS]
    variance = sum(recorder.spreads) / len(recorder.spreads)
    q, estimate = bound(last, first, tsfa.pilot_rounds, cfg.rounds, variance)
    return {"rank": rank, "first_loss": first, "last_loss": last, "loss_ratio_per_round": q,
            "variance": variance, "latency_s_full": sum(m[Metric.LATENCY_SECONDS]
                                                        for m in rounds) / len(rounds),
            "latency_s_at_min_keep": t_min, "bound": estimate,
            "feasible": t_min <= tsfa.latency_budget_s}


def _layout_values(layout: AdapterLayout) -> tuple[list[tuple[int, int]], int]:
    spec, parts = layout.spec, layout.parts
    layers = [(spec[n].shape[0], spec[n].shape[1]
               + spec[n.replace(".lora_A.", ".lora_B.")].shape[0])
              for n in sorted(spec) if ".lora_A." in n]
    always = sum(math.prod(spec[n].shape) for n in spec if parts[n] is Part.HEAD)
    return layers, always


def _latency_at(metrics: dict, shrink: float) -> float:
    """A priced round's latency with every upload time scaled by ``shrink``."""
    down = metrics[Metric.DOWNLOAD_SECONDS_PER_CLIENT]
    compute = metrics[Metric.COMPUTE_SECONDS_PER_CLIENT]
    up = metrics[Metric.UPLOAD_SECONDS_PER_CLIENT]
    return max(down[c] + compute[c] + shrink * up[c] for c in up)


def make_plan(cfg: ExperimentConfig, run_rounds: RunRounds, workdir: Path | None = None
              ) -> dict[str, Any]:
    """Run every candidate rank's pilot through ``run_rounds`` and choose (module
    docstring)."""
    if cfg.network.model != "wireless":
        raise ConfigError("tsfa-plan prices pilot rounds on the network; set "
                          "network.model=wireless")
    tsfa = TsfaOptions.model_validate(cfg.options)
    with tempfile.TemporaryDirectory(prefix="tsfa-plan-") as tmp:
        out = Path(workdir or tmp)
        pilots = [pilot(cfg, r, out, run_rounds) for r in tsfa.ranks]
    feasible = [p for p in pilots if p["feasible"]]
    if not feasible:
        raise ConfigError(
            f"no rank in options.ranks={tsfa.ranks} meets options.latency_budget_s="
            f"{tsfa.latency_budget_s} even at keep {tsfa.keep_choices[0]} (least: "
            f"{min(p['latency_s_at_min_keep'] for p in pilots):.3g} s); raise the budget "
            "or add smaller ranks")
    chosen = min(feasible, key=lambda p: (p["bound"], p["rank"]))
    return {"rank": chosen["rank"], "rounds": cfg.rounds,
            "latency_budget_s": tsfa.latency_budget_s,
            "keep_choices": tsfa.keep_choices, "pilots": pilots,
            "bound": "L_P * q^(rounds - P) + v; q = (L_P / L_1)^(1/(P-1)); see "
                     "sfedlora.methods.soft.plan"}
