"""The datasets a config can name (``data.dataset: sst2``): which files hold them, the
columns to read and the task they suit.

A config names a dataset rather than a path so that it runs on any machine: the files
are looked up in the data directory (``SFEDLORA_DATA``, see
:func:`sfedlora.data.catalog.data_dir`) and ``sfedlora data get NAME`` fills it. This
module is the table only; it sits in the settings layer so that validation can fill in
a named dataset's columns and check its task before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HubSource:
    """Where ``sfedlora data get`` fetches a dataset: a Hugging Face dataset id, its
    config, and which split becomes which file."""

    path: str
    subset: str | None
    splits: dict[str, str]  # hub split -> "train" / "test"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str  # the task it suits: "classification" or "causal-lm"
    train: str  # file names inside <data dir>/<name>/
    test: str
    columns: dict[str, str] = field(default_factory=dict)  # data.* column settings
    hub: HubSource | None = None
    about: str = ""


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "sst2", "classification", "train.tsv", "test.tsv",
            {"text_column": "sentence", "label_column": "label"},
            HubSource("nyu-mll/glue", "sst2", {"train": "train", "validation": "test"}),
            "SST-2 (GLUE): movie-review phrases, 2 sentiment labels; the test file is "
            "GLUE's validation set (its own test labels are hidden)",
        ),
        DatasetSpec(
            "gsm8k", "causal-lm", "train.jsonl", "test.jsonl",
            {"prompt_column": "question", "response_column": "answer"},
            HubSource("openai/gsm8k", "main", {"train": "train", "test": "test"}),
            "GSM8K: grade-school maths word problems; the answer ends with '#### <number>'",
        ),
    )
}
