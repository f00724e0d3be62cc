"""Batched client training (``clients.parallel``): several clients' local rounds in one
pass per step give the one-at-a-time rounds (issue 39)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sfedlora.runtime.simulation import Simulation
from tests.conftest import assert_same_run, metric_lines

# Methods whose client stage leaves the model alone during the local steps; the tiny
# BERT keeps its dropout (0.1), so every client's masks must come from its own stream.
BATCHED = ["fedit", "sfed", "fedsa", "ffa", "rolora", "flasc", "flocora", "hetlora",
           "flexlora", "fedsvd", "fdlora", "local", "central"]


def _runs(make, tmp_path, *overrides: str):
    """The same config run one client at a time and three at a time (4 clients: groups
    of 3 and 1); their run directories."""
    dirs = []
    for parallel in (1, 3):
        out = tmp_path / f"parallel-{parallel}"
        Simulation(make(*overrides, f"clients.parallel={parallel}", f"output_dir={out}",
                        "checkpoint.every=0")).run()
        dirs.append(out)
    return dirs


@pytest.mark.parametrize("method", BATCHED)
def test_a_batched_run_equals_the_sequential_run(tiny_config, tmp_path, method):
    one, three = _runs(tiny_config, tmp_path, f"method={method}", "rounds=2",
                       "local.max_grad_norm=0.5", "local.keep_optimizer_state=true")
    assert_same_run(one, three)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_batched_causal_lm_run_equals_the_sequential_run(tiny_lm_config, tmp_path,
                                                           monkeypatch, dropout):
    """The tiny Llama, two examples a batch: clients' batches have different widths.
    Without dropout they are padded alike (one pass a step); with LoRA dropout, the
    first padded pass stops at the first mask and from then on each width takes a pass,
    so every client's masks keep its own shape."""
    from sfedlora.runtime.batched.training import BatchedTrainer

    alike = []
    original = BatchedTrainer._pass

    def spy(self, batches, params, rng, members, padded=False, scales=None):
        alike.append(padded)
        return original(self, batches, params, rng, members, padded, scales)

    monkeypatch.setattr(BatchedTrainer, "_pass", spy)
    one, three = _runs(tiny_lm_config, tmp_path, "method=sfed", "rounds=2",
                       "local.batch_size=2", f"lora.dropout={dropout}", "eval.generate=0")
    if dropout:  # one padded attempt, then a pass per width
        assert alike.count(True) == 1 and alike.count(False) > 1
    else:
        assert alike.count(True) > 1
    assert_same_run(one, three)


