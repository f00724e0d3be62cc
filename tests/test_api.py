"""The Python API (``sfedlora.run``): the run ``sfedlora run`` makes, callable twice in
one process, with its metrics as a DataFrame and its adapters loadable by PEFT."""

from __future__ import annotations

import json

import pytest
import torch

import sfedlora
from sfedlora.cli import main
from sfedlora.config import load_config
from tests.conftest import tiny_base


def _lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_in_one_process_equal_the_cli_runs(tiny_model_dir, tiny_data_file,
                                                    tmp_path):
    base = [*tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "x"), "rounds=2",
            "eval.every=1"]
    for method in ("fedsa", "fedit"):  # two configs, one process
        api = sfedlora.run(None, *base, f"method={method}", f"output_dir={tmp_path / method}")
        assert main(["run", *base, f"method={method}",
                     f"output_dir={tmp_path / f'cli-{method}'}"]) == 0
        cli = _lines(tmp_path / f"cli-{method}")
        assert _lines(api.run_dir) == cli  # the same path: bit-identical metrics
        assert api.metrics["round"].tolist() == [1, 2]
        assert api.metrics["personalized_accuracy"].tolist() == [m["personalized_accuracy"]
                                                                 for m in cli]
        assert api.summary["method"] == method == api.config.method


def test_a_config_can_be_a_dict_or_a_config_object(tiny_model_dir, tiny_data_file,
                                                   tmp_path):
    base = [*tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "x"), "rounds=1",
            "method=fedit"]
    cfg = load_config(None, base)
    as_dict = sfedlora.run(cfg.model_dump(mode="json"), f"output_dir={tmp_path / 'd'}")
    as_object = sfedlora.run(cfg, f"output_dir={tmp_path / 'o'}")
    assert _lines(as_dict.run_dir) == _lines(as_object.run_dir)
    with pytest.raises(TypeError, match="config must be a path"):
        sfedlora.run(42)


def test_the_global_adapter_loads_in_peft_with_the_exported_tensors(
        tiny_model_dir, tiny_data_file, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    result = sfedlora.run(None, *tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "r"),
                          "method=fedit", "rounds=1")
    assert set(result.adapters()) == {"global"}
    model = result.load_adapter()
    assert isinstance(model, PeftModel)
    saved = load_file(result.adapters()["global"] / "adapter_model.safetensors")
    loaded = model.state_dict()
    lora = [n for n in saved if "lora_A" in n]
    assert lora
    for name in lora:  # PEFT's saved names lack the adapter name it loads them under
        key = name.replace(".lora_A.weight", ".lora_A.default.weight")
        assert torch.equal(loaded[key], saved[name])
    with pytest.raises(KeyError, match="no adapter 'client_0'"):
        result.load_adapter("client_0")


def test_a_python_sweep_makes_the_runs_and_tables_of_sfedlora_sweep(
        tiny_model_dir, tiny_data_file, tmp_path):
    base = [*tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "x"), "rounds=1",
            "method=fedit", "eval.every=1"]
    cfg = load_config(None, base)
    swept = sfedlora.sweep(cfg.model_dump(mode="json"), {"local.lr": [1e-3, 1e-2]},
                           out=tmp_path / "api")
    assert main(["sweep", *base, "--grid", "local.lr=1e-3,1e-2",
                 "--out", str(tmp_path / "cli")]) == 0
    assert swept.finished and sorted(swept.runs()) == ["local.lr-0.001", "local.lr-0.01"]
    for name, result in swept.runs().items():
        assert _lines(result.run_dir) == _lines(tmp_path / "cli" / "runs" / name)
    assert swept.results["local.lr"].tolist() == [1e-3, 1e-2]
    assert (tmp_path / "api" / "table.md").read_text() == \
        (tmp_path / "cli" / "table.md").read_text()
    # the two rates are two experiments: different metrics, not one run copied
    first, second = swept.runs().values()
    assert first.summary["train_loss"] != second.summary["train_loss"]
