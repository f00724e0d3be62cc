"""Named datasets (``data.dataset: sst2``): a config names data instead of a machine's
path, the data directory resolves it, ``sfedlora data get`` fills it, and a missing
dataset stops with the command that fetches it."""

from __future__ import annotations

import pandas as pd
import pytest

from sfedlora.cli import main
from sfedlora.config import ConfigError, DataConfig, load_config
from sfedlora.data import catalog
from sfedlora.data.sources import load_source

SST2_TRAIN = pd.DataFrame({"sentence": ["a fine film ", 'a "dull" one ', "great "],
                           "label": [1, 0, 1], "idx": [0, 1, 2]})
SST2_TEST = pd.DataFrame({"sentence": ["bad ", "good "], "label": [0, 1], "idx": [0, 1]})


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def test_a_named_dataset_brings_its_columns_and_the_users_own_win():
    cfg = DataConfig(dataset="sst2")
    assert (cfg.source, cfg.text_column, cfg.label_column) == ("named", "sentence", "label")
    assert DataConfig(dataset="sst2", text_column="text").text_column == "text"
    lm = DataConfig(dataset="gsm8k")
    assert (lm.prompt_column, lm.response_column) == ("question", "answer")
    assert DataConfig(source="hf", dataset="glue").text_column == "text"  # a Hub id: untouched


@pytest.mark.parametrize(("overrides", "needle"), [
    (["data.dataset=imdb"], "not a dataset sfedlora names; use one of sst2, gsm8k"),
    (["data.dataset=sst2", "data.source=bbc"], "remove data.source"),
    (["data.dataset=sst2", "data.train_path=x.tsv"], "remove data.train_path"),
    (["data.dataset=gsm8k"], "set task=causal-lm"),
])
def test_a_dataset_that_cannot_be_read_as_asked_is_refused_by_name(overrides, needle):
    with pytest.raises(ConfigError, match="data") as info:
        load_config(None, overrides)
    assert needle in str(info.value)


def test_a_missing_dataset_names_the_command_that_fetches_it(data_dir, capsys):
    with pytest.raises(ConfigError) as info:
        load_source(DataConfig(dataset="sst2"))
    message = str(info.value)
    assert "`sfedlora data get sst2`" in message and str(data_dir) in message
    assert main(["run", "configs/sst2_fedsa_rslora.yaml", "rounds=1"]) == 2
    assert "sfedlora data get sst2" in capsys.readouterr().err


def test_data_get_from_the_hub_writes_files_the_loader_reads_back(data_dir, monkeypatch):
    import datasets

    def load_dataset(path, subset):
        assert (path, subset) == ("nyu-mll/glue", "sst2")
        return datasets.DatasetDict({"train": datasets.Dataset.from_pandas(SST2_TRAIN),
                                     "validation": datasets.Dataset.from_pandas(SST2_TEST)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert main(["data", "get", "sst2"]) == 0
    assert sorted(p.name for p in (data_dir / "sst2").iterdir()) == ["test.tsv", "train.tsv"]
    train, test = load_source(DataConfig(dataset="sst2"))
    assert train.texts == SST2_TRAIN.sentence.tolist()  # quotes and trailing spaces kept
    assert train.labels.tolist() == [1, 0, 1] and test.labels.tolist() == [0, 1]


def test_data_get_refuses_a_text_it_cannot_write_as_tsv(data_dir, monkeypatch):
    import datasets

    bad = SST2_TRAIN.assign(sentence=["tab\there", "b", "c"])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: datasets.DatasetDict(
        {"train": datasets.Dataset.from_pandas(bad),
         "validation": datasets.Dataset.from_pandas(SST2_TEST)}))
    with pytest.raises(ConfigError, match="tab or newline"):
        catalog.get("sst2")
    assert not (data_dir / "sst2" / "train.tsv").exists()  # nothing half-written


def test_data_get_from_a_folder_copies_it_for_machines_offline(data_dir, tmp_path):
    source = tmp_path / "usb"
    source.mkdir()
    (source / "train.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(ConfigError, match=r"test\.jsonl does not exist"):
        catalog.get("gsm8k", source)
    (source / "test.jsonl").write_text('{"question": "2+2?", "answer": "#### 4"}\n')
    assert main(["data", "get", "gsm8k", "--from", str(source)]) == 0
    assert (data_dir / "gsm8k" / "test.jsonl").read_text() == (source / "test.jsonl").read_text()
    assert [row[2] for row in catalog.status()] == [False, True]


def test_a_named_dataset_and_the_paths_it_resolves_to_are_one_experiment(data_dir,
                                                                         tmp_path):
    """A committed sweep ran on paths; rerun with ``data.dataset`` it must recognise
    its runs (and must not when the files differ)."""
    folder = data_dir / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\na\t1\n")
    (folder / "test.tsv").write_text("sentence\tlabel\nb\t0\n")
    named = {"source": "named", "dataset": "sst2"}

    def files(train, test):
        return {"source": "files", "train_path": str(train), "test_path": str(test)}

    assert catalog.same_files(files(folder / "train.tsv", folder / "test.tsv"), named)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "train.tsv").write_text((folder / "train.tsv").read_text())
    (copy / "test.tsv").write_text("sentence\tlabel\nc\t1\n")  # another test set
    assert not catalog.same_files(files(copy / "train.tsv", copy / "test.tsv"), named)
    # files from a machine this one cannot see: the same <dataset>/<file>, or not
    assert catalog.same_files(files("../elsewhere/sst2/train.tsv",
                                    "../elsewhere/sst2/test.tsv"), named)
    assert not catalog.same_files(files("../elsewhere/imdb/train.tsv",
                                        "../elsewhere/imdb/test.tsv"), named)
    assert not catalog.same_files({"source": "bbc"}, named)
