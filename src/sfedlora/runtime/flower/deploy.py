"""Flower's deployment engine on one machine: a SuperLink and N SuperNodes as separate
processes, with TLS and SuperNode authentication, exactly as they would run on N+1
machines (the README's "On Flower" section says what changes there).

:class:`LocalDeployment` owns every process it starts and stops them all on exit,
Ctrl-C or failure: each process gets a marker in its environment, which Flower's own
subprocesses (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``) inherit, so the final
sweep also finds a descendant that detached into its own session. :func:`deploy_local`
is the ``sfedlora deploy-local`` command: certificates, keys, registration, the run,
and the processes' logs copied into the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from sfedlora.config import ConfigError, load_config
from sfedlora.runtime.flower.compute_slots import SLOTS_KEY
from sfedlora.runtime.flower.config import (
    OVERWRITE_KEY,
    as_run_config,
    check_resumable,
    resume_run_config,
)
from sfedlora.runtime.flower.credentials import NodeKey, make_node_key, make_tls
from sfedlora.runtime.flower.simulation import QUIET_ENV
from sfedlora.runtime.flower.worker_channel import WORKER_KEY, endpoint
from sfedlora.runtime.flower.worker_channel import state_dir as node_state_dir
from sfedlora.runtime.results import refuse_occupied, resolve_output_dir

log = logging.getLogger(__name__)

SUPEREXEC_POLL_S = 2.0  # seconds between a node's SuperExec's asks for work (Flower: 1)
MARKER = "SFEDLORA_DEPLOYMENT"  # environment variable naming the deployment a process is in
CONNECTION = "sfedlora-deployment"  # the SuperLink connection name in FLWR_HOME/config.toml
STOP_GRACE_S = 10.0
SERVING = {  # what answers a deployed node's messages
    "runtime": "the node's sfedlora runtime takes its tasks from the SuperNode itself "
               "(--isolation process): one process, the model loaded once",
    "worker": "Flower's SuperExec starts a ClientApp process per message, which hands it "
              "to the node's long-lived worker",
    "per-message": "Flower's SuperExec starts a ClientApp process per message, which "
                   "builds the model and answers it (Flower's default)",
}

# The Flower app a deployment submits: only its metadata travels (the FAB); every node
# runs the sfedlora installed in its own environment.
APP_PYPROJECT = """\
[project]
name = "sfedlora-app"
version = "1.0.0"
description = "sfedlora methods on Flower"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "sfedlora"

[tool.flwr.app.components]
serverapp = "sfedlora.runtime.flower.server_app:app"
clientapp = "sfedlora.runtime.flower.client_app:app"

[tool.flwr.app.config]
config-file = ""
overrides = ""
resume = ""
overwrite = false
"""


class DeploymentError(RuntimeError):
    """A deployment step failed; the message names the log to read."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _end(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def _check_serving(serving: str) -> None:
    if serving not in SERVING:
        raise ConfigError(f"serving (--serving) must be one of {sorted(SERVING)}; "
                          f"got {serving!r}")


