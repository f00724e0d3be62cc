"""A deployed node's runtime: one long-lived process that takes the node's messages from
its SuperNode and answers them with the model, tokenizer and data loaded once.

A Flower 1.42 SuperNode hands each message it receives for a ClientApp (a *task*) to
whatever asks for it on its ClientAppIo API. By default that is its SuperExec, which
starts a fresh ``flwr-clientapp`` process per task (a persistent ClientApp is an open
request upstream, flwr issue 3670). A SuperNode started with ``--isolation process``
leaves the asking to an outside process: this one. It speaks the API the SuperExec and
``flwr-clientapp`` speak, through Flower's own client and helpers (AcquireTask; the task
input and its message pulled; the reply and the task output pushed, with the task's
heartbeat meanwhile), and runs :mod:`~sfedlora.runtime.flower.handlers` in-process. With
ten nodes on one machine, the SuperExecs and the per-message processes took a quarter
of a round's CPU (docs/results/flower.md); here there are neither.

``sfedlora node-runtime --clientappio-api-address HOST:PORT`` runs it under a small
supervisor (:func:`supervise`): the serving process is restarted when it dies, and a
task it died holding is answered at once with an error reply, so the server counts the
client as dropped for that round (its drop rules) instead of waiting a minute for
Flower's task heartbeat to lapse. Client state lives in the node's state directory
(node config ``state-dir``), so a new serving process loses nothing.

What it serves: the tasks of its own SuperNode only (the address it is given), of any
run whose app is sfedlora's ClientApp; a run whose FAB names another ClientApp gets an
error reply, since this process would otherwise answer that app's messages with ours.
Threat model: as for Flower's SuperExec, whoever can reach the ClientAppIo API (by
default on the node's loopback) can take the node's tasks; keep it on loopback, or give
both ends ``--superexec-auth-secret-file``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from pathlib import Path

from sfedlora.runtime.flower.compute_slots import node_slot
from sfedlora.runtime.flower.worker_channel import write_status

log = logging.getLogger("sfedlora.node_runtime")

CLIENT_APP = "sfedlora.runtime.flower.client_app:app"  # the FAB component we serve
QUICKEST_POLL_S = 0.1  # ask again this soon after a task (the next one often follows)
SLOWEST_POLL_S = 2.0  # an idle runtime asks at most this rarely (Flower's SuperExec: 1 s)
QUICK_DEATHS = 5  # the serving process dying this often within RESTART_WINDOW_S ...
RESTART_WINDOW_S = 10.0  # ... makes the supervisor give up (a broken install, a bad port)


class RefusedTask(RuntimeError):
    """A task this runtime will not serve; the reason goes back as the error reply."""


def _client(address: str, certificates: bytes | None, component: str,
            token: str | None = None, auth_secret: bytes | None = None):
    """Flower's client of the SuperNode's runtime API: TLS against ``certificates``, or
    plain HTTP without them (a loopback address)."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=auth_secret, protected_methods=frozenset(
                {"/flwr.proto.Runtime/AcquireTask"})))
    plain = certificates is None
    return RuntimeHttpClient.from_server_address(
        address, plain, certificates, interceptors,
        retry_invoker=make_simple_http_retry_invoker())


