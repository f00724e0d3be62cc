"""The ClientApp: one federated client per SuperNode.

The node's client id is ``partition-id`` from its node config (Flower's simulation
engine sets it; ``flower-supernode --node-config "partition-id=3"`` in a deployment).
The model is built once per worker process and reused by every message, whichever
node it serves; a client's private state (B, head, optimizer state, error-feedback
residuals, FDLoRA's personal copy) lives in the node's ``Context.state`` and, so that
it survives a node restart, in ``STATE_DIR/run-<run id>/client-<id>.safetensors``
(``state-dir`` in the node config, else ``$SFEDLORA_STATE_DIR``, else
``~/.cache/sfedlora/flower-state``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sfedlora import codecs, wire
from sfedlora.checkpoint import decode_client_state, encode_client_state
from sfedlora.config import ConfigError, ExperimentConfig
from sfedlora.evaluation import score_adapter
from sfedlora.experiment import Experiment, build_experiment
from sfedlora.flower import messages
from sfedlora.flower.config import experiment_config
from sfedlora.ranks import pad
from sfedlora.worker import ClientState

log = logging.getLogger(__name__)

_experiments: dict[str, Experiment] = {}  # one model per process, keyed by its config


def experiment(cfg: ExperimentConfig) -> Experiment:
    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if key not in _experiments:
        _experiments.clear()  # a new run in this process: drop the old model first
        _experiments[key] = build_experiment(cfg)
    return _experiments[key]


def client_id(context: Context, cfg: ExperimentConfig) -> int:
    if "partition-id" not in context.node_config:
        raise ConfigError("this SuperNode has no partition-id in its node config; start it "
                          "with --node-config \"partition-id=K\" (K = its client id)")
    cid = int(context.node_config["partition-id"])
    if not 0 <= cid < cfg.clients.num:
        raise ConfigError(f"partition-id={cid} but clients.num={cfg.clients.num}; node "
                          f"partition ids must be 0..{cfg.clients.num - 1}")
    return cid


def state_file(context: Context, cid: int) -> Path:
    root = (context.node_config.get("state-dir") or os.environ.get("SFEDLORA_STATE_DIR")
            or Path.home() / ".cache" / "sfedlora" / "flower-state")
    return Path(str(root)) / f"run-{context.run_id}" / f"client-{cid}.safetensors"


def load_state(context: Context, cid: int) -> ClientState:
    """From the node's context; after a restart, from disk; else a fresh client."""
    if messages.STATE in context.state:
        return decode_client_state(context.state[messages.STATE][messages.STATE])
    path = state_file(context, cid)
    if path.is_file():
        log.info("client %d: restoring its state from %s", cid, path)
        return decode_client_state(path.read_bytes())
    return ClientState()


def save_state(context: Context, cid: int, state: ClientState) -> None:
    data = encode_client_state(state)
    context.state[messages.STATE] = ConfigRecord({messages.STATE: data})
    path = state_file(context, cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a node killed mid-write keeps the previous state


def _client(context: Context, defaults: dict) -> tuple[ExperimentConfig, int]:
    """The run's experiment config and this node's client id (no model needed)."""
    cfg = experiment_config({**defaults, **context.run_config})
    return cfg, client_id(context, cfg)


def _setup(context: Context, defaults: dict) -> tuple[Experiment, int]:
    cfg, cid = _client(context, defaults)
    return experiment(cfg), cid


def _scored_adapter(exp: Experiment, cid: int, context: Context, download: bytes):
    method = exp.worker.method
    shared = codecs.decode(download)
    return exp.worker.scored_adapter(
        cid, load_state(context, cid), pad(shared, exp.worker.spec),
        exp.client_holdout[cid] if method.personal_adapter else None)


def train(msg: Message, context: Context, defaults: dict) -> Message:
    exp, cid = _setup(context, defaults)
    request = msg.content[messages.REQUEST]
    state = load_state(context, cid)
    fit = exp.worker.fit(cid, state, request[messages.DOWNLOAD], exp.client_train[cid],
                         int(request[messages.ROUND]))
    save_state(context, cid, state)
    return Message(RecordDict({
        messages.REPLY: ConfigRecord({messages.UPLOAD: fit.upload}),
        messages.METRICS: MetricRecord(messages.fit_metrics(fit)),
    }), reply_to=msg)


def evaluate(msg: Message, context: Context, defaults: dict) -> Message:
    exp, cid = _setup(context, defaults)
    tensors, fusion = _scored_adapter(exp, cid, context,
                                      msg.content[messages.REQUEST][messages.DOWNLOAD])
    scores = score_adapter(exp, tensors, cid,
                           global_part=not exp.worker.method.has_global_adapter)
    return Message(RecordDict({
        messages.METRICS: MetricRecord(messages.scores_metrics(scores, fusion)),
    }), reply_to=msg)


def query(msg: Message, context: Context, defaults: dict) -> Message:
    """``describe``: the node's client id; ``adapter``: the client's adapter (for the
    exported PEFT adapters at the end of a run)."""
    request = msg.content[messages.REQUEST]
    cfg, cid = _client(context, defaults)
    reply = {messages.CLIENT: cid}
    if request[messages.WHAT] == messages.ADAPTER:  # only this needs the model
        tensors, _ = _scored_adapter(experiment(cfg), cid, context,
                                     request[messages.DOWNLOAD])
        reply[messages.ADAPTER] = wire.encode(tensors)
    return Message(RecordDict({messages.REPLY: ConfigRecord(reply)}), reply_to=msg)


def make_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` is run config that the run's own run config overrides
    (how a programmatic simulation passes its experiment)."""
    defaults = dict(defaults or {})
    client = ClientApp()
    client.train()(lambda msg, context: train(msg, context, defaults))
    client.evaluate()(lambda msg, context: evaluate(msg, context, defaults))
    client.query()(lambda msg, context: query(msg, context, defaults))
    return client


app = make_app()  # what `flwr run` and flower-supernode load (pyproject [tool.flwr.app])