def test_under_epochs_clients_with_fewer_steps_leave_the_pass_early(tiny_config, tmp_path):
    from sfedlora.runtime.experiment import build_experiment

    overrides = ("method=fedit", "rounds=2", "local.steps=null", "local.epochs=1",
                 "local.schedule=cosine")
    steps = {-(-len(t) // 8) for t in build_experiment(tiny_config(*overrides)).client_train}
    assert len(steps) > 1  # local.batch_size=8: the clients take different step counts
    assert_same_run(*_runs(tiny_config, tmp_path, *overrides))


@pytest.mark.parametrize("method", ["flora", "soft"])
def test_a_method_whose_stage_works_on_the_model_trains_one_at_a_time(tiny_config,
                                                                       tmp_path, caplog, method):
    with caplog.at_level(logging.WARNING):
        one, three = _runs(tiny_config, tmp_path, f"method={method}", "rounds=2")
    assert f"clients.parallel=3: clients train one at a time, since method {method} " \
        in caplog.text
    assert metric_lines(one)[-1]["train_loss"] == metric_lines(three)[-1]["train_loss"]


def test_one_pass_gives_each_client_its_own_peft_forward(tiny_config):
    """Against PEFT's own forward: two clients with different adapters (and heads) in
    one pass, eval mode, equal each client's logits with its adapter loaded."""
    from sfedlora.modeling.client_rows import AdapterSites, ClientRows
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(tiny_config())
    worker, slots = exp.worker, exp.worker.slots
    gen = torch.Generator().manual_seed(0)
    adapters = [{n: torch.randn(p.shape, generator=gen) * 0.3 for n, p in slots.params.items()}
                for _ in range(2)]
    data = exp.client_train[0]
    batches = [worker.batch(data, [0, 1, 2], labels=False),
               worker.batch(data, [3, 4, 5], labels=False)]
    worker.model.eval()
    expected = []
    with torch.no_grad():
        for adapter, batch in zip(adapters, batches, strict=True):
            slots.load(adapter)
            expected.append(worker.model(**batch).logits)
        slots.load(slots.layout.initial_state(1))  # the model's own tensors play no part
        rows = ClientRows(AdapterSites(worker.model, list(slots.params)), [3, 3], adapters,
                          [torch.get_rng_state()] * 2)
        inputs = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        with rows.applied(worker.model):
            got = worker.model(**inputs).logits
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("config", "keys"), [
    ("tiny_config", {"val_count", "global_count"}),
    ("tiny_lm_config", {"val_loss", "global_tokens", "own_em"})])
def test_scoring_many_adapters_at_once_gives_each_its_own_scores(config, keys, request):
    """Against one adapter at a time through PEFT's own forward: three clients'
    random adapters on their own test and validation parts and the global test set."""
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(request.getfixturevalue(config)("data.validation_fraction=0.2"))
    gen = torch.Generator().manual_seed(0)
    items = [({n: torch.randn(p.shape, generator=gen) * 0.3
               for n, p in exp.worker.slots.params.items()}, cid, True) for cid in range(3)]
    many = exp.task.score_many(exp, items)
    for item, found in zip(items, many, strict=True):
        one = exp.task.score(exp, *item).values
        assert one.keys() == found.values.keys() and keys <= one.keys()
        for key, value in one.items():
            if isinstance(value, float):
                assert math.isclose(value, found.values[key], rel_tol=1e-5), key
            else:
                assert value == found.values[key], key


@pytest.mark.parametrize("config", ["tiny_config", "tiny_lm_config"])
def test_the_tasks_training_loss_is_the_models_own(config, request):
    """What a batched pass scores each client's rows with equals ``model(**batch).loss``."""
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(request.getfixturevalue(config)())
    batch = exp.worker.batch(exp.client_train[0], list(range(5)))
    with torch.no_grad():
        out = exp.worker.model.eval()(**batch)
        ours = exp.task.train_loss(exp.worker.model, out.logits, batch["labels"])
    assert torch.equal(ours, out.loss)


def test_a_random_draw_outside_dropout_fails_the_pass(tiny_config, tmp_path):
    """Anything else drawing from the default generator would mix the clients' streams."""
    cfg = tiny_config("clients.parallel=2", "rounds=1")
    from sfedlora.runtime.batched import BatchedPool
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(cfg)
    layer = next(m for m in exp.worker.model.modules() if isinstance(m, torch.nn.LayerNorm))
    layer.register_forward_hook(lambda m, a, out: out + 0 * torch.rand(()))
    with pytest.raises(RuntimeError, match=r"clients\.parallel=1"):
        Simulation(cfg, pool=BatchedPool(exp)).run()


def test_parallel_clients_cannot_span_processes(tiny_config):
    from sfedlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"clients\.parallel=2 with clients\.world_size=2"):
        tiny_config("clients.parallel=2", "clients.world_size=2")


def test_cpu_dropout_gives_each_clients_rows_the_bits_of_its_own_call():
    """The one noise tensor of a batched pass against ``F.dropout`` per client, each
    under its own seed: bit for bit."""
    from sfedlora.modeling.client_rows import ClientRows, _PerClientRandomness

    x = torch.randn(7, 5, 9)
    sizes, seeds = [3, 4], [11, 22]
    expected = []
    for part, seed in zip(x.split(sizes), seeds, strict=True):
        torch.manual_seed(seed)
        expected.append(torch.nn.functional.dropout(part, 0.1, True))
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    rows = ClientRows(None, sizes, [{}, {}], states)
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with _PerClientRandomness(rows):
        got = torch.nn.functional.dropout(x, 0.1, True)
    assert torch.equal(got, torch.cat(expected))
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    for state, part, seed in zip(rows.rng, x.split(sizes), seeds, strict=True):
        torch.manual_seed(seed)
        torch.nn.functional.dropout(part, 0.1, True)
        assert torch.equal(state, torch.get_rng_state())  # each stream advanced as its own
