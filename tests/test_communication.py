"""FLASC, FLoCoRA and compressed messages in whole runs; the server optimizer step;
byte accounting; codec settings that must stop a run before it starts."""

from __future__ import annotations

import math

import pytest
import torch

from sfedlora.config import ConfigError, ServerConfig
from sfedlora.core import codecs
from sfedlora.core.adapters import TensorSpec
from sfedlora.core.checkpoint import load_checkpoint, save_checkpoint
from sfedlora.methods import Part, get_method
from sfedlora.runtime.server import Reply, Server, build_server
from sfedlora.runtime.simulation import Simulation
from tests.conftest import assert_learns

NAMES = ["x.lora_A.default.weight", "x.lora_B.default.weight"]
SPEC = {NAMES[0]: TensorSpec((2, 3), torch.float32), NAMES[1]: TensorSpec((3, 2), torch.float32)}


def _server(optimizer: str, **cfg) -> Server:
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s.shape, generator=gen) for n, s in SPEC.items()}
    return build_server(get_method("flasc"), state, SPEC, lambda parts: list(NAMES),
                        ServerConfig(**cfg), optimizer=optimizer)


def _reply(cid: int, tensors) -> Reply:
    return Reply(cid, 10 * (cid + 1), codecs.Codec().encode(tensors))


def test_flasc_server_step_is_adamw_on_the_mean_change():
    lr, wd, (b1, b2), eps = 0.05, 0.01, (0.9, 0.999), 1e-8
    server = _server("adamw", lr=lr, weight_decay=wd)
    p = {n: t.clone().double() for n, t in server.state.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    gen = torch.Generator().manual_seed(1)
    for t in (1, 2, 3):
        sent = {n: x.clone() for n, x in server.state.items()}  # the download is lossless
        clients = [{n: x + torch.randn(x.shape, generator=gen) for n, x in sent.items()}
                   for _ in range(3)]
        assert server.aggregate(t, [_reply(i, c) for i, c in enumerate(clients)]).applied
        for n in p:  # AdamW by hand; FLASC's mean is unweighted
            g = sum(sent[n].double() - c[n].double() for c in clients) / 3
            p[n] *= 1 - lr * wd
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            p[n] -= lr * (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + eps)
            assert torch.allclose(server.state[n].double(), p[n], atol=1e-6)


def test_server_sgd_with_lr_one_is_plain_averaging():
    server = _server("sgd", lr=1.0)
    clients = [{n: x + i for n, x in server.state.items()} for i in range(3)]
    server.aggregate(1, [_reply(i, c) for i, c in enumerate(clients)])
    for n in NAMES:
        assert torch.allclose(server.state[n], sum(c[n] for c in clients) / 3, atol=1e-6)


def test_flasc_clients_receive_the_masked_model_and_evaluation_uses_it(tiny_config):
    sim = Simulation(tiny_config("method=flasc", "comm.down.density=0.125",
                                 "comm.up.density=0.0625", "server.lr=0.05"))
    sim.run_round(1)
    shared = sim.pool.exp.worker.slots.names(get_method("flasc").roles.shared)
    total = sum(sim.server.state[n].numel() for n in shared)
    received = sim.global_adapter()
    kept = sum(int((received[n] != 0).sum()) for n in shared)
    assert kept == math.ceil(0.125 * total)
    dense = sum(int((sim.server.state[n] != 0).sum()) for n in shared)
    assert dense > kept  # the server keeps the dense state


def _uploads(monkeypatch) -> list[bytes]:
    from sfedlora.runtime import worker

    seen: list[bytes] = []
    real = worker.Worker.fit

    def spy(self, *args, **kwargs):
        fit = real(self, *args, **kwargs)
        seen.append(fit.upload)
        return fit

    monkeypatch.setattr(worker.Worker, "fit", spy)
    return seen


@pytest.mark.parametrize("overrides", [
    ["method=flasc"],
    ["method=flocora"],
    ["method=sfed", "comm.up.density=0.1", "comm.up.bits=4", "comm.down.bits=8",
     "comm.up.error_feedback=true"],
    ["method=fedit", "comm.up.dtype=bf16", "comm.down.dtype=fp16"],
])
def test_compressed_runs_count_the_bytes_that_cross_the_wire(overrides, tiny_config,
                                                             monkeypatch):
    uploads = _uploads(monkeypatch)
    dense = Simulation(tiny_config("method=fedit")).run_round(1).metrics
    uploads.clear()
    sim = Simulation(tiny_config(*overrides))
    rec = sim.run_round(1).metrics
    assert rec["bytes_up"] == sum(len(u) for u in uploads)
    assert rec["bytes_up_per_client"] == {str(c): len(u) for c, u in zip(rec["clients"],
                                                                         uploads, strict=True)}
    assert rec["bytes_up"] < dense["bytes_up"]  # the tiny model's messages are mostly header
    assert rec["bytes_total"] == rec["bytes_up_total"] + rec["bytes_down_total"]
    rec2 = sim.run_round(2).metrics
    for c in rec2["clients"]:
        assert rec2["bytes_up_total_per_client"][str(c)] == (
            rec["bytes_up_per_client"][str(c)] + rec2["bytes_up_per_client"][str(c)])


@pytest.mark.parametrize("overrides", [
    ["method=flasc", "server.lr=0.03"],  # Adam moves each entry ~lr per round
    # FLoCoRA's 8-bit uploads are a milder case of this 4-bit one (the quantiser's error
    # bound is tested exactly in test_codecs)
    ["method=sfed", "comm.up.density=0.25", "comm.up.bits=4", "comm.up.error_feedback=true"],
])
def test_compressed_methods_learn_the_tiny_task(overrides, encoder_config, tmp_path):
    cfg = encoder_config(*overrides)
    Simulation(cfg).run()
    assert_learns(cfg, tmp_path / "run")


def test_server_optimizer_and_residuals_survive_a_checkpoint(tiny_config, tmp_path):
    overrides = ["method=flasc", "server.lr=0.05", "comm.up.error_feedback=true"]
    straight = Simulation(tiny_config(*overrides))
    for r in (1, 2):
        straight.run_round(r)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, straight.checkpoint(2, 0.0, []))
    assert any(s.residual for s in straight.pool.states.values())
    resumed = Simulation(tiny_config(*overrides))
    resumed.restore(load_checkpoint(path))
    a, b = straight.run_round(3).metrics, resumed.run_round(3).metrics
    assert a == b
    for n, t in straight.server.state.items():
        assert torch.equal(t, resumed.server.state[n])


