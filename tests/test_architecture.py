"""The layering promises of the README's "How it is built": the module graph is acyclic
and each layer imports only layers below it, runtimes never branch on a method or a
task, and every run is also readable by TensorBoard."""

from __future__ import annotations

import ast
import json
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import numpy as np

import sfedlora

SRC = Path(sfedlora.__file__).parent
# a method's mechanics or a task's kind, asked by name or by a method-specific flag
BRANCH = re.compile(r'merge_into_base|personal_adapter|method ?== ?"|task ?== ?"')


# Each top-level package (or module) of sfedlora and its layer: a module may import its
# own package and packages of lower layers only (siblings on one layer never import
# each other). Documented in each package's docstring and the README.
LAYERS = {
    "core": 0, "settings": 1, "aggregation": 2, "comm": 2, "privacy": 3, "modeling": 4,
    "data": 5, "methods": 6, "tasks": 6, "config": 7, "runtime": 8, "studies": 9,
    "api": 10, "cli": 11, "__main__": 12,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of sfedlora and the sfedlora modules it imports, counting every
    import statement: top-level, inside functions, and under TYPE_CHECKING."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}

    def resolve(name: str) -> str | None:  # the longest prefix that is a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("sfedlora")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, level - 1 up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                if base.startswith("sfedlora"):
                    # importing from a package runs its __init__, whatever is named
                    targets |= {resolve(base), *(resolve(f"{base}.{a.name}")
                                                 for a in node.names)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _layer(module: str) -> tuple[str, int | None]:
    top = module.split(".")[1] if "." in module else ""
    return top, LAYERS.get(top)


def test_the_module_graph_is_acyclic_counting_every_import():
    graph = import_graph()
    assert len(graph) > 90  # the walk found the package
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_each_layer_imports_only_layers_below_it():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "sfedlora" and _layer(m)[1] is None)
    assert unplaced == [], "give each new top-level package a layer in LAYERS"
    upward = []
    for module, targets in graph.items():
        if module == "sfedlora":  # the package root re-exports the API, lazily
            assert targets == {"sfedlora.api"}, targets
            continue
        top, layer = _layer(module)
        for target in targets:
            other, other_layer = _layer(target)
            if other != top and not (other_layer is not None and layer is not None
                                     and other_layer < layer):
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


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


# secure aggregation, named in any spelling
SECURE_AGGREGATION = re.compile(r"secur|secagg", re.IGNORECASE)


def test_the_runtime_never_names_secure_aggregation():
    """Secure aggregation is a client stage and an upload stage of the privacy layer,
    reached through the pools' generic ``exchange`` and ``fit(then=...)``: the round
    loop, the pools, the server and the Flower apps never name it."""
    hits = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
            for path in sorted((SRC / "runtime").rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if SECURE_AGGREGATION.search(line)]
    assert hits == []


def _override_points(base: type) -> list[str]:
    """The public members of ``base`` a subclass may replace: everything its class body
    defines except dunders and members marked ``@typing.final`` (helpers)."""
    return [name for name, value in vars(base).items()
            if not name.startswith("_") and not getattr(value, "__final__", False)]


def _subclasses(base: type) -> list[type]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__.startswith("sfedlora.")]


def test_a_method_and_its_stages_have_at_most_20_override_points_each_earning_its_place():
    """Every override point of Method, ServerStage and ClientStage is replaced by at
    least two of sfedlora's implementations, or its docstring names it as the
    extension point of one named feature; and there are at most 20 of them."""
    import importlib
    import pkgutil

    import sfedlora.methods
    from sfedlora.methods.base import ClientStage, Method, ServerStage

    for module in pkgutil.walk_packages(sfedlora.methods.__path__, "sfedlora.methods."):
        importlib.import_module(module.name)  # every method's stages, however imported

    points = {(base, name) for base in (Method, ServerStage, ClientStage)
              for name in _override_points(base)}
    assert len(points) <= 20, sorted(f"{b.__name__}.{n}" for b, n in points)
    lonely = []
    for base, name in sorted(points, key=lambda p: (p[0].__name__, p[1])):
        users = [c.__qualname__ for c in _subclasses(base) if name in vars(c)]
        documented = "extension point of" in (getattr(vars(base)[name], "__doc__", "") or "")
        if len(users) < 2 and not documented:
            lonely.append(f"{base.__name__}.{name}: {users}")
    assert lonely == []
    for base in (Method, ServerStage, ClientStage):  # helpers stay helpers
        final = {n for n, v in vars(base).items() if getattr(v, "__final__", False)}
        assert not [f"{c.__qualname__}.{n}" for c in _subclasses(base) for n in final
                    if n in vars(c)]


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

    from sfedlora.runtime.simulation import Simulation
    from sfedlora.runtime.tracking import scalars

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

    from sfedlora.core.adapters import AdapterLayout
    from sfedlora.runtime.experiment import build_experiment

    slots = build_experiment(tiny_lm_config("method=fedit")).worker.slots
    back, meta = AdapterLayout.decode(slots.layout.encode({"base_path": "x"}))
    assert list(back.spec) == list(slots.layout.spec) and meta == {"base_path": "x"}
    assert list(back.spec) != sorted(back.spec)  # the case the order matters for
    ours, theirs = slots.initial_state(7), back.initial_state(7)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
