"""Bad input stops before any work with one message naming the field and the fix."""

from __future__ import annotations

import json

import pytest

from sfedlora.cli import main
from sfedlora.config import ConfigError, load_config
from sfedlora.methods import REGISTRY
from sfedlora.runtime.experiment import build_experiment


def test_defaults_are_the_offline_main_job():
    cfg = load_config()
    assert cfg.method == "sfed" and cfg.data.source == "bbc"
    assert cfg.model_name == "all-MiniLM-L6-v2"
    assert cfg.scaling == "sfed" and cfg.a_init == "independent"


@pytest.mark.parametrize(("method", "option", "message"), [
    ("fedsvd", "options.train_hed=false", "options.train_hed: Extra inputs are not permitted "
     "(method=fedsvd takes options train_head)"),
    ("fedsvd", "options.train_head=maybe", "options.train_head: Input should be a valid "
     "boolean"),
    ("fedit", "options.train_head=false", "(method=fedit takes options none)"),
])
def test_a_methods_options_are_checked_by_its_own_model(method, option, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"method={method}", option])
    assert message in str(err.value)
    assert load_config(None, ["method=fedsvd", "options.train_head=false"]).options == {
        "train_head": False}


def test_dotted_overrides_reach_every_key(tmp_path):
    cfg = load_config(None, ["lora.rank=32", "clients.per_round=0.5", "local.optimizer=sgd",
                             "lora.targets=[query,key]", "data.label_column=y"])
    assert cfg.lora.rank == 32 and cfg.clients_per_round == 5
    assert cfg.local.optimizer == "sgd" and cfg.lora.targets == ["query", "key"]
    assert cfg.data.label_column == "y"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: fedit\nlora:\n  rank: 4\n")
    cfg = load_config(path, ["lora.rank=16"])
    assert cfg.method == "fedit" and cfg.lora.rank == 16 and cfg.scaling == "lora"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rnak=8"], "unknown key 'lora.rnak'; did you mean 'lora.rank'"),
        (["colour=blue"], "unknown key 'colour'"),
        # a key that extends a known one is reported as itself, not as the known key
        (["local.lrx=0.01"], "unknown key 'local.lrx'; did you mean 'local.lr'"),
        (["eval.everyx=2"], "unknown key 'eval.everyx'; did you mean 'eval.every'"),
        (["lora.rank=0"], "lora.rank=0: Input should be greater than 0"),
        (["lora.rank=eight"], "lora.rank='eight'"),
        (["local.lr=fast"], "local.lr='fast'"),
        (["method=fedavg"], "method='fedavg'"),
        (["method=ffa", "lora.a_init=independent"],
         "lora.a_init='independent' does not apply to method 'ffa'"),
        (["method=rolora", "lora.a_init=shared"], "remove lora.a_init"),
        (["local.epochs=2"], "local.steps and local.epochs are both set"),
        (["clients.per_round=20"], "clients.per_round=20 must be between 1 and clients.num=10"),
        (["clients.per_round=1.5"], "a fraction must lie in (0, 1]"),
        (["data.source=files"], "data.source=files needs data.train_path"),
        (["data.source=hf"], "data.source=hf needs data.dataset"),
        (["lora.scaling=huge"], "lora.scaling='huge'"),
        (["clients.min_clients=11"], "clients.min_clients=11 exceeds"),
        (["novalue"], "not of the form dotted.key=value"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_files_are_read_as_safe_yaml_1_1(tmp_path):
    """A config file reads as ``yaml.safe_load`` reads it (libyaml's parser is used where
    PyYAML has it): YAML 1.1's scalars, and no tag that builds a Python object."""
    import yaml

    from sfedlora.settings.loading import read_yaml

    text = "a: yes\nb: 1e-3\nc: 1.0e-3\nd: ~\ne: [0x1f, '7', 010]\nf: {g: 2026-12-07}\n"
    assert read_yaml(text) == yaml.safe_load(text)
    assert read_yaml(text)["a"] is True and read_yaml(text)["b"] == "1e-3"
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_label_column_that_does_not_exist(tiny_config):
    cfg = tiny_config("data.label_column=category")
    with pytest.raises(ConfigError) as err:
        build_experiment(cfg)
    msg = str(err.value)
    assert "data.label_column='category' is not a column" in msg and "'label'" in msg


def test_more_clients_than_examples(tiny_config):
    cfg = tiny_config("clients.num=500", "data.partition=iid")
    with pytest.raises(ConfigError, match=r"clients\.num=500 exceeds the 192 training examples"):
        build_experiment(cfg)


def test_unreachable_hub_dataset_says_so(tiny_config):
    cfg = tiny_config("data.source=hf", "data.dataset=glue", "data.subset=sst2")
    with pytest.raises(ConfigError, match="could not be loaded from the Hugging Face Hub"):
        build_experiment(cfg)


def test_unloadable_model_says_so(tiny_config, tmp_path):
    cfg = tiny_config(f"model.name={tmp_path / 'no-model-here'}")
    with pytest.raises(ConfigError, match="could not be loaded"):
        build_experiment(cfg)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["run", "lora.rank=0"]) == 2
    assert "lora.rank=0" in capsys.readouterr().err


