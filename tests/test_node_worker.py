"""A deployed node's long-lived worker, without a deployment: the channel's privacy
(owner-only folder and socket, one node in one run), a message served through it
equal to the same message served in place, and a worker that dies (issue 40)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from sfedlora.config import to_yaml

pytest.importorskip("flwr")


@pytest.fixture
def node(tiny_config, tmp_path):
    """A deployed node's context (node 11 of run 7, client 1) and a query for it."""
    from flwr.app import ConfigRecord, Context, Metadata, RecordDict
    from flwr.app.message.message import make_message

    from sfedlora.runtime.flower import messages
    from sfedlora.runtime.flower.config import as_run_config

    cfg = tiny_config("method=sfed", "clients.num=2")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    context = Context(run_id=7, node_id=11, node_config={
        "partition-id": 1, "state-dir": str(tmp_path / "state"), "worker-idle-s": 60.0},
        state=RecordDict(), run_config=as_run_config(str(tmp_path / "config.yaml"), []))
    query = make_message(  # as the node receives it from the SuperLink
        Metadata(run_id=7, message_id="m1", src_node_id=1, dst_node_id=11,
                 reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600,
                 message_type="query"),
        RecordDict({messages.REQUEST: ConfigRecord({messages.WHAT: messages.LAYOUT})}))
    yield context, query
    _stop_workers(tmp_path / "state" / "workers")


def _stop_workers(folder):
    for status in folder.glob("*.json"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(json.loads(status.read_text())["pid"], signal.SIGKILL)


def _status(context, served: dict | None = None) -> dict:
    """The worker's status; with ``served``, once it counts that many (it writes the
    count after the reply is sent, so a reader may be a moment ahead of it)."""
    from sfedlora.runtime.flower.worker_channel import endpoint

    path = endpoint(context.node_config, 11, 7).status
    deadline = time.monotonic() + 30
    while True:
        status = json.loads(path.read_text())
        if served is None or status["served"] == served or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_a_message_through_the_worker_equals_the_message_served_in_place(node):
    from sfedlora.runtime.flower import handlers, messages
    from sfedlora.runtime.flower.client_app import handle
    from sfedlora.runtime.flower.worker_channel import endpoint

    context, query = node
    through = handle("query", query, context, {})
    here = handlers.query(query, context, {})
    assert through.metadata.reply_to_message_id == query.metadata.message_id
    assert through.content[messages.REPLY][messages.CLIENT] == 1
    assert (through.content[messages.REPLY][messages.LAYOUT]
            == here.content[messages.REPLY][messages.LAYOUT])
    pid = _status(context)["pid"]
    handle("query", query, context, {})  # the same worker serves the next message
    assert _status(context, {"query": 2}) == {"pid": pid, "node_id": 11, "run_id": 7,
                                              "served": {"query": 2}, "serving": None}
    ep = endpoint(context.node_config, 11, 7)
    assert stat.S_IMODE(ep.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(ep.socket.stat().st_mode) == 0o600


def test_the_worker_refuses_another_node_or_run(node):
    from flwr.common.serde import context_to_proto, message_to_proto

    from sfedlora.runtime.flower.client_app import handle
    from sfedlora.runtime.flower.worker_channel import (
        WorkerError,
        endpoint,
        forward,
        recv_frame,
        send_frame,
    )

    context, query = node
    handle("query", query, context, {})  # starts node 11's worker for run 7
    ep = endpoint(context.node_config, 11, 7)
    for node_id, run_id in ((12, 7), (11, 8)):
        context.node_id, context.run_id = node_id, run_id
        with socket.socket(socket.AF_UNIX) as sock:  # straight to node 11's socket
            sock.connect(str(ep.socket))
            send_frame(sock, {"kind": "query", "defaults": {}},
                       message_to_proto(query).SerializeToString(),
                       context_to_proto(context).SerializeToString())
            header, _ = recv_frame(sock)
        assert header["error"] == (f"refused: this worker serves node 11 in run 7, the "
                                   f"message is for node {node_id} in run {run_id}")
    context.node_id, context.run_id = 11, 7
    context.node_config["partition-id"] = 0  # a query for client 1 reaching client 0's node
    request = query.content["request"]
    request["client"] = 1
    with pytest.raises(WorkerError, match="client 1 reached the node of partition-id=0"):
        forward("query", query, context, {})


def test_a_folder_others_can_enter_is_refused(tmp_path):
    from sfedlora.runtime.flower.worker_channel import WorkerError, endpoint

    (tmp_path / "workers").mkdir(mode=0o755)
    os.chmod(tmp_path / "workers", 0o755)
    with pytest.raises(WorkerError, match=r"closed to others .*chmod 700"):
        endpoint({"state-dir": str(tmp_path)}, 1, 2)


def test_a_long_state_dir_puts_the_socket_in_a_private_runtime_folder(tmp_path, monkeypatch):
    import shutil
    import tempfile

    from sfedlora.runtime.flower.worker_channel import endpoint

    runtime = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short, like /run/user/<uid>
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        deep = tmp_path / ("x" * 120)
        big = 2**64 - 1  # Flower's node and run ids are 64-bit
        ep = endpoint({"state-dir": str(deep)}, big, big)
        assert ep.folder.parent == runtime / f"sfedlora-{os.getuid()}"
        assert len(str(ep.socket)) <= 100 and stat.S_IMODE(ep.folder.stat().st_mode) == 0o700
        assert endpoint({"state-dir": str(deep)}, 1, 1).folder == ep.folder  # one per state dir
    finally:
        shutil.rmtree(runtime)


def test_a_worker_killed_mid_message_fails_that_message_and_the_next_starts_anew(node):
    import threading

    from sfedlora.runtime.flower.client_app import handle
    from sfedlora.runtime.flower.worker_channel import WorkerError, endpoint

    context, query = node
    handle("query", query, context, {})
    first = _status(context)["pid"]
    ep = endpoint(context.node_config, 11, 7)
    # a client that connects and says nothing holds the worker (one message at a time),
    # so the next message is in flight when the worker is killed
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(ep.socket))
    outcome: list = []

    def send():
        try:
            outcome.append(handle("query", query, context, {}))
        except WorkerError as err:
            outcome.append(err)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    thread.join(60)
    holder.close()
    assert isinstance(outcome[0], WorkerError) and "died while serving a query" in str(outcome[0])
    reply = handle("query", query, context, {})  # a new worker, started by this message
    assert reply.content["reply"]["client"] == 1
    assert _status(context, {"query": 1})["pid"] != first


def test_a_worker_computes_only_in_a_free_compute_slot(node):
    """Nodes that share a machine take turns (``compute-slots``): while every slot is
    held elsewhere, the worker's message waits; it is served once one frees."""
    import threading

    from sfedlora.runtime.flower.client_app import handle
    from sfedlora.runtime.flower.compute_slots import node_slot

    context, query = node
    context.node_config["compute-slots"] = 1
    handle("query", query, context, {})  # the worker is up
    served: list = []
    with node_slot(context.node_config) as index:  # this process holds the one slot
        assert index == 0
        thread = threading.Thread(target=lambda: served.append(handle("query", query,
                                                                      context, {})))
        thread.start()
        thread.join(1.0)
        assert served == [] and _status(context)["serving"] == "query"
    thread.join(60)
    assert served[0].content["reply"]["client"] == 1
