"""A method defined outside sfedlora's source (here, in this test file) runs in-process
and on Flower with no edit under ``src/`` (issue 38): the config names it by its
import path, and its own Options model carries its settings."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from sfedlora.config import to_yaml
from sfedlora.methods import Method, Part, part_of
from sfedlora.methods.base import Roles, ServerStage, Traits
from sfedlora.runtime.simulation import Simulation


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shrink: float = Field(1.0, gt=0, le=1, description="the averaged A is scaled by this")


class Shrink(ServerStage):
    """After each combine, the averaged A times ``shrink``."""

    def __init__(self, shrink: float):
        self.shrink = shrink

    def after_combine(self, round_idx, state, updates):
        Toy.combined = dict(state)
        return {n: t * self.shrink if part_of(n) is Part.A else t for n, t in state.items()}


class Toy(Method):
    """A averaged (uniform) and shrunk by ``options.shrink``; B and head private"""

    roles = Roles(shared=frozenset({Part.A}), private=frozenset({Part.B, Part.HEAD}))
    traits = Traits(weighting="uniform", a_init_modes=("shared", "independent"))
    Options = ToyOptions
    combined: dict | None = None  # the last combined state, before the shrink

    def server_stage(self, cfg, layout, network) -> ServerStage:
        return Shrink(self.options.shrink)


TOY = f"{__name__}:Toy"  # what a config names it by


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_toy_method_without_options_runs_as_the_method_it_copies(tiny_config, tmp_path):
    """Its description is FedSA-LoRA's: the same seed gives FedSA's metrics exactly."""
    for method, out in ((TOY, "toy"), ("fedsa", "fedsa")):
        Simulation(tiny_config(f"method={method}", "rounds=2", "eval.every=1",
                               f"output_dir={tmp_path / out}")).run()
    assert _lines(tmp_path / "toy") == _lines(tmp_path / "fedsa")
    summary = json.loads((tmp_path / "toy/summary.json").read_text())
    assert summary["method"] == TOY


def test_a_toy_methods_options_reach_it(tiny_config):
    sim = Simulation(tiny_config(f"method={TOY}", "options.shrink=0.5", "rounds=1"))
    sim.run_round(1)
    a_names = [n for n in sim.server.state if part_of(n) is Part.A]
    assert a_names
    for n in a_names:  # the server keeps exactly half the combined A
        assert torch.equal(sim.server.state[n], Toy.combined[n] * 0.5)
        assert Toy.combined[n].abs().max() > 0


def test_a_toy_methods_options_are_checked_by_its_model(tiny_config):
    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"options.shrink: Input should be less than or "
                                          r"equal to 1"):
        tiny_config(f"method={TOY}", "options.shrink=2")


class _FlowerLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_toy_method_on_flower_equals_in_process(tiny_config, tmp_path, monkeypatch):
    """Flower's ClientApps run in Ray workers: they import this module by the config's
    import path (this directory on their PYTHONPATH, as an installed package would be)."""
    pytest.importorskip("flwr")
    from sfedlora.runtime.flower.simulation import run_simulation

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [here, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    cfg = tiny_config(f"method={TOY}", "options.shrink=0.5", "clients.num=3", "rounds=2",
                      "eval.every=1", "checkpoint.every=0", f"output_dir={tmp_path / 'local'}")
    Simulation(cfg).run()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    logged = _FlowerLog()
    logging.getLogger("flwr").addHandler(logged)
    try:
        run_simulation(str(config_file), [f"output_dir={tmp_path / 'flower'}"], workers=1)
    finally:
        logging.getLogger("flwr").removeHandler(logged)
    local, flower = _lines(tmp_path / "local"), _lines(tmp_path / "flower")
    assert [m["round"] for m in flower] == [m["round"] for m in local] == [1, 2]
    # the ServerApp told its user how each round went and how the run ended, through
    # Flower's logger (what `flwr run --stream` shows)
    for m in flower:
        line = next(x for x in logged.lines if x.startswith(f"round {m['round']}/2: "))
        assert f"personalised acc {m['personalized_accuracy']:.4f}" in line
        assert f"bytes up {m['bytes_up']:,}" in line
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert f"sfedlora: {TOY}" in "\n".join(logged.lines)
    assert any(x.split() == ["personalised", "accuracy",
                             f"{summary['personalized_accuracy']:.4f}"] for x in logged.lines)
    assert f"run directory: {tmp_path / 'flower'}" in logged.lines
    for a, b in zip(local, flower, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float):
                assert math.isclose(value, b[key], abs_tol=1e-5), key
            else:
                assert value == b[key], key
