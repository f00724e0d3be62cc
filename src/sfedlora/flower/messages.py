"""What sfedlora's Flower messages hold. Tensors travel as sfedlora's own safetensors
payloads in a ConfigRecord (bytes), so the in-process codec, server checks and byte
counts apply unchanged; numbers travel in MetricRecords."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, MetricRecord

from sfedlora.records import ClientScores, FitResult

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
# secure aggregation: an exchange (what=secagg, its stage and payload), or the mask
# request that rides with a training download
SECAGG, STAGE, PAYLOAD, SECURE = "secagg", "stage", "payload", "secure"

_FIT_FIELDS = ("num_examples", "train_loss", "grad_norm_A", "grad_norm_B", "steps",
               "tokens")


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
