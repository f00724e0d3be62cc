"""The node runtime's own parts (sfedlora.runtime.flower.node_runtime): what it agrees to
serve, its supervisor's restarts and its answer for a task whose process died. The
runtime serving real deployments, killed mid-round included, is in tests/test_deploy.py."""

from __future__ import annotations

import argparse
import io
import sys
import zipfile

import pytest

pytest.importorskip("flwr")

from sfedlora.runtime.flower import node_runtime
from sfedlora.runtime.flower.deploy import APP_PYPROJECT


def _fab(pyproject: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as fab:
        fab.writestr("pyproject.toml", pyproject)
    return out.getvalue()


def test_the_runtime_serves_the_app_deploy_local_submits_and_no_other():
    assert node_runtime.fab_client_app(_fab(APP_PYPROJECT)) == node_runtime.CLIENT_APP
    other = APP_PYPROJECT.replace(node_runtime.CLIENT_APP, "someone.else:app")
    assert node_runtime.fab_client_app(_fab(other)) == "someone.else:app"
    assert node_runtime.fab_client_app(_fab("[project]\nname = 'x'\n")) == ""


def test_message_types_go_to_their_handlers_and_others_are_refused():
    from types import SimpleNamespace

    def kind(message_type: str) -> str:
        message = SimpleNamespace(metadata=SimpleNamespace(message_type=message_type))
        return node_runtime.message_kind(message)

    assert [kind(t) for t in ("train", "evaluate", "query", "train.warmup")] == [
        "train", "evaluate", "query", "train"]
    with pytest.raises(node_runtime.RefusedTask, match="'predict'"):
        kind("predict")


def test_a_refused_heartbeat_does_not_stop_the_runtime_and_a_lost_one_is_retried():
    import httpx

    class Client:
        def __init__(self, answer):
            self.answer = answer

        def SendTaskHeartbeat(self, request):
            if isinstance(self.answer, Exception):
                raise self.answer
            return type("Res", (), {"success": self.answer})()

    assert node_runtime._heartbeat_fn(Client(True))() is True
    assert node_runtime._heartbeat_fn(Client(False))() is True  # Flower's would SIGINT us
    assert node_runtime._heartbeat_fn(Client(httpx.ConnectError("down")))() is False


def _args(tmp_path) -> argparse.Namespace:
    return argparse.Namespace(clientappio_api_address="127.0.0.1:1", root_certificates=None,
                              superexec_auth_secret_file=None, status=None)


def test_the_supervisor_answers_the_task_a_dead_process_held_and_restarts_it(
        tmp_path, monkeypatch):
    """The first serving process finishes a task and is then SIGKILLed: nothing to
    answer. The second is SIGKILLed mid-task: the supervisor answers that task (once,
    naming the signal). Each time it starts another; the later ones die at once, so
    the supervisor gives up after ``QUICK_DEATHS``."""
    starts = tmp_path / "starts"
    script = (
        "import json, os, signal, sys\n"
        f"path = {str(starts)!r}\n"
        "n = len(open(path).read()) if os.path.exists(path) else 0\n"
        "open(path, 'a').write('x')\n"
        "out = os.fdopen(int(sys.argv[1]), 'w', buffering=1)\n"
        "task = {'token': f't{n}', 'node_id': 7, 'run_id': 9, 'message': 'm'}\n"
        "if n == 0:\n"
        "    out.write(json.dumps(task) + '\\n' + json.dumps({'done': True}) + '\\n')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if n == 1:\n"
        "    out.write(json.dumps(task) + '\\n')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.exit(3)\n")
    monkeypatch.setattr(node_runtime, "_serving_command",
                        lambda args, fd: [sys.executable, "-c", script, str(fd)])
    answered = []
    monkeypatch.setattr(node_runtime, "answer_abandoned_task",
                        lambda address, certificates, task, reason:
                        answered.append((address, certificates, task, reason)))
    assert node_runtime.supervise(_args(tmp_path)) == 1
    assert len(starts.read_text()) == node_runtime.QUICK_DEATHS
    assert answered == [("127.0.0.1:1", None,
                         {"token": "t1", "node_id": 7, "run_id": 9, "message": "m"},
                         "the node's runtime process died (-9) while serving this message")]
