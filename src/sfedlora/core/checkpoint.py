"""Checkpoints: everything a run needs to continue bit-identically, in one file.

The file is safetensors: the tensors (the server's state, optimizer and method state;
the client pool's state, i.e. in-process every client's private tensors, optimizer
state, residual and method-owned tensors, while Flower nodes keep theirs in their state
directories) plus a JSON document in the safetensors metadata for the rest (round, byte
totals, the resolved config, the metrics lines written so far, the structure of every
nested state). Nothing is ever
unpickled, so a crafted file cannot run code; it fails to parse instead. It is written
to a temporary name and renamed over the old one, so a crash leaves either the previous
checkpoint or the new one, never half of one.

RNG state needs no saving: every random draw (client sampling, batch order, dropout,
A inits) is seeded from (seed, round, client), so a resumed round draws what the
uninterrupted round would have drawn. DP is the exception: its noise and its client
sampling come from OS entropy (a seeded draw could be recomputed by anyone who knows
the seed), so a DP run continues from the noised state its checkpoint holds, with the
participation schedule the checkpoint keeps (``totals["sampler"]``), and draws fresh
noise after it. A DP checkpoint is therefore secret: it says who took part.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sfedlora.core import wire
from sfedlora.core.records import ClientState

FORMAT = "sfedlora-checkpoint/4"
FILENAME = "checkpoint.safetensors"
CLIENT_FIELDS = ("private", "optimizer", "residual", "method", "held")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


@dataclass
class Checkpoint:
    round: int
    server: dict[str, Any]  # Server.state_dict(): state, optimizer, method stage
    pool: dict[str, Any]  # ClientPool.state_dict()
    totals: dict[str, Any]  # byte counts, wall seconds, the run key
    config: dict[str, Any]
    metrics: list[str]  # the lines of metrics.jsonl up to this round, verbatim


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure with tensors replaced by references into ``tensors``.
    Dicts become lists of pairs so integer keys (optimizer state) survive."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": prefix}
    if isinstance(obj, ClientState):
        return {"client": {f: _flatten(getattr(obj, f), f"{prefix}/{f}", tensors)
                           for f in CLIENT_FIELDS}}
    if isinstance(obj, dict):
        return {"dict": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return {"list": [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    return {"value": obj}


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "client" in node:
        return ClientState(**{f: _unflatten(v, tensors) for f, v in node["client"].items()
                              if f in CLIENT_FIELDS})
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_unflatten(v, tensors) for v in node["list"]]
    return node["value"]


def sync_directory(folder: Path) -> None:
    """fsync a directory, so a rename inside it reaches the disk."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``data`` at ``path`` or, after any crash, the file that was there before: written
    to a temporary name with ``mode``, fsynced, renamed over ``path``, and the rename
    fsynced through the directory (as checkpoints are written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(path.parent)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": FORMAT,
        "round": ckpt.round,
        "totals": ckpt.totals,
        "config": ckpt.config,
        "metrics": ckpt.metrics,
        "server": _flatten(ckpt.server, "server", tensors),
        "pool": _flatten(ckpt.pool, "pool", tensors),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"sfedlora": json.dumps(doc)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # the previous checkpoint stays until here
    sync_directory(path.parent)  # and the rename itself reaches disk


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; was the run started with "
                              "checkpoint.every > 0, and did it finish a round?")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        doc = json.loads(meta["sfedlora"])
        if doc.get("format") != FORMAT:
            raise KeyError("format")
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not an sfedlora checkpoint ({type(exc).__name__}: {exc}); checkpoints "
            "are safetensors files, and sfedlora never unpickles anything"
        ) from None
    return Checkpoint(
        round=int(doc["round"]),
        server=_unflatten(doc["server"], tensors),
        pool=_unflatten(doc["pool"], tensors),
        totals=doc["totals"],
        config=doc["config"],
        metrics=doc["metrics"],
    )


CLIENT_FORMAT = "sfedlora-client-state/2"


def encode_client_state(state: ClientState) -> bytes:
    """One client's private state as safetensors bytes, in the checkpoint's layout: a
    Flower node keeps it in its state directory. A fresh state is zero bytes."""
    tensors: dict[str, torch.Tensor] = {}
    fields = {part: _flatten(getattr(state, part), part, tensors) for part in CLIENT_FIELDS}
    if not tensors:
        return b""
    return wire.encode(tensors, {"format": CLIENT_FORMAT, "fields": fields})


def decode_client_state(data: bytes) -> ClientState:
    if not data:
        return ClientState()
    try:
        meta, tensors = wire.read_meta(data), wire.decode(data)
    except wire.MessageError as exc:
        raise CheckpointError(f"not an sfedlora client state: {exc}") from None
    if meta.get("format") != CLIENT_FORMAT:
        raise CheckpointError(f"client state format {meta.get('format')!r}, expected "
                              f"{CLIENT_FORMAT!r}")
    return ClientState(**{part: _unflatten(meta["fields"][part], tensors)
                          for part in CLIENT_FIELDS if part in meta["fields"]})