def fab_client_app(fab_content: bytes) -> str:
    """The ClientApp a FAB names (``[tool.flwr.app.components] clientapp``)."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
        pyproject = tomllib.loads(fab.read("pyproject.toml").decode())
    return pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get(
        "components", {}).get("clientapp", "")


def message_kind(message) -> str:
    """``train``, ``evaluate`` or ``query``: the handler a message goes to (Flower's
    message types may carry an action after a dot, ``train.<action>``)."""
    from sfedlora.runtime.flower.handlers import HANDLERS

    kind = message.metadata.message_type.split(".")[0]
    if kind not in HANDLERS:
        raise RefusedTask(f"no handler for message type {message.metadata.message_type!r}; "
                          f"this node answers {sorted(HANDLERS)}")
    return kind


class NodeRuntime:
    """Serves its SuperNode's ClientApp tasks one at a time, in this process."""

    def __init__(self, address: str, *, certificates: bytes | None = None,
                 auth_secret: bytes | None = None,
                 status: Path | None = None, announce=None):
        from sfedlora.runtime.flower import handlers  # torch and the model stack, once

        self.handlers = handlers.HANDLERS
        self.address, self.certificates = address, certificates
        self.status, self.announce = status, announce or (lambda record: None)
        self.served: dict[str, int] = {}  # messages answered, by kind
        self.tasks = _client(address, certificates, "SuperExec",
                             auth_secret=auth_secret)
        self._write(None)

    def _write(self, serving: str | None) -> None:
        if self.status is not None:
            write_status(self.status, {"pid": os.getpid(), "served": self.served,
                                       "serving": serving})

    def acquire(self) -> str | None:
        """A task's token, or None when the SuperNode has none (or is not up yet)."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        try:
            res = self.tasks.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP.value]))
        except httpx.TransportError as err:  # the SuperNode is starting or restarting
            log.debug("no answer from the SuperNode at %s: %s", self.address, err)
            return None
        return res.token if res.HasField("task") and res.token else None

    def serve_forever(self) -> None:
        poll = QUICKEST_POLL_S
        while True:
            token = self.acquire()
            if token is None:
                time.sleep(poll)
                poll = min(poll * 1.5, SLOWEST_POLL_S)
                continue
            self.serve(token)
            poll = QUICKEST_POLL_S

    def serve(self, token: str) -> None:
        """Pull the task's message, answer it, push the reply and the task's end."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        client = _client(self.address, self.certificates, "flwr-clientapp", token=token)
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        message = context = None
        sub_status, details, kind = SubStatus.FAILED, "", "unknown"
        try:
            message, context, run, fab = pull_task_input(client)
            self.announce({"token": token, "node_id": context.node_id,
                           "run_id": context.run_id, "message": _encode_metadata(message)})
            if (named := fab_client_app(fab.content)) != CLIENT_APP:
                raise RefusedTask(f"run {run.run_id}'s app names the ClientApp {named!r}; "
                                  f"this node's sfedlora runtime serves only {CLIENT_APP}")
            kind = message_kind(message)
            self._write(kind)
            start = time.perf_counter()
            with node_slot(context.node_config):
                waited = time.perf_counter() - start
                reply = self.handlers[kind](message, context, {})
            sub_status = SubStatus.COMPLETED
            log.info("%s message served in %.2f s (%.2f s of it waiting for a compute "
                     "slot)", kind, time.perf_counter() - start, waited)
        except Exception as err:  # Flower's ClientApp process does the same: error reply
            log.exception("%s message failed", kind)
            details = f"{type(err).__name__}: {err}"
            reply = None if message is None else _error_reply(message, details)
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, sub_status, details)
        finally:
            heartbeat.stop()
            client.close()
            self.served[kind] = self.served.get(kind, 0) + 1
            self._write(None)
            self.announce({"done": True})


def _heartbeat_fn(client):
    """Flower's task heartbeat without its reaction to a refused beat (it interrupts the
    whole process, which here outlives the task): the task's end is pushed regardless."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:  # False: Flower's sender retries with backoff
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                log.warning("the SuperNode no longer knows this task")
            return True
        except httpx.HTTPError:
            return False
    return beat


def _error_reply(message, reason: str):
    """The reply Flower's ClientApp process sends when its app raises."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=message)


def _encode_metadata(message) -> str:
    """The message without its content (what an error reply to it needs), as text."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto

    proto = message_to_proto(remove_content_from_message(message))
    return base64.b64encode(proto.SerializeToString()).decode()


def answer_abandoned_task(address: str, certificates: bytes | None, task: dict,
                          reason: str) -> None:
    """Reply with an error to the message of a task whose serving process died, and end
    the task: what Flower's ClientApp process does when its app raises."""
    from types import SimpleNamespace

    from flwr.common.constant import SubStatus
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    message = message_from_proto(ProtoMessage.FromString(base64.b64decode(task["message"])))
    client = _client(address, certificates, "flwr-clientapp", token=task["token"])
    try:
        push_message(client, _error_reply(message, reason),
                     SimpleNamespace(node_id=task["node_id"], run_id=task["run_id"]))
        push_task_output(client, None, SubStatus.FAILED, reason)
    finally:
        client.close()


