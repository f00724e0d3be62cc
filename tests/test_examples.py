"""Every script under ``examples/`` and every example in the README runs, at a tiny
size (the tiny BERT and Llama of the fixtures, one round), and does what it says."""

from __future__ import annotations

import json
import re
import shutil
import stat

import pytest

import sfedlora
from sfedlora.cli import main as cli
from tests.conftest import ROOT, import_benchmark


def example(name: str):
    return import_benchmark(name, folder="examples")


def tiny_model(tiny_model_dir) -> list[str]:
    return [f"model.name={tiny_model_dir}", "model.max_length=16", "rounds=1",
            "local.steps=1", "local.batch_size=8", "lora.rank=4", "clients.num=4",
            "data.min_partition_size=5", "eval.every=1", "progress=false"]


def tiny_data(tiny_data_file) -> list[str]:
    return ["data.source=files", f"data.train_path={tiny_data_file}",
            "data.max_test_examples=null"]


def test_own_csv_compares_methods_on_one_partition_and_plots_them(
        tiny_model_dir, tiny_data_file, tmp_path):
    results = example("own_csv").main([*tiny_model(tiny_model_dir), "--csv",
                                       str(tiny_data_file), "--out", str(tmp_path),
                                       "--methods", "sfed", "fedit", "local"])
    assert list(results) == ["sfed", "fedit", "local"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert results["local"].summary["bytes_total"] == 0 < results["fedit"].summary["bytes_total"]
    # the same clients for every method: one partition, read back from each run
    parts = {m: json.loads((r.run_dir / "metrics.jsonl").read_text().splitlines()[0])
             ["majority_baseline_accuracy"] for m, r in results.items()}
    assert len(set(parts.values())) == 1


def test_own_csv_without_a_file_writes_one_from_the_offline_corpus(tmp_path):
    import pandas as pd

    frame = pd.read_csv(example("own_csv").bbc_csv(tmp_path / "bbc.csv", per_topic=3))
    assert list(frame.columns) == ["text", "label"]
    assert frame.label.value_counts().tolist() == [3] * 5


def test_causal_lm_sft_fine_tunes_on_a_prompt_response_file(tiny_llama_dir, tmp_path):
    result = example("causal_lm_sft").main([
        f"model.name={tiny_llama_dir}", "model.max_length=48", "rounds=1", "local.steps=1",
        "eval.generate=1", "eval.max_new_tokens=4", "progress=false",
        "--out", str(tmp_path)])
    assert result.config.task == "causal-lm"
    assert (tmp_path / "pairs.jsonl").is_file()  # the default file, written and read
    assert result.metrics["personalized_perplexity"].notna().all()
    assert set(result.adapters()) == {f"client_{k}" for k in range(4)}  # sfed: per client


def test_lr_sweep_chooses_on_selection_seeds_and_reports_only_others(
        tiny_model_dir, tiny_data_file, tmp_path):
    best, selection, reporting = example("lr_sweep").main([
        *tiny_model(tiny_model_dir), *tiny_data(tiny_data_file), "--rates", "1e-3", "1e-1",
        "--select-seeds", "100", "101", "--report-seeds", "0", "1", "--out", str(tmp_path)])
    # the choice, recomputed from the selection runs' directories alone
    accuracy: dict[float, list[float]] = {}
    for run in selection.runs().values():
        assert run.config.seed in (100, 101)
        accuracy.setdefault(run.config.local.lr, []).append(
            run.summary["personalized_val_accuracy"])
    assert sorted(len(v) for v in accuracy.values()) == [2, 2]
    means = {lr: sum(v) / 2 for lr, v in accuracy.items()}
    assert best == min(means, key=lambda lr: (-means[lr], lr))
    # only the chosen rate is reported, and only on the reporting seeds
    reported = list(reporting.runs().values())
    assert sorted(r.config.seed for r in reported) == [0, 1]
    assert {r.config.local.lr for r in reported} == {best}


def test_lr_sweep_refuses_a_seed_that_would_both_choose_and_be_reported(tmp_path, capsys):
    with pytest.raises(SystemExit):
        example("lr_sweep").main(["--select-seeds", "0", "--report-seeds", "0", "1",
                                  "--out", str(tmp_path)])
    assert "seeds [0] would both choose and be reported" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any run


def test_load_in_peft_classifies_with_each_clients_adapter(tiny_model_dir, tiny_data_file,
                                                          tmp_path):
    run = sfedlora.run(None, *tiny_model(tiny_model_dir), *tiny_data(tiny_data_file),
                       "method=fedsa", f"output_dir={tmp_path / 'run'}")
    texts = ["match goal team coach", "bank market shares profit"]
    predictions = example("load_in_peft").main([str(run.run_dir), *texts])
    assert sorted(predictions) == sorted(run.adapters())
    labels = json.loads((run.run_dir / "labels.json").read_text())
    for names, logits in predictions.values():
        assert logits.shape == (2, len(labels)) and set(names) <= set(labels)
    # private heads: two clients' adapters are two models
    (_, first), (_, second) = list(predictions.values())[:2]
    assert not first.equal(second)


def test_two_nodes_writes_credentials_and_the_commands_for_each_machine(tmp_path):
    plan = example("two_nodes").main(["--out", str(tmp_path), "--superlink", "10.0.0.5"])
    lines = [line for machine in plan.values() for line in machine]
    assert any("flower-superlink" in x and "--enable-supernode-auth" in x for x in lines)
    nodes = [x for x in lines if x.startswith("flower-supernode")]
    assert len(nodes) == 2 and all("--superlink 10.0.0.5:8000" in x for x in nodes)
    assert [re.search(r"partition-id=(\d)", x).group(1) for x in nodes] == ["0", "1"]
    # each node's messages answered by its sfedlora runtime, beside its SuperNode
    assert all("--isolation process --port 9094" in x for x in nodes)
    assert [x.split("#")[0].strip() for x in lines if "node-runtime" in x] == [
        "sfedlora node-runtime --clientappio-api-address 127.0.0.1:9094"] * 2
    for k in range(2):  # private keys readable by their owner only
        mode = stat.S_IMODE((tmp_path / "keys" / f"node-{k}").stat().st_mode)
        assert mode == 0o600
    assert (tmp_path / "app" / "pyproject.toml").is_file()


def test_two_nodes_rehearses_on_this_machine_through_deploy_local(tmp_path, monkeypatch):
    """``--here`` hands the experiment to ``deploy_local`` with two nodes. The deployment
    itself (TLS, registered keys, results equal to in-process, no process left) is what
    tests/test_deploy.py runs; a second real deployment here would cost a minute and a
    half of the suite's budget for the same code."""
    module = example("two_nodes")
    calls = []
    monkeypatch.setattr(module, "deploy_local", lambda config, overrides, nodes, **kw: (
        calls.append((config, overrides, nodes, kw)) or tmp_path / "run"))
    assert module.main(["rounds=2", "--here", "--out", str(tmp_path)]) == tmp_path / "run"
    ((config, overrides, nodes, kw),) = calls
    assert config == str(ROOT / "configs/demo.yaml") and nodes == 2
    assert overrides == ["rounds=2", f"output_dir={tmp_path / 'run'}"]
    assert kw == {"overwrite": True}


# --- the README's examples ------------------------------------------------------------


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readmes_own_data_example_runs(tiny_model_dir, tiny_data_file, tmp_path,
                                           monkeypatch):
    (yaml_block,) = readme_blocks("yaml")
    config = yaml_block.split("\n", 1)[0].split(":")[0].removeprefix("# ")
    monkeypatch.chdir(tmp_path)
    (tmp_path / config).write_text(yaml_block)
    shutil.copy(tiny_data_file, tmp_path / "reviews.csv")  # columns text, label
    commands = [line.split() for block in readme_blocks("bash")
                for line in block.splitlines() if config in line]
    assert len(commands) == 2
    for command in commands:
        assert command[:2] == [".venv/bin/sfedlora", "run"]
        assert cli([*command[1:], *tiny_model(tiny_model_dir), "rounds=1",
                    f"output_dir={tmp_path / command[-1]}"]) == 0
        assert (tmp_path / command[-1] / "summary.json").is_file()


def test_the_readmes_python_example_runs(tiny_model_dir, tiny_data_file, tmp_path,
                                         monkeypatch, capsys):
    (python_block,) = readme_blocks("python")
    tiny = [*tiny_model(tiny_model_dir), *tiny_data(tiny_data_file)]
    real_run, real_sweep = sfedlora.run, sfedlora.sweep
    # the README's calls, at the tiny size: its own arguments first, ours after win
    monkeypatch.setattr(sfedlora, "run", lambda config, *o, **k: real_run(
        ROOT / config, *o, *tiny, f"output_dir={tmp_path / 'run'}", **k))
    monkeypatch.setattr(sfedlora, "sweep", lambda config, grid, *o, **k: real_sweep(
        ROOT / config, grid, *o, *tiny, **{**k, "out": tmp_path / "sweep"}))
    scope: dict = {}
    exec(compile(python_block, "README.md", "exec"), scope)
    assert scope["result"].config.method == "fedit"
    assert scope["model"].__class__.__name__ == "PeftModelForSequenceClassification"
    assert sorted(scope["swept"].results["local.lr"]) == [2e-4, 8e-4]
    assert "personalized_accuracy" in capsys.readouterr().out
