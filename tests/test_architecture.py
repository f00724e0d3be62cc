"""The layering promises of the README's "How it is built": runtimes never branch on a
method or a task, and every run is also readable by TensorBoard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import sfedlora

SRC = Path(sfedlora.__file__).parent
# a method's mechanics or a task's kind, asked by name or by a method-specific flag
BRANCH = re.compile(r'merge_into_base|personal_adapter|method ?== ?"|task ?== ?"')


def test_no_runtime_module_branches_on_a_method_or_task():
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("methods", "tasks"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert hits == []


def test_every_method_and_task_is_reached_through_its_registry():
    from sfedlora.config import load_config
    from sfedlora.methods import REGISTRY
    from sfedlora.tasks import TASKS, get_task

    assert set(TASKS) == {"classification", "causal-lm"}
    for name in TASKS:
        assert get_task(name).name == name
    needs = {"tsfa": ["network.model=wireless", "network.allocation=min_max"]}
    for name in REGISTRY:  # the schema spells no method list of its own
        assert load_config(None, [f"method={name}", *needs.get(name, [])]).method == name


def test_tensorboard_reads_every_metric_of_every_round(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sfedlora.simulation import Simulation
    from sfedlora.tracking import scalars

    cfg = tiny_config("method=sfed", "rounds=3", "eval.every=1",
                      f"output_dir={tmp_path / 'run'}")
    Simulation(cfg).run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"),
                              size_guidance={"scalars": 0})
    events.Reload()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    expected = {}
    for line in lines:
        for name, value in scalars({k: v for k, v in line.items() if k != "round"}):
            expected.setdefault(name, {})[line["round"]] = value
    assert "personalized_accuracy" in expected and "bytes_up_per_client/0" in expected
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, by_round in expected.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert sorted(got) == sorted(by_round) == [1, 2, 3], name
        for step, value in by_round.items():  # TensorBoard stores float32
            assert got[step] == float(np.float32(value)), (name, step)


def test_a_layout_round_trips_with_its_draw_order(tiny_lm_config):
    """A model-less server draws its inits from a layout it received: the same names,
    shapes and order, so the same values (Llama's q/k/v/o order is not alphabetical)."""
    import torch

    from sfedlora.adapters import AdapterLayout
    from sfedlora.experiment import build_experiment

    slots = build_experiment(tiny_lm_config("method=fedit")).worker.slots
    back, meta = AdapterLayout.decode(slots.layout.encode({"base_path": "x"}))
    assert list(back.spec) == list(slots.layout.spec) and meta == {"base_path": "x"}
    assert list(back.spec) != sorted(back.spec)  # the case the order matters for
    ours, theirs = slots.initial_state(7), back.initial_state(7)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
