"""Turns at the cores for nodes that share one machine.

``deploy-local`` runs every SuperNode of a federation on one machine. Left alone, ten
nodes' workers would train at once, ten single-threaded models on two cores: each one
slower for the others' cache misses, and every reply held back until the slowest. The
in-process runtime and Flower's simulation engine instead give each core one client at
a time. Nodes started with ``compute-slots=K`` in their node config do the same: at most
K of the nodes that share a state directory handle a message at once, the rest wait
their turn. Which node goes first changes no result (each client's work depends only
on its own message and state); a node alone on its machine leaves the key out.

The slots are ``flock`` locks on K files under ``<state-dir>/workers/slots``: the
kernel releases a slot whose holder dies, so a killed worker blocks no one. Waiters
poll every 20 ms, because ``flock`` can block on one file only; written by
hand since no maintained library offers a cross-process counting semaphore that frees
a dead holder's slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from sfedlora.runtime.flower.worker_channel import private_folder, state_dir

SLOTS_KEY = "compute-slots"  # node config: nodes sharing this state-dir compute K at a time
POLL_S = 0.02


def slot_count(node_config) -> int | None:
    """The node config's ``compute-slots`` (None: no limit); a clear error when it is
    not a positive whole number."""
    value = node_config.get(SLOTS_KEY)
    if value in (None, ""):
        return None
    try:
        count = int(str(value))
    except ValueError:
        count = 0
    if count < 1 or str(count) != str(value).strip():
        raise ValueError(f"node config {SLOTS_KEY}={value!r}: give a whole number of "
                         "nodes that may compute at once (at least 1), or leave it out")
    return count


@contextlib.contextmanager
def compute_slot(folder: Path, count: int | None) -> Iterator[int | None]:
    """Hold one of ``count`` slots under ``folder`` for the block (which one is
    yielded); with ``count`` None, no slot and no wait."""
    if count is None:
        yield None
        return
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    handles = [os.open(folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
               for i in range(count)]
    try:
        while True:
            for index, handle in enumerate(handles):
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield index
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return
            time.sleep(POLL_S)
    finally:
        for handle in handles:
            os.close(handle)


def node_slot(node_config) -> contextlib.AbstractContextManager[int | None]:
    """The slot this node's message computes in: one of ``compute-slots`` shared by the
    nodes whose state directory is this node's (none without the key). The slots lie in
    the nodes' private ``workers`` folder, which a node's worker socket may share."""
    count = slot_count(node_config)
    if count is None:
        return compute_slot(Path(), None)
    return compute_slot(private_folder(state_dir(node_config) / "workers") / "slots", count)