@pytest.mark.parametrize("override,match", [
    ("comm.up.density=1.5", "comm.up.density"),
    ("comm.down.density=0", "comm.down.density"),
    ("comm.up.bits=3", "comm.up.bits"),
    ("comm.down.error_feedback=true", "comm.down.error_feedback"),
    ("comm.up.error_feedback=true", "lossless"),
    ("comm.up.bits=8 comm.up.delta=false comm.up.error_feedback=true", "delta=true"),
    ("comm.up.bits=8 comm.up.dtype=bf16", "set bits or dtype"),
])
def test_bad_codec_settings_stop_before_the_run(override, match, tiny_config):
    with pytest.raises(ConfigError, match=match):
        tiny_config("method=fedit", *override.split())


def test_error_feedback_on_a_method_that_sends_nothing_up(tiny_config, monkeypatch):
    from sfedlora.methods import RoundPlan
    from sfedlora.methods.fedit import FedIT

    monkeypatch.setattr(FedIT, "plan", lambda self, r: RoundPlan(frozenset({Part.A}),
                                                                 frozenset()))
    with pytest.raises(ConfigError, match="sends nothing up"):
        tiny_config("method=fedit", "comm.up.bits=8", "comm.up.error_feedback=true")


def test_presets_resolve_and_explicit_settings_win(tiny_config):
    flasc = tiny_config("method=flasc")
    assert (flasc.codec("down").density, flasc.codec("up").density) == (0.25, 0.25)
    assert flasc.codec("up").delta and flasc.server_optimizer == "adamw"
    flocora = tiny_config("method=flocora", "comm.up.bits=4")
    assert flocora.codec("up").bits == 4 and not flocora.codec("up").delta
    plain = tiny_config("method=fedit")
    assert plain.codec("up").plain and plain.codec("down").plain
    assert plain.server_optimizer == "none"


def test_plot_draws_accuracy_against_bytes(tiny_config, tmp_path, capsys):
    from sfedlora.cli import main

    runs = []
    for method in ("fedit", "flocora"):
        cfg = tiny_config(f"method={method}", "rounds=2", f"output_dir={tmp_path / method}")
        Simulation(cfg).run()
        runs.append(str(tmp_path / method))
    out = tmp_path / "fig.png"
    assert main(["plot", *runs, "--x", "bytes", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", *runs, "--y", "no_such_metric", "--out", str(out)]) == 2
    assert "no round has both" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
