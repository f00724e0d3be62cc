"""The data directory: where named datasets (``data.dataset: sst2``) are read from,
and how ``sfedlora data get`` fills it.

The directory is ``$SFEDLORA_DATA`` when set, else ``$XDG_CACHE_HOME/sfedlora/data``
(``~/.cache/sfedlora/data``). Dataset ``NAME`` lives in ``<dir>/NAME/`` as the plain
files :mod:`sfedlora.settings.datasets` lists, so a machine without network access can
be given them by copying a folder (``sfedlora data get NAME --from FOLDER``).
"""

from __future__ import annotations

import csv
import filecmp
import os
import shutil
from pathlib import Path

from sfedlora.settings import ConfigError
from sfedlora.settings.datasets import DATASETS, DatasetSpec

ENV = "SFEDLORA_DATA"


def data_dir() -> Path:
    """The data directory (not created here)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "sfedlora" / "data"


def spec_of(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; sfedlora names: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_files(name: str) -> tuple[Path, Path]:
    """The train and test files of a named dataset, or a ``ConfigError`` that says
    which file is missing and the command that fetches it."""
    spec = spec_of(name)
    folder = data_dir() / name
    files = folder / spec.train, folder / spec.test
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"data.dataset={name!r}: {', '.join(missing)} not found. Fetch it with "
            f"`sfedlora data get {name}` (from the Hugging Face Hub), or copy a folder "
            f"holding {spec.train} and {spec.test} with `sfedlora data get {name} --from "
            f"FOLDER`; the data directory is ${ENV} (now {data_dir()})."
        )
    return files


def get(name: str, source: Path | None = None) -> Path:
    """Fill ``<data dir>/<name>/`` from a local folder holding the dataset's files, or
    else from the Hugging Face Hub; returns the folder. Files are written under a
    temporary name and renamed, so an interrupted fetch leaves no half file behind."""
    spec = spec_of(name)
    folder = data_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for file in (spec.train, spec.test):
            found = Path(source) / file
            if not found.is_file():
                raise ConfigError(f"--from {source}: {found} does not exist; the folder "
                                  f"must hold {spec.train} and {spec.test}")
            _write_atomically(folder / file, lambda tmp, found=found: shutil.copyfile(found, tmp))
        return folder
    if spec.hub is None:
        raise ConfigError(f"dataset {name!r} has no Hub source; use --from FOLDER")
    import datasets  # the Hub client is only needed here

    try:
        splits = datasets.load_dataset(spec.hub.path, spec.hub.subset)
    except Exception as exc:  # network, authentication or a renamed dataset
        raise ConfigError(
            f"could not fetch {name!r} ({spec.hub.path}, {spec.hub.subset}) from the Hugging "
            f"Face Hub: {type(exc).__name__}: {str(exc)[:300]}. Without network access, copy "
            f"the files from a machine that has them: sfedlora data get {name} --from FOLDER"
        ) from None
    for split, role in spec.hub.splits.items():
        file = spec.train if role == "train" else spec.test
        frame, tsv = splits[split].to_pandas()[list(_columns(spec))], file.endswith(".tsv")
        _write_atomically(folder / file,
                          lambda tmp, frame=frame, tsv=tsv: _write_table(frame, tmp, tsv))
    return folder


def _columns(spec: DatasetSpec) -> list[str]:
    return list(dict.fromkeys(spec.columns.values()))


def _write_table(frame, path: Path, tsv: bool) -> None:
    if tsv:
        # The TSV reader takes quotes literally (SST-2's phrases contain them), so a
        # tab or newline inside a text cannot be escaped: refuse rather than corrupt.
        text = frame.select_dtypes("object")
        if text.apply(lambda col: col.str.contains("[\t\n]", regex=True)).to_numpy().any():
            raise ConfigError(f"{path.name}: a text contains a tab or newline; cannot write TSV")
        frame.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def status() -> list[tuple[str, str, bool]]:
    """(name, what it is, whether its files are present) for every named dataset."""
    folder = data_dir()
    return [(name, spec.about, all((folder / name / f).is_file() for f in (spec.train, spec.test)))
            for name, spec in DATASETS.items()]


# the data settings that only say where the files are
WHERE_KEYS = ("source", "dataset", "train_path", "test_path")


def _files(data: dict) -> tuple[Path, Path | None] | None:
    if data.get("source") == "named" and data.get("dataset") in DATASETS:
        spec, folder = DATASETS[data["dataset"]], data_dir() / data["dataset"]
        return folder / spec.train, folder / spec.test
    if data.get("source") == "files" and data.get("train_path"):
        test = data.get("test_path")
        return Path(data["train_path"]), Path(test) if test else None
    return None


def same_files(old: dict, new: dict) -> bool:
    """Whether two configs' ``data`` sections read the same files though one names a
    dataset and the other gives paths (a run made before datasets had names): the same
    file, or files of equal content, where both exist here; else the same
    ``<dataset>/<file>`` at the end of both paths."""
    pairs, news = _files(old), _files(new)
    if pairs is None or news is None:
        return False
    for a, b in zip(pairs, news, strict=True):
        if a is None or b is None:
            if a is not b:
                return False
        elif a.is_file() and b.is_file():
            if not (os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)):
                return False
        elif a.parts[-2:] != b.parts[-2:]:
            return False
    return True