def marked_processes(deployment_id: str | None = None) -> list[psutil.Process]:
    """Every live process whose environment carries this deployment's marker (any
    deployment's, when ``deployment_id`` is None)."""
    found = []
    for proc in psutil.process_iter():
        try:
            marker = proc.environ().get(MARKER) if proc.pid != os.getpid() else None
            if marker is not None and deployment_id in (None, marker):
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _ended(proc: psutil.Process) -> bool:
    """Whether ``proc`` exited: gone, or a zombie its parent has not yet reaped (Flower's
    SuperExec reaps its ServerApp processes only now and then)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _is_node_worker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "sfedlora.runtime.flower.node_worker" in proc.cmdline()
    return False


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and everything it started: a machine that died."""
        for proc in _tree(self.popen.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.popen.wait()


@dataclass
class LocalDeployment:
    """A SuperLink with TLS and node authentication, plus SuperNodes, on ``host``.

    ``workdir`` holds the certificates, keys, Flower's home (its CLI connection) and
    the databases; ``workdir/logs`` one log per process.
    """

    workdir: Path
    host: str = "127.0.0.1"
    state_dir: Path | None = None  # the nodes' client state and exports; default workdir/state
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: list[Process] = field(default_factory=list)
    nodes: dict[int, Process] = field(default_factory=dict)
    runtimes: dict[int, Process] = field(default_factory=dict)  # by client, if any

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.workdir / "runtimes").mkdir(exist_ok=True)
        self.state_dir = Path(self.state_dir or self.workdir / "state").resolve()
        self.node_ids: dict[int, int] = {}  # client id -> the SuperLink's node id
        self.tls = make_tls(self.workdir / "tls", [self.host, "localhost"])
        self.port = free_port(self.host)
        bin_dir = str(Path(sys.executable).parent)  # flower-* and flwr-* live beside python
        self.env = {**os.environ, **QUIET_ENV,
                    "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                    "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    # offline: never `uv sync` an app's dependencies at run time
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    # a node's SuperExec asks its SuperNode for work every second by
                    # default, about 8 ms of CPU on each side per ask: with every node on
                    # one machine, asking half as often leaves the cores to the training
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S),
                    MARKER: self.id}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- processes ------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict | None = None) -> Process:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(command, env={**self.env, **(env or {})}, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)  # Ctrl-C reaches us, not them
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def _flwr(self, *args: str, timeout: float = 120) -> dict:
        """One ``flwr`` CLI call against this SuperLink, its JSON answer."""
        result = subprocess.run(["flwr", *args, "--format", "json"], env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        try:
            answer = json.loads(result.stdout[result.stdout.index("{"):])
        except ValueError:
            answer = {}
        if result.returncode != 0 or answer.get("success") is False:
            raise DeploymentError(f"flwr {' '.join(args)} failed: "
                                  f"{answer or result.stdout or result.stderr}")
        return answer

    def start_superlink(self, timeout: float = 60) -> Process:
        proc = self._spawn("superlink", [
            "flower-superlink", "--enable-supernode-auth",
            "--ssl-ca-certfile", str(self.tls.ca_cert),
            "--ssl-certfile", str(self.tls.server_cert),
            "--ssl-keyfile", str(self.tls.server_key),
            "--disable-runtime-dependency-installation", "--isolation", "subprocess",
            "--host", self.host, "--port", str(self.port),
            "--database", str(self.workdir / "superlink.db")])
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.tls.ca_cert}"\n')
        tls = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(f"the SuperLink exited ({proc.popen.returncode}); "
                                      f"see {proc.log}")
            try:
                if httpx.get(f"https://{self.address}/health", verify=tls, timeout=2).is_success:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise DeploymentError(f"the SuperLink did not answer within {timeout}s; see {proc.log}")

    def register(self, key: NodeKey, cid: int | None = None) -> int:
        """Register a SuperNode's public key with the SuperLink (the Control API); its
        node id (kept in ``node_ids`` under ``cid``, the client it will serve)."""
        node_id = int(self._flwr("supernode", "register", str(key.public), CONNECTION)["node-id"])
        if cid is not None:
            self.node_ids[cid] = node_id
        return node_id

    def copy_logs(self, folder: Path, run_id: int | None) -> None:
        """Every process's log into ``folder``, the nodes' workers' logs (``run_id``'s)
        as ``supernode-<client>.worker.log``."""
        shutil.copytree(self.logs, folder, dirs_exist_ok=True)
        if run_id is None:  # no run was submitted: no worker started
            return
        for cid, node_id in self.node_ids.items():
            if cid in self.runtimes:  # its runtime's log is among the processes' logs
                continue
            worker_log = endpoint({"state-dir": str(self.state_dir)}, node_id, run_id).log
            if worker_log.is_file():
                shutil.copyfile(worker_log, folder / f"supernode-{cid}.worker.log")

    def supernodes(self) -> list[dict]:
        """The SuperLink's view of its registered nodes (``node-id``, ``status``, ...)."""
        return self._flwr("supernode", "list", CONNECTION)["nodes"]

    def start_node(self, cid: int, key: NodeKey, *, max_retries: int | None = None,
                   threads: int | None = None, serving: str = "runtime",
                   compute_slots: int | None = None) -> Process:
        """A SuperNode serving client ``cid`` (its ``partition-id``); its client state
        goes to ``state_dir``. ``threads`` caps torch's threads in the node's
        processes: nodes sharing one machine should share its cores, not each take all
        of them. ``compute_slots``: at most this many of the nodes sharing
        ``state_dir`` handle a message at once (:mod:`~.compute_slots`; None: no
        limit). ``serving`` (:data:`SERVING`) says which process answers its messages."""
        _check_serving(serving)
        node_config = (f'partition-id={cid} state-dir="{self.state_dir}" '
                       f'{WORKER_KEY}={str(serving == "worker").lower()}')
        if compute_slots is not None:
            node_config += f" {SLOTS_KEY}={compute_slots}"
        command = ["flower-supernode", "--superlink", self.address,
                   "--root-certificates", str(self.tls.ca_cert),
                   "--auth-supernode-private-key", str(key.private),
                   "--node-config", node_config,
                   # the node's ClientAppIo API, where its messages are taken from
                   "--host", self.host, "--port", str(appio_port := free_port(self.host)),
                   # "process": no SuperExec, our runtime takes the node's tasks itself
                   "--isolation", "process" if serving == "runtime" else "subprocess"]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        env = None if threads is None else {"OMP_NUM_THREADS": str(threads),
                                             "MKL_NUM_THREADS": str(threads)}
        proc = self._spawn(f"supernode-{cid}", command, env)
        self.nodes[cid] = proc
        if serving == "runtime":
            self.runtimes[cid] = self._spawn(f"supernode-{cid}.runtime", [
                sys.executable, "-m", "sfedlora.runtime.flower.node_runtime",
                "--clientappio-api-address", f"{self.host}:{appio_port}",
                "--status", str(self.runtime_status(cid))], env)
        return proc

    def runtime_status(self, cid: int) -> Path:
        """Client ``cid``'s node runtime's status file (``serving="runtime"``)."""
        return self.workdir / "runtimes" / f"node-{cid}.json"

    # --- runs -----------------------------------------------------------------------

    def submit(self, run_config: dict[str, str | bool]) -> int:
        """Start the sfedlora app with this run config; its run id."""
        app = write_app(self.workdir / "app")
        config = self.workdir / "run-config.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        answer = self._flwr("run", str(app), CONNECTION, "--run-config", str(config))
        return int(answer["run-id"])

    def status(self, run_id: int) -> str:
        runs = self._flwr("list", "--run-id", str(run_id), CONNECTION).get("runs", [])
        return runs[0]["status"] if runs else "unknown"

    def server_log(self, run_id: int) -> str:
        """The ServerApp's log of run ``run_id``, as the SuperLink kept it."""
        result = subprocess.run(["flwr", "log", str(run_id), CONNECTION, "--show"],
                                env=self.env, capture_output=True, text=True, timeout=30)
        return result.stdout + result.stderr

    def wait(self, run_id: int, timeout: float | None = None, poll: float = 2.0,
             longest_poll: float = 60.0) -> str:
        """Block until the run finishes; its final status (e.g. ``finished:completed``).

        Each status query is a ``flwr list`` process (about a second of CPU: Flower's
        imports), which on a machine shared with the nodes slows their training. So
        until the run's ServerApp process is up the SuperLink is asked at intervals
        growing from ``poll`` to ``longest_poll`` seconds; once it is up (found at an
        ask, then watched every half second) the SuperLink is asked when it ends, and
        every ``longest_poll`` seconds in case the run ends while it stays up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        superlink = self.processes[0]
        gap, asked, server_app = poll, None, None
        while True:
            now = time.monotonic()
            ended = server_app is not None and _ended(server_app)
            if ended or asked is None or now - asked >= gap:
                status = self.status(run_id)
                if status.split(":")[0] == "finished":
                    return status
                if ended:  # ended but not yet finished in the SuperLink's books
                    gap, server_app = poll, None
                elif asked is not None:
                    gap = min(gap * 1.5, longest_poll)
                asked = now
                # look for the ServerApp only when asking: a scan reads every process
                server_app = server_app or self._server_app()
                if server_app is not None:
                    gap = longest_poll
            if not superlink.alive():
                raise DeploymentError(f"the SuperLink exited mid-run; see {superlink.log}")
            if deadline is not None and now > deadline:
                raise DeploymentError(f"run {run_id} still {status} after {timeout}s")
            time.sleep(0.5)

    def _server_app(self) -> psutil.Process | None:
        """This deployment's running ServerApp process, if one is up."""
        for proc in marked_processes(self.id):
            with contextlib.suppress(psutil.Error):
                if any("flwr-serverapp" in part for part in proc.cmdline()):
                    return proc
        return None

    # --- shutdown -------------------------------------------------------------------

    def stop(self) -> None:
        """SuperNodes first (all at once) with their workers, then the SuperLink, then
        anything left with our marker."""
        nodes = [*self.nodes.values(), *self.runtimes.values()]
        others = [proc for proc in self.processes if proc not in nodes]
        for group in (nodes, others):
            _end([p for proc in group for p in _tree(proc.popen.pid)], STOP_GRACE_S)
            for proc in group:
                proc.popen.wait()
            if group is not others:  # the nodes' workers left their trees when started
                _end([p for p in marked_processes(self.id) if _is_node_worker(p)],
                     STOP_GRACE_S)
        leftovers = marked_processes(self.id)
        if leftovers:
            log.warning("stopping %d leftover processes: %s", len(leftovers),
                        [p.pid for p in leftovers])
            _end(leftovers, STOP_GRACE_S)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def deploy_local(config_file: str | None, overrides: list[str], nodes: int, *,
                 timeout: float | None = None, resume: str | None = None,
                 overwrite: bool = False, state_dir: str | Path | None = None,
                 serving: str = "runtime", compute_slots: int | None = -1) -> Path:
    """Run one experiment on a loopback deployment with ``nodes`` SuperNodes (one per
    client); the run directory, with the processes' logs under ``deploy/``. ``resume``
    (a run directory) continues that run from its checkpoint.

    The nodes keep their clients' state and exported adapters under ``state_dir``
    (default: ``$SFEDLORA_STATE_DIR``, else ``~/.cache/sfedlora/flower-state``), which
    outlives the deployment so that a resumed run finds them. ``serving`` chooses what
    answers the nodes' messages (:data:`SERVING`).

    The nodes share this machine's cores as the in-process runtime does: at most
    ``compute_slots`` of them compute at once (default -1: one per core, at most one per
    node), each with an equal share of the cores as torch threads; None lets every node
    compute at once with ``cores // nodes`` threads each."""
    _check_serving(serving)  # before anything starts
    cores = os.cpu_count() or 1
    if compute_slots == -1:
        compute_slots = min(nodes, cores)
    if compute_slots is not None and compute_slots < 1:
        raise ConfigError(f"compute_slots (--compute-slots) must be at least 1, or None "
                          f"(0 on the command line) for no limit; "
                          f"got {compute_slots}")
    threads = max(1, cores // min(nodes, compute_slots or nodes))
    overrides = [*overrides, f"clients.num={nodes}"]
    if resume:
        run_dir = Path(resume).resolve()
        check_resumable(run_dir, overrides)  # refuse before starting anything
        run_config = resume_run_config(str(run_dir), overrides)
    else:
        cfg = load_config(config_file, overrides)  # refuse a bad config before starting
        run_dir = resolve_output_dir(cfg).resolve()
        refuse_occupied(run_dir, overwrite)
        overrides.append(f"output_dir={run_dir}")
        run_config = as_run_config(str(Path(config_file).resolve()) if config_file else None,
                                   overrides)
        run_config[OVERWRITE_KEY] = overwrite
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="sfedlora-deploy-") as work:
            deployment = LocalDeployment(Path(work), state_dir=state_dir or node_state_dir({}))
            run_id = None
            try:
                deployment.start_superlink()
                for cid in range(nodes):
                    key = make_node_key(deployment.workdir / "keys", f"node-{cid}")
                    deployment.register(key, cid)
                    deployment.start_node(cid, key, threads=threads, serving=serving,
                                          compute_slots=compute_slots)
                run_id = deployment.submit(run_config)
                log.info("run %d on %s with %d SuperNodes", run_id, deployment.address, nodes)
                status = deployment.wait(run_id, timeout)
            finally:
                if run_id is not None:  # also when the wait timed out: why it hung
                    with contextlib.suppress(OSError, subprocess.SubprocessError):
                        (deployment.logs / "serverapp.log").write_text(
                            deployment.server_log(run_id))
                deployment.stop()
                deployment.copy_logs(run_dir / "deploy", run_id)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status != "finished:completed":
        raise DeploymentError(f"run {run_id} ended {status}; logs in {run_dir / 'deploy'}")
    return run_dir


__all__ = ["DeploymentError", "LocalDeployment", "deploy_local", "marked_processes"]
