"""Named tensor stores a runtime gives the clients of one machine: what one client
received and another may need (FLoRA's merged factors, for a model that serves several
clients). In memory for the in-process runtime; on disk, as safetensors written
atomically, in a Flower node's state directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from safetensors.torch import load_file, save_file

from sfedlora.core.records import Tensors


class TensorStore(Protocol):
    def get(self, key: str) -> Tensors | None: ...

    def put(self, key: str, tensors: Tensors) -> None: ...


class MemoryStore:
    def __init__(self):
        self.items: dict[str, Tensors] = {}

    def get(self, key: str) -> Tensors | None:
        return self.items.get(key)

    def put(self, key: str, tensors: Tensors) -> None:
        self.items[key] = tensors


class DiskStore:
    """One safetensors file per key under ``root``; a write goes to a temporary name
    and is renamed, so a reader never sees half a file."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> Tensors | None:
        path = self._path(key)
        return load_file(str(path)) if path.is_file() else None

    def put(self, key: str, tensors: Tensors) -> None:
        path = self._path(key)
        if path.is_file():
            return  # what was stored under a key never changes
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