# --- the command: a supervisor around the serving process ------------------------------------

def _serving_command(args: argparse.Namespace, announce_fd: int) -> list[str]:
    out = [sys.executable, "-m", "sfedlora.runtime.flower.node_runtime", "--serve",
           "--announce-fd", str(announce_fd),
           "--clientappio-api-address", args.clientappio_api_address]
    if args.root_certificates:
        out += ["--root-certificates", str(args.root_certificates)]
    if args.superexec_auth_secret_file:
        out += ["--superexec-auth-secret-file", str(args.superexec_auth_secret_file)]
    if args.status:
        out += ["--status", str(args.status)]
    return out


def supervise(args: argparse.Namespace) -> int:
    """Run the serving process until told to stop; restart it when it dies, and answer
    the task it died holding. Gives up (exit 1) if it dies ``QUICK_DEATHS`` times within
    ``RESTART_WINDOW_S`` seconds: something a restart cannot mend."""
    stopping = threading.Event()
    children: list[subprocess.Popen] = []

    def stop(signum, frame):
        stopping.set()
        if children and children[-1].poll() is None:
            children[-1].terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _restart_until_stopped(args, stopping, lambda proc: children.append(proc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _restart_until_stopped(args: argparse.Namespace, stopping: threading.Event,
                           started) -> int:
    deaths: list[float] = []
    while not stopping.is_set():
        read_fd, write_fd = os.pipe()
        child = subprocess.Popen(_serving_command(args, write_fd), pass_fds=(write_fd,))
        os.close(write_fd)
        started(child)
        log.info("serving process %d started", child.pid)
        task = None
        with os.fdopen(read_fd) as announcements:
            for line in announcements:  # until the serving process ends
                record = json.loads(line)
                task = None if record.get("done") else record
        code = child.wait()
        if stopping.is_set():
            break
        reason = f"the node's runtime process died ({code}) while serving this message"
        log.error("serving process %d exited (%s)%s", child.pid, code,
                  "; answering its task with an error" if task else "")
        if task is not None:
            try:
                answer_abandoned_task(args.clientappio_api_address, _certificates(args),
                                      task, reason)
            except Exception:  # the task's heartbeat lapses instead: Flower answers it
                log.exception("could not answer the abandoned task")
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(deaths) >= QUICK_DEATHS:
            log.error("the serving process died %d times within %.0f s; giving up",
                      len(deaths), RESTART_WINDOW_S)
            return 1
    return 0


def _certificates(args: argparse.Namespace) -> bytes | None:
    return None if args.root_certificates is None else Path(args.root_certificates).read_bytes()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clientappio-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's ClientAppIo API: HOST:PORT of its --host and "
                             "--port (default: Flower's)")
    parser.add_argument("--root-certificates", type=Path,
                        help="PEM CA of the SuperNode's ClientAppIo TLS certificate "
                             "(default: a plain connection, for a loopback address)")
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="the secret the SuperNode was given with the same option")
    parser.add_argument("--status", type=Path,
                        help="keep a JSON file here: the serving pid, what it serves now, "
                             "how many messages of each kind it answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfedlora node-runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--announce-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)  # Flower's own logger prints Flower's lines
    log.setLevel(logging.INFO)
    if not args.serve:
        return supervise(args)
    announce = None
    if args.announce_fd is not None:
        pipe = os.fdopen(args.announce_fd, "w", buffering=1)

        def announce(record: dict) -> None:
            pipe.write(json.dumps(record) + "\n")
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    start_parent_process_monitor(os.getppid())  # a supervisor killed outright takes us along
    secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    runtime = NodeRuntime(args.clientappio_api_address, certificates=_certificates(args),
                          auth_secret=secret, status=args.status, announce=announce)
    log.info("node runtime %d serves the SuperNode at %s", os.getpid(),
             args.clientappio_api_address)
    runtime.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
