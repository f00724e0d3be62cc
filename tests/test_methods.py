"""Each method's server result equals its formula, on small exact tensors."""

from __future__ import annotations

import pytest
import torch

from sfedlora.methods import REGISTRY, Part, Update, get_method

A = "m.layer.q.lora_A.default.weight"
B = "m.layer.q.lora_B.default.weight"
H = "m.classifier.modules_to_save.default.weight"


def _updates(names, sizes=(10, 30, 60), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        Update(cid, n, {name: torch.randn(3, 2, generator=gen) for name in names})
        for cid, n in zip((2, 0, 1), sizes, strict=True)  # arrival order != id order
    ]


def _weighted(updates, name):
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * u.tensors[name].double() for u in updates).float()


def _uniform(updates, name):
    return (sum(u.tensors[name].double() for u in updates) / len(updates)).float()


def test_fedit_is_data_size_weighted_mean_of_a_b_and_head():
    ups = _updates([A, B, H])
    new = get_method("fedit").aggregate({A: torch.zeros(3, 2)}, ups)
    for name in (A, B, H):
        torch.testing.assert_close(new[name], _weighted(ups, name), rtol=0, atol=0)


def test_ffa_averages_b_and_head_and_never_touches_a():
    method = get_method("ffa")
    assert method.plan(1).upload == {Part.B, Part.HEAD}
    assert Part.A in method.roles.fixed and Part.A not in method.plan(1).train
    ups = _updates([B, H])
    new = method.aggregate({B: torch.zeros(3, 2), H: torch.zeros(3, 2)}, ups)
    for name in (B, H):
        torch.testing.assert_close(new[name], _weighted(ups, name), rtol=0, atol=0)
    assert A not in new


@pytest.mark.parametrize("name", ["fedsa", "sfed"])
def test_fedsa_family_averages_only_a_uniformly(name):
    method = get_method(name)
    assert method.plan(1).upload == {Part.A}
    assert method.roles.private == {Part.B, Part.HEAD}
    ups = _updates([A], sizes=(1, 5, 100))
    new = method.aggregate({}, ups)
    torch.testing.assert_close(new[A], _uniform(ups, A), rtol=0, atol=0)


def test_rolora_alternates_starting_with_b():
    method = get_method("rolora")
    plans = [method.plan(r) for r in range(1, 7)]
    assert [Part.B in p.train for p in plans] == [True, False] * 3
    assert [Part.A in p.train for p in plans] == [False, True] * 3
    for p in plans:
        assert p.upload == p.train and Part.HEAD in p.train


def test_rolora_keeps_the_frozen_factor_and_averages_the_other():
    method = get_method("rolora")
    state = {A: torch.ones(3, 2), B: torch.full((3, 2), 2.0), H: torch.zeros(3, 2)}
    ups = _updates([B, H])
    new = method.aggregate(state, ups)
    assert torch.equal(new[A], state[A])
    torch.testing.assert_close(new[B], _weighted(ups, B), rtol=0, atol=0)


def test_aggregation_does_not_depend_on_arrival_order():
    ups = _updates([A, B, H])
    method = get_method("fedit")
    one = method.aggregate({}, ups)
    two = method.aggregate({}, list(reversed(ups)))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_exact_product_for_methods_with_a_frozen_shared_factor():
    """FFA (and RoLoRA's B-rounds): mean(B_i) A == mean(B_i A) up to float rounding."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, generator=gen)
    ups = [Update(c, n, {B: torch.randn(4, 2, generator=gen)}) for c, n in ((0, 3), (1, 9))]
    b_mean = get_method("ffa").aggregate({}, ups)[B]
    expected = sum(u.num_examples / 12 * (u.tensors[B] @ a) for u in ups)
    torch.testing.assert_close(b_mean @ a, expected)


def test_registry_and_unknown_method():
    assert set(REGISTRY) == {"fedit", "ffa", "fedsa", "rolora", "sfed", "flasc", "flocora",
                             "hetlora", "fdlora", "flora", "local", "fedex", "flexlora",
                             "fedsvd", "soft", "tsfa", "central"}
    with pytest.raises(ValueError, match=r"method='fedavg' is not a method; choose one of .*"
                                         r"or give the import path of your own"):
        get_method("fedavg")


def test_part_of_classifies_every_peft_adapter_name():
    from sfedlora.methods import part_of

    stem = "base_model.model.bert.embeddings.word_embeddings"
    assert part_of(f"{stem}.lora_embedding_A.default") is Part.A
    assert part_of(f"{stem}.lora_embedding_B.default") is Part.B
    assert part_of(A) is Part.A and part_of(B) is Part.B and part_of(H) is Part.HEAD
    assert part_of("m.q.vera_lambda_d.default") is Part.A
    assert part_of("m.q.vera_lambda_b.default") is Part.B


def test_embedding_targets_are_refused_by_name(tiny_config):
    from sfedlora.config import ConfigError
    from sfedlora.runtime.simulation import Simulation

    cfg = tiny_config("lora.targets=[query,value,word_embeddings]")
    with pytest.raises(ConfigError, match=r"lora\.targets=.*embedding layer.*word_embeddings"):
        Simulation(cfg)
