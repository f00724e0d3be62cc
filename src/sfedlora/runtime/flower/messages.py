"""What sfedlora's Flower messages hold. Tensors travel as sfedlora's own safetensors
payloads in a ConfigRecord (bytes), so the in-process codec, server checks and byte
counts apply unchanged; numbers travel in MetricRecords."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, MetricRecord

from sfedlora.core.records import ClientScores, FitResult, StageRequest

REQUEST, REPLY, METRICS, EXTRAS = "request", "reply", "metrics", "extras"
REPORT = "report"  # a fit's method report (FitResult.report)
DOWNLOAD, UPLOAD, ROUND = "download", "upload", "round"
RUN_KEY, CHECKPOINTED = "run-key", "checkpointed"
# which server process sends (fresh on every start and resume) and the round it resumed
# from: a node drops client states a timeline it no longer serves wrote after that round
TIMELINE, RESUMED_AT = "timeline", "resumed-at"
WHAT, DESCRIBE, LAYOUT, ADAPTER, EXPORT, CLIENT = ("what", "describe", "layout", "adapter",
                                                   "export", "client")
GLOBAL, GLOBAL_PART, SAMPLES, FILE = "global", "global-part", "samples", "file:"
# where a node saved a client's exported adapter (it never sends the files: they hold
# the client's private parts)
LOCATION = "location"
ON_NODE = "on_node.json"  # the run directory's record of that location
# a client stage's request (sfedlora.core.records.StageRequest): a query of its own
# (what=stage), or riding with a training download; the reply's payload is the stage's
STAGE_EXCHANGE, STAGE, STEP, PAYLOAD = "stage", "stage-name", "stage-step", "payload"

_FIT_FIELDS = ("num_examples", "train_loss", "grad_norm_A", "grad_norm_B", "steps",
               "tokens")


def stage_fields(request: StageRequest) -> dict:
    """A stage request's fields in a request ConfigRecord."""
    return {STAGE: request.stage, STEP: request.step, PAYLOAD: request.body}


def stage_request(request) -> StageRequest | None:
    """The stage request a request ConfigRecord carries, if any."""
    if STAGE not in request:
        return None
    return StageRequest(str(request[STAGE]), str(request[STEP]), bytes(request[PAYLOAD]))


def fit_metrics(fit: FitResult) -> dict[str, float | int]:
    """A fit's numbers; a missing gradient norm (``None``) is left out."""
    values = {name: getattr(fit, name) for name in _FIT_FIELDS}
    return {k: v for k, v in values.items() if v is not None}


def fit_result(upload: bytes, metrics: dict, report: dict | None = None) -> FitResult:
    return FitResult(upload=upload, report={k: list(v) for k, v in (report or {}).items()},
                     **{name: metrics.get(name) for name in _FIT_FIELDS})


def scores_records(scores: ClientScores) -> dict:
    """A client's scores as records: the task's numbers, the method's per-client values
    and the generated samples (as JSON text)."""
    return {METRICS: MetricRecord(dict(scores.values)),
            EXTRAS: MetricRecord({k: list(v) for k, v in scores.extras.items()}),
            REPLY: ConfigRecord({SAMPLES: json.dumps(scores.samples)})}


def scores(content) -> ClientScores:
    return ClientScores(dict(content[METRICS]),
                        {k: list(v) for k, v in dict(content[EXTRAS]).items()},
                        json.loads(content[REPLY][SAMPLES]))


def describe(message) -> dict:
    """What a received message holds, without its values: for each record its kind
    and keys, and for each payload that is a safetensors file its tensors' names and
    shapes. The server's inbox log (``flower.inbox_log``) is a line of this per
    message, so a reviewer can check which tensors and statistics reached the server
    without the log holding any client's numbers."""
    from sfedlora.core import wire

    head = {"type": message.metadata.message_type, "node": int(message.metadata.src_node_id)}
    if message.has_error():
        return head | {"error": message.error.reason}
    records: dict[str, dict] = {}
    for name, record in message.content.items():
        items: dict[str, object] = {}
        for key, value in record.items():
            if isinstance(value, bytes):
                try:
                    tensors = wire.decode(value)
                except wire.MessageError:  # not safetensors: JSON, text
                    tensors = None
                items[key] = {"bytes": len(value)} | (
                    {} if tensors is None
                    else {"tensors": {n: list(t.shape) for n, t in tensors.items()}})
            else:
                items[key] = type(value).__name__
        records[name] = {"kind": type(record).__name__, "items": items}
    return head | {"records": records}
