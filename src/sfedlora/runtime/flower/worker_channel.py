"""The channel between a deployed node's per-message ClientApp process and the node's
long-lived worker (:mod:`sfedlora.runtime.flower.node_worker`).

Flower's deployment engine starts a fresh ``flwr-clientapp`` process for every message;
building the model there would cost the imports and the model load on every message.
So that process only forwards: it sends the message and its context to the node's
worker over a Unix socket and returns the worker's reply. The worker keeps the model,
tokenizer and data loaded between messages.

What the channel promises, against other users on the node's machine (threat model:
the machine's other accounts, not its administrator):
- The socket lies in a folder only this account may enter (``0700``, checked on every
  use) and is itself ``0600``; the worker also checks each connection's peer uid.
- One worker serves one node in one run: the socket's name carries the node and run
  ids, and the worker refuses a message whose context names another.

The channel's frames are a JSON header plus Flower's own protobuf encoding of the
message and its context (what the SuperNode itself sends to its ClientApp processes);
the tensors inside are sfedlora's safetensors payloads, untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sfedlora.runtime.flower.run_keys import ANY_NODE_KEY

WORKER_KEY = "worker"  # node config: false serves every message in the ClientApp process
IDLE_KEY = "worker-idle-s"  # node config: a worker with no message for this long exits
DEFAULT_IDLE_S = 900.0
START_TIMEOUT_S = 120.0  # from spawning a worker to its socket accepting connections
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class WorkerError(RuntimeError):
    """The node's worker could not serve a message; the text says why and what to do."""


def state_dir(node_config) -> Path:
    """A node's state directory: ``state-dir`` in the node config, else
    ``$SFEDLORA_STATE_DIR``, else ``~/.cache/sfedlora/flower-state``."""
    return Path(str(node_config.get("state-dir") or os.environ.get("SFEDLORA_STATE_DIR")
                    or Path.home() / ".cache" / "sfedlora" / "flower-state"))


def uses_worker(node_config, run_config) -> bool:
    """Whether this node's messages go to its worker: on a deployed node unless its node
    config says ``worker=false``. The simulation engine's ClientApps already live as
    long as the run (Ray actors), so they serve messages themselves."""
    if run_config.get(ANY_NODE_KEY):
        return False
    return str(node_config.get(WORKER_KEY, True)).lower() not in ("false", "0", "no")


def private_folder(folder: Path) -> Path:
    """``folder``, created ``0700``; refused if another account owns it or may enter it
    (anyone who can reach the socket could ask the worker for a client's state)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerError(f"{folder} must belong to this account and be closed to others "
                          f"(mode {stat.S_IMODE(info.st_mode):o}); run `chmod 700 {folder}` "
                          "or point the node's state-dir elsewhere")
    return folder


@dataclass(frozen=True)
class Endpoint:
    """Where node ``node_id``'s worker for run ``run_id`` listens, and its files."""

    folder: Path
    node_id: int
    run_id: int

    @property
    def stem(self) -> str:
        return f"node-{self.node_id}-run-{self.run_id}"

    @property
    def socket(self) -> Path:
        return self.folder / f"{self.stem}.sock"

    @property
    def status(self) -> Path:
        """JSON: the worker's pid, how many messages it served, what it serves now."""
        return self.folder / f"{self.stem}.json"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.stem}.log"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.stem}.lock"


def endpoint(node_config, node_id: int, run_id: int) -> Endpoint:
    """The node's worker endpoint: under ``<state-dir>/workers``, or, where that path is
    too long for a socket, under a per-account folder in ``$XDG_RUNTIME_DIR`` (else the
    temporary directory) named by a hash of the state directory."""
    folder = state_dir(node_config) / "workers"
    if len(str(Endpoint(folder, node_id, run_id).socket)) > _SOCKET_PATH_MAX:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
        digest = hashlib.sha256(str(state_dir(node_config)).encode()).hexdigest()[:16]
        folder = base / f"sfedlora-{os.getuid()}" / digest
    return Endpoint(private_folder(folder), node_id, run_id)


# --- frames: a length-prefixed JSON header, then the blobs it sizes ----------------------

def send_frame(sock: socket.socket, header: dict, *blobs: bytes) -> None:
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    sock.sendall(struct.pack(">I", len(head)) + head + b"".join(blobs))


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other end closed the channel mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytes]]:
    (size,) = struct.unpack(">I", _exactly(sock, 4))
    header = json.loads(_exactly(sock, size))
    return header, [_exactly(sock, n) for n in header.pop("sizes")]


def write_status(path: Path, status: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


# --- the ClientApp's side -------------------------------------------------------------------

def _supernode_pid() -> int:
    """The SuperNode this process serves (the worker exits when it does): the nearest
    ancestor running ``flower-supernode``, else this process's parent."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().parents():
            if any("flower-supernode" in part for part in proc.cmdline()):
                return proc.pid
    return os.getppid()


def _connect(ep: Endpoint) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(ep.socket))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def _start(ep: Endpoint, idle_s: float) -> socket.socket:
    """Start the node's worker and connect to it."""
    ep.socket.unlink(missing_ok=True)  # a worker that died leaves its socket file
    command = [sys.executable, "-m", "sfedlora.runtime.flower.node_worker",
               "--socket", str(ep.socket), "--status", str(ep.status),
               "--node-id", str(ep.node_id), "--run-id", str(ep.run_id),
               "--owner-pid", str(_supernode_pid()), "--idle-s", str(idle_s)]
    with ep.log.open("ab") as log:
        # its own session: the end of this short-lived process must not take it along
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (sock := _connect(ep)) is not None:
            return sock
        if proc.poll() is not None:
            raise WorkerError(f"the node's worker exited ({proc.returncode}) before it "
                              f"listened; see {ep.log}")
        time.sleep(0.05)
    proc.kill()
    raise WorkerError(f"the node's worker did not listen within {START_TIMEOUT_S:.0f}s; "
                      f"see {ep.log}")


def connect(ep: Endpoint, idle_s: float = DEFAULT_IDLE_S) -> socket.socket:
    """A connection to the node's worker, started first if none is running. The lock
    keeps two ClientApp processes of one node from starting two workers."""
    with ep.lock.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _connect(ep) or _start(ep, idle_s)


def forward(kind: str, msg, context, defaults: dict):
    """Have the node's worker handle ``msg`` (a ``train``, ``evaluate`` or ``query``
    message); its reply. A worker that dies mid-message is not asked again: the message
    fails, the server's drop rules apply to this client's round, and the next message
    starts a new worker, which reads the client's state from the node's state directory."""
    from flwr.app import Message
    from flwr.common.serde import (
        context_to_proto,
        message_to_proto,
        recorddict_from_proto,
    )
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    ep = endpoint(context.node_config, context.node_id, context.run_id)
    idle_s = float(context.node_config.get(IDLE_KEY, DEFAULT_IDLE_S))
    with connect(ep, idle_s) as sock:
        try:
            send_frame(sock, {"kind": kind, "defaults": defaults},
                       message_to_proto(msg).SerializeToString(),
                       context_to_proto(context).SerializeToString())
            header, blobs = recv_frame(sock)
        except ConnectionError as err:  # EOF or reset mid-frame
            raise WorkerError(f"the node's worker died while serving a {kind} message; "
                              f"the node starts a new one with its next message "
                              f"(its log: {ep.log})") from err
    if "error" in header:
        raise WorkerError(header["error"])
    content = recorddict_from_proto(ProtoRecordDict.FromString(blobs[0]))
    return Message(content, reply_to=msg)
