"""A deployed node's long-lived worker: it serves the node's messages with the model,
tokenizer and data loaded once.

Started by the node's first ClientApp process (:func:`~.worker_channel.connect`), it
listens on the node's private socket and answers one message per connection, one at a
time, with the same handlers a ClientApp runs (:mod:`~sfedlora.runtime.flower.handlers`).
Every client state is read from and written to the node's state directory as before,
so a worker that dies loses nothing a new one cannot read back. It exits when its
SuperNode does, or after ``worker-idle-s`` seconds without a message.

``python -m sfedlora.runtime.flower.node_worker --help`` lists its arguments; nothing but
:func:`~.worker_channel.connect` needs to start it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import time
import traceback
from pathlib import Path

from sfedlora.runtime.flower.compute_slots import node_slot
from sfedlora.runtime.flower.worker_channel import recv_frame, send_frame, write_status

log = logging.getLogger("sfedlora.node_worker")
POLL_S = 2.0  # how often an idle worker checks on its SuperNode


def _peer_uid(conn: socket.socket) -> int:
    if not hasattr(socket, "SO_PEERCRED"):  # macOS: the folder's 0700 is the guard
        return os.getuid()
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    struct.calcsize("3i")))
    return uid


class NodeWorker:
    def __init__(self, node_id: int, run_id: int, status: Path):
        from sfedlora.runtime.flower import handlers  # torch and the model stack, once

        self.handlers = handlers.HANDLERS
        self.node_id, self.run_id, self.status = node_id, run_id, status
        self.served: dict[str, int] = {}  # messages answered, by kind
        self._write(None)

    def _write(self, serving: str | None) -> None:
        write_status(self.status, {"pid": os.getpid(), "node_id": self.node_id,
                                   "run_id": self.run_id, "served": self.served,
                                   "serving": serving})

    def serve(self, conn: socket.socket) -> None:
        """Answer the one message ``conn`` carries."""
        from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        if _peer_uid(conn) != os.getuid():
            log.warning("refused a connection from another account")
            return
        header, (msg_bytes, context_bytes) = recv_frame(conn)
        context = context_from_proto(ProtoContext.FromString(context_bytes))
        if (context.node_id, context.run_id) != (self.node_id, self.run_id):
            send_frame(conn, {"error": f"refused: this worker serves node {self.node_id} in "
                                       f"run {self.run_id}, the message is for node "
                                       f"{context.node_id} in run {context.run_id}"})
            return
        kind = header["kind"]
        self._write(kind)
        start = time.perf_counter()
        try:
            msg = message_from_proto(ProtoMessage.FromString(msg_bytes))
            with node_slot(context.node_config):
                waited = time.perf_counter() - start
                reply = self.handlers[kind](msg, context, header["defaults"])
            send_frame(conn, {}, recorddict_to_proto(reply.content).SerializeToString())
            log.info("%s message served in %.2f s (%.2f s of it waiting for a compute slot)",
                     kind, time.perf_counter() - start, waited)
        except Exception as err:  # the ClientApp raises it; Flower sends it as the error
            log.error("%s message failed:\n%s", kind, traceback.format_exc())
            send_frame(conn, {"error": f"{type(err).__name__}: {err}"})
        finally:
            self.served[kind] = self.served.get(kind, 0) + 1
            self._write(None)


def _alive(pid: int, created: float | None) -> bool:
    import psutil

    try:
        return created is None or psutil.Process(pid).create_time() == created
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str] | None = None) -> None:
    import psutil

    parser = argparse.ArgumentParser(prog="sfedlora-node-worker", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--node-id", type=int, required=True)
    parser.add_argument("--run-id", type=int, required=True)
    parser.add_argument("--owner-pid", type=int, required=True, help="exit when it exits")
    parser.add_argument("--idle-s", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        created = psutil.Process(args.owner_pid).create_time()
    except psutil.NoSuchProcess:
        return
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is 0600 from the moment it exists
    try:
        server.bind(str(args.socket))
    finally:
        os.umask(umask)
    bound = args.socket.stat().st_ino
    server.listen(16)  # connections wait here while the model loads
    server.settimeout(POLL_S)
    worker = NodeWorker(args.node_id, args.run_id, args.status)
    log.info("worker %d serves node %d in run %d", os.getpid(), args.node_id, args.run_id)
    last = time.monotonic()
    try:
        while _alive(args.owner_pid, created) and time.monotonic() - last < args.idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    worker.serve(conn)
                except ConnectionError as err:  # its ClientApp process went away
                    log.warning("the ClientApp process left mid-message: %s", err)
            last = time.monotonic()
    finally:
        server.close()
        if args.socket.exists() and args.socket.stat().st_ino == bound:  # not a successor's
            args.socket.unlink()
            args.status.unlink(missing_ok=True)
        log.info("worker %d exits after %s messages", os.getpid(), worker.served)


if __name__ == "__main__":
    main()