def test_config_command_prints_the_resolved_config(capsys, tmp_path):
    import yaml

    assert main(["config", "lora.rank=32", "method=fedsa"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["rank"] == 32 and printed["method"] == "fedsa"
    assert load_config(None, ["lora.rank=32", "method=fedsa"]).model_dump(mode="json") == printed


def test_device_that_is_not_there(tiny_config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        build_experiment(tiny_config("model.device=cuda"))
    with pytest.raises(ConfigError, match="is not a torch device"):
        build_experiment(tiny_config("model.device=gpu0"))


def test_a_config_written_before_methods_owned_their_settings_still_loads(tmp_path):
    """Saved configs of older runs spell out sections soft, tsfa and personal: their
    keys reach the method that takes them as options, and a method that takes none
    (fedit) drops them, as it always ignored them."""
    import yaml

    from sfedlora.config import to_yaml

    old = yaml.safe_load(to_yaml(load_config(None, ["method=tsfa", "network.model=wireless",
                                                    "network.allocation=min_max"])))
    old.pop("options")
    old["soft"] = {"ortho_weight": 0.01, "keep": 0.25, "importance": "svd"}
    old["tsfa"] = {"v": 4.0, "latency_budget_s": 2.5}
    old["personal"] = {"holdout": 8}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path, ["options.v=8.0"])  # an options value wins
    assert cfg.options == {"ortho_weight": 0.01, "keep": 0.25, "importance": "svd",
                           "v": 8.0, "latency_budget_s": 2.5}
    assert "soft" not in cfg.model_dump() and "soft" not in to_yaml(cfg)
    fedit = load_config(path, ["method=fedit", "network.model=none", "network.allocation=equal"])
    assert fedit.options == {}
    fdlora = load_config(path, ["method=fdlora", "network.model=none",
                                "network.allocation=equal"])
    assert fdlora.options == {"holdout": 8}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_the_main_job_runs_with_every_method(method, tiny_model_dir, tiny_data_file,
                                              tmp_path):
    """``sfedlora run configs/demo.yaml method=NAME`` works for every method: the
    shipped config spells out nothing one method needs and another refuses. Only a
    setting the method itself needs stops it, and the message names it (TSFA's
    wireless network). At the tiny size: one round, evaluated."""
    from pathlib import Path

    from sfedlora.runtime.simulation import Simulation
    from tests.conftest import tiny_base

    demo = Path(__file__).parents[1] / "configs/demo.yaml"
    tiny = [*tiny_base(tiny_model_dir, tiny_data_file, tmp_path / "run"), "rounds=1",
            "local.steps=1", "eval.every=1", "data.max_test_examples=null"]
    if method == "tsfa":
        with pytest.raises(ConfigError, match=r"network\.model"):
            load_config(demo, [f"method={method}", *tiny])
        tiny += ["network.model=wireless", "network.allocation=min_max"]
    cfg = load_config(demo, [f"method={method}", *tiny])
    summary = Simulation(cfg).run()
    assert summary["method"] == method
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1]
