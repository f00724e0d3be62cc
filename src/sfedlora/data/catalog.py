"""The data directory: where named datasets (``data.dataset: sst2``) are read from,
and how ``sfedlora data get`` fills it.

The directory is ``$SFEDLORA_DATA`` when set, else ``$XDG_CACHE_HOME/sfedlora/data``
(``~/.cache/sfedlora/data``). Dataset ``NAME`` lives in ``<dir>/NAME/`` as the plain
files :mod:`sfedlora.settings.datasets` lists, so a machine without network access can
be given them by copying a folder (``sfedlora data get NAME --from FOLDER``).
"""

from __future__ import annotations

import csv
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
        frame = splits[split].to_pandas()[list(_columns(spec))]
        _write_atomically(folder / file, lambda tmp, frame=frame: _write_table(frame, tmp))
    return folder


def _columns(spec: DatasetSpec) -> list[str]:
    return list(dict.fromkeys(spec.columns.values()))


def _write_table(frame, path: Path) -> None:
    if path.name.endswith(".tsv.part"):
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
    write(tmp)
    tmp.replace(path)


def status() -> list[tuple[str, str, bool]]:
    """(name, what it is, whether its files are present) for every named dataset."""
    folder = data_dir()
    return [(name, spec.about, all((folder / name / f).is_file() for f in (spec.train, spec.test)))
            for name, spec in DATASETS.items()]
