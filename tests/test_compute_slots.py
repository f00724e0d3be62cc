"""Turns at the cores for deployed nodes that share a machine (``compute-slots``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from sfedlora.runtime.flower.compute_slots import compute_slot, slot_count


def test_at_most_k_hold_a_slot_and_a_freed_slot_lets_the_next_in(tmp_path):
    entered = threading.Event()

    def third():
        with compute_slot(tmp_path, 2):
            entered.set()

    with compute_slot(tmp_path, 2) as first, compute_slot(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
        thread = threading.Thread(target=third)
        thread.start()
        assert not entered.wait(0.5)  # both slots held: the third waits
    assert entered.wait(30)
    thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-0.lock", "slot-1.lock"]


def test_no_count_means_no_slot_and_no_files(tmp_path):
    with compute_slot(tmp_path / "slots", None) as index:
        assert index is None
    assert not (tmp_path / "slots").exists()


def test_a_killed_holder_frees_its_slot(tmp_path):
    """The kernel drops a dead process's flock: a node killed mid-message blocks no one."""
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from sfedlora.runtime.flower.compute_slots import compute_slot\n"
            "with compute_slot(Path(sys.argv[1]), 1):\n"
            "    print('holding', flush=True)\n"
            "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        entered = threading.Event()

        def wait_for_slot():
            with compute_slot(tmp_path, 1):
                entered.set()

        thread = threading.Thread(target=wait_for_slot, daemon=True)
        thread.start()
        assert not entered.wait(0.5)
        os.kill(holder.pid, signal.SIGKILL)
        assert entered.wait(30)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("value, count", [(None, None), ("", None), (3, 3), ("2", 2)])
def test_slot_count_reads_the_node_config(value, count):
    assert slot_count({} if value is None else {"compute-slots": value}) == count


@pytest.mark.parametrize("value", [0, "-1", "two", "1.5", 2.5])
def test_a_bad_slot_count_names_the_key_and_the_fix(value):
    with pytest.raises(ValueError, match=r"compute-slots=.*whole number.*at least 1"):
        slot_count({"compute-slots": value})


def test_a_nodes_slots_lie_in_its_private_workers_folder(tmp_path):
    """The slots' folder is created closed to other accounts, as the node's worker
    socket (which may share it) requires: a node that computes first in its slot must
    not leave a folder the worker channel then refuses."""
    import stat

    from sfedlora.runtime.flower.compute_slots import node_slot
    from sfedlora.runtime.flower.worker_channel import private_folder

    config = {"state-dir": str(tmp_path / "state"), "compute-slots": "1"}
    with node_slot(config) as slot:
        assert slot == 0
    for folder in (tmp_path / "state/workers", tmp_path / "state/workers/slots"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    private_folder(tmp_path / "state/workers")  # accepted
