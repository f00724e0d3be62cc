"""What sfedlora's Flower messages hold. Tensors travel as sfedlora's own safetensors
payloads in a ConfigRecord (bytes), so the in-process codec, server checks and byte
counts apply unchanged; numbers travel in MetricRecords."""

from __future__ import annotations

from sfedlora.evaluation import Scores
from sfedlora.worker import EvalResult, FitResult

REQUEST, REPLY, METRICS, STATE = "request", "reply", "metrics", "sfedlora-client-state"
DOWNLOAD, UPLOAD, ROUND = "download", "upload", "round"
WHAT, DESCRIBE, ADAPTER, CLIENT = "what", "describe", "adapter", "client"

_FIT_FIELDS = ("num_examples", "train_loss", "grad_norm_A", "grad_norm_B", "steps")


def fit_metrics(fit: FitResult) -> dict[str, float | int]:
    """A fit's numbers; a missing gradient norm (``None``) is left out."""
    values = {name: getattr(fit, name) for name in _FIT_FIELDS}
    return {k: v for k, v in values.items() if v is not None}


def fit_result(upload: bytes, metrics: dict) -> FitResult:
    return FitResult(upload=upload, **{name: metrics.get(name) for name in _FIT_FIELDS})


def scores_metrics(scores: Scores, fusion: list[float] | None
                   ) -> dict[str, float | int | list[int]]:
    out: dict[str, float | int | list[int]] = {}
    for prefix, result in (("own", scores.own), ("global", scores.on_global),
                           ("val", scores.val)):
        if result is not None:
            out |= {f"{prefix}_correct": result.correct, f"{prefix}_count": result.count,
                    f"{prefix}_loss_sum": result.loss_sum,
                    f"{prefix}_class_correct": list(result.class_correct),
                    f"{prefix}_class_count": list(result.class_count)}
    if scores.norm is not None:
        out["norm"] = scores.norm
    if fusion is not None:
        out["fusion_w1"], out["fusion_w2"] = fusion
    return out


def scores(metrics: dict) -> tuple[Scores, list[float] | None]:
    def result(prefix: str) -> EvalResult | None:
        if f"{prefix}_count" not in metrics:
            return None
        return EvalResult(int(metrics[f"{prefix}_correct"]), int(metrics[f"{prefix}_count"]),
                          float(metrics[f"{prefix}_loss_sum"]),
                          tuple(int(x) for x in metrics.get(f"{prefix}_class_correct", [])),
                          tuple(int(x) for x in metrics.get(f"{prefix}_class_count", [])))

    fusion = ([metrics["fusion_w1"], metrics["fusion_w2"]] if "fusion_w1" in metrics
              else None)
    return Scores(result("own"), result("global"), metrics.get("norm"), result("val")), fusion
