"""What a node does with each message: train a client, score it, answer a query.

:mod:`~sfedlora.runtime.flower.client_app` calls these, in its own process (the
simulation engine's long-lived workers) or, on a deployed node, through the node's
long-lived worker (:mod:`~sfedlora.runtime.flower.node_worker`), which keeps the model
loaded between messages.

Every message names its client. A deployed node serves only its ``partition-id``
(``flower-supernode --node-config "partition-id=3"``); in the simulation engine, where
every virtual node shares one machine's data and state directory, any node serves the
client the message names.
The model is built once per process and reused by every message, whichever
node it serves. A client's private state (B, head, optimizer state, error-feedback
residuals, method-owned tensors) lives in the node's state directory
(:mod:`sfedlora.runtime.flower.node_state`), never in memory between messages, so a node
restarts, and a run resumes, from what is on disk.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from sfedlora.privacy.stages import client_stage
from sfedlora.runtime.flower import messages
from sfedlora.runtime.flower.config import ANY_NODE_KEY, experiment_config
from sfedlora.runtime.flower.node_state import NodeState, export_folder, state_root
from sfedlora.settings import ConfigError, ExperimentConfig

# The model stack (transformers, PEFT, datasets) is imported only by the handlers that
# need a model: a node without its worker starts one process per message, and the
# messages that need none (describe, client-stage exchanges) then skip those imports.
_experiments: dict = {}  # one model per process, keyed by its config


def experiment(cfg: ExperimentConfig):
    from sfedlora.runtime.experiment import build_experiment
    from sfedlora.runtime.report import quiet_libraries

    quiet_libraries()  # no weight-loading report per node in the run's stream

    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if key not in _experiments:
        _experiments.clear()  # a new run in this process: drop the old model first
        _experiments[key] = build_experiment(cfg)
    return _experiments[key]


def message_client(context: Context, run_config: dict, request) -> int:
    """The client this message is for. In the simulation engine (``any-node`` in the run
    config) every virtual node serves whichever client the message names; a deployed
    node serves only its own, its ``partition-id``, and refuses a message for another
    (a routing bug would otherwise train one client on another's data)."""
    named = int(request[messages.CLIENT]) if messages.CLIENT in request else None
    if run_config.get(ANY_NODE_KEY) and named is not None:
        return named
    if "partition-id" not in context.node_config:
        raise ConfigError("this SuperNode has no partition-id in its node config; start it "
                          "with --node-config \"partition-id=K\" (K = its client id)")
    cid = int(context.node_config["partition-id"])
    if named is not None and named != cid:
        raise ConfigError(f"a message for client {named} reached the node of "
                          f"partition-id={cid}")
    return cid


def client_id(context: Context, run_config: dict, cfg: ExperimentConfig, request) -> int:
    """:func:`message_client`, checked against ``clients.num``."""
    cid = message_client(context, run_config, request)
    if not 0 <= cid < cfg.clients.num:
        raise ConfigError(f"client id {cid} but clients.num={cfg.clients.num}; node "
                          f"partition ids must be 0..{cfg.clients.num - 1}")
    return cid


def _client(context: Context, defaults: dict, request) -> tuple[ExperimentConfig, int]:
    """The run's experiment config and the message's client id (no model needed)."""
    run_config = {**defaults, **context.run_config}
    cfg = experiment_config(run_config)
    return cfg, client_id(context, run_config, cfg, request)


def _setup(msg: Message, context: Context, defaults: dict):
    """This node's experiment (its process's model), client id, state directory and
    request, with the machine's shared store in place."""
    request = msg.content[messages.REQUEST]
    cfg, cid = _client(context, defaults, request)
    exp = experiment(cfg)
    node = NodeState(state_root(context.node_config, str(request[messages.RUN_KEY])), cid)
    node.enter_timeline(str(request[messages.TIMELINE]), int(request[messages.RESUMED_AT]))
    exp.worker.shared_store = node.shared
    return exp, cid, node, request


def _request(exp, cid: int, node: NodeState, request):
    """``(client id or None for the global adapter, state, shared, extras)`` of an
    evaluation or adapter request, from its download."""
    from sfedlora.core import codecs
    from sfedlora.core.ranks import pad
    from sfedlora.core.records import ClientState

    worker = exp.worker
    shared, extras = worker.split_download(codecs.decode(request[messages.DOWNLOAD]))
    if request[messages.GLOBAL]:
        return None, ClientState(), pad(shared, worker.spec), extras
    return cid, node.load(at_most=int(request[messages.ROUND])), pad(shared, worker.spec), extras


def train(msg: Message, context: Context, defaults: dict) -> Message:
    exp, cid, node, request = _setup(msg, context, defaults)
    round_idx = int(request[messages.ROUND])
    state = node.load(at_most=round_idx - 1)
    fit = exp.worker.fit(cid, state, request[messages.DOWNLOAD], exp.round_train(cid, round_idx),
                         round_idx)
    node.save(round_idx, state, int(request[messages.CHECKPOINTED]))
    then = messages.stage_request(request)
    if then is not None:  # a client stage turns the fit into what is sent
        session, fit = client_stage(then.stage).after_fit(
            exp.worker, cid, round_idx, request[messages.DOWNLOAD], fit,
            node.load_session(then.stage, round_idx), then)
        node.save_session(then.stage, round_idx, session)
    return Message(RecordDict({
        messages.REPLY: ConfigRecord({messages.UPLOAD: fit.upload}),
        # after a client stage, the stage's upload is all that leaves
        messages.METRICS: MetricRecord({} if then else messages.fit_metrics(fit)),
        messages.REPORT: MetricRecord({k: list(v) for k, v in fit.report.items()}),
    }), reply_to=msg)


def evaluate(msg: Message, context: Context, defaults: dict) -> Message:
    exp, cid, node, request = _setup(msg, context, defaults)
    scores = exp.score(*_request(exp, cid, node, request), bool(request[messages.GLOBAL_PART]))
    return Message(RecordDict(messages.scores_records(scores)), reply_to=msg)


def query(msg: Message, context: Context, defaults: dict) -> Message:
    """``describe``: the node's client id; ``layout``: the adapter's layout, labels and
    base model (what the ServerApp needs instead of a model); ``adapter``: an adapter's
    tensors; ``export``: an adapter saved by PEFT, file by file; ``stage``: one request
    to a client stage, the round's session kept in the node's state directory."""
    request = msg.content[messages.REQUEST]
    what = request[messages.WHAT]
    if what == messages.STAGE_EXCHANGE:  # needs no config or model: about a second
        return _stage_exchange(msg, context, request, defaults)
    cfg, cid = _client(context, defaults, request)
    reply: dict = {messages.CLIENT: cid}
    if what == messages.LAYOUT:
        exp = experiment(cfg)
        reply[messages.LAYOUT] = exp.worker.slots.layout.encode(
            {"label_names": exp.data.label_names, "base_path": exp.base_path,
             "base_params": exp.worker.base_params})
    elif what in (messages.ADAPTER, messages.EXPORT):
        from sfedlora.core import wire
        from sfedlora.runtime.pool import saved_files

        exp, cid, node, request = _setup(msg, context, defaults)
        own = not request[messages.GLOBAL]  # a client's own adapter: private parts
        if own and what == messages.ADAPTER and exp.method.roles.per_client_adapters:
            raise PermissionError(f"client {cid}'s adapter holds its private parts, which "
                                  "never leave its node; score it there (evaluate) or "
                                  "export it into the node's storage")
        tensors, _ = exp.adapter(*_request(exp, cid, node, request))
        if what == messages.ADAPTER:
            reply[messages.ADAPTER] = wire.encode(tensors)
        elif own:  # saved where the client's data is; the server learns only where
            folder = export_folder(context.node_config, str(request[messages.RUN_KEY]), cid)
            files = saved_files(exp.worker.model, tensors, exp.worker.slots)
            for rel, data in files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)
            reply[messages.LOCATION] = str(folder)
        else:
            files = saved_files(exp.worker.model, tensors, exp.worker.slots)
            reply |= {messages.FILE + name: data for name, data in files.items()}
    return Message(RecordDict({messages.REPLY: ConfigRecord(reply)}), reply_to=msg)


def _stage_exchange(msg: Message, context: Context, request, defaults: dict) -> Message:
    """One client-stage request for the client the message names. Builds no model and
    reads no config, so it is answered in about a second."""
    cid = message_client(context, {**defaults, **context.run_config}, request)
    node = NodeState(state_root(context.node_config, str(request[messages.RUN_KEY])), cid)
    round_idx = int(request[messages.ROUND])
    stage = messages.stage_request(request)
    session, payload = client_stage(stage.stage).exchange(
        node.load_session(stage.stage, round_idx), cid, stage)
    node.save_session(stage.stage, round_idx, session)
    return Message(RecordDict({messages.REPLY: ConfigRecord({messages.CLIENT: cid,
                                                             messages.PAYLOAD: payload})}),
                   reply_to=msg)


HANDLERS = {"train": train, "evaluate": evaluate, "query": query}
