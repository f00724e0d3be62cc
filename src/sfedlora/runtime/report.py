"""What a run tells its user as it goes: one line per round and the final table, the
same on every runtime (``sfedlora run`` draws the table with rich; the Flower
ServerApp writes both through Flower's logger, where ``flwr run --stream`` shows them).
"""

from __future__ import annotations

import os
import warnings

from sfedlora.core.records import Metric


def quiet_libraries() -> None:
    """Silence what the model stack prints on every load (transformers' weight-loading
    reports and progress bars, the libraries' deprecation and future warnings, which
    are addressed to us, not to our users), so a run's output is the run's."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (FutureWarning, DeprecationWarning):  # the libraries' notes to us
        warnings.filterwarnings("ignore", category=category,
                                module=r"(transformers|peft|torch|datasets)(\.|$)")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

# the figures a round's line shows, where the round has them (evaluation rounds add
# the quality figures), in this order
ROUND_KEYS = (
    (Metric.TRAIN_LOSS, "train loss"),
    (Metric.PERSONALIZED_ACCURACY, "personalised acc"),
    (Metric.GLOBAL_ACCURACY, "global acc"),
    (Metric.PERSONALIZED_PERPLEXITY, "personalised ppl"),
    (Metric.PERSONALIZED_EXACT_MATCH, "personalised EM"),
    (Metric.BYTES_UP, "bytes up"),
    (Metric.BYTES_DOWN, "bytes down"),
)


def _number(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def round_line(record: dict, rounds: int) -> str:
    """``round 3/10: train loss 0.5123, personalised acc 0.8125, ...``, with the
    clients a round rejected or lost named at the end."""
    parts = [f"{name} {_number(record[key])}" for key, name in ROUND_KEYS
             if record.get(key) is not None]
    for key in ("rejected", "dropped"):
        if record.get(key):
            parts.append(f"{key} {record[key]}")
    return f"round {record[Metric.ROUND]}/{rounds}: " + ", ".join(parts)


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The final table's (name, value) rows."""
    if summary.get(Metric.PERSONALIZED_PERPLEXITY) is not None:  # causal-lm
        quality = [
            ("personalised perplexity", summary[Metric.PERSONALIZED_PERPLEXITY]),
            ("global perplexity", summary[Metric.GLOBAL_PERPLEXITY]),
            ("personalised exact match", summary[Metric.PERSONALIZED_EXACT_MATCH]),
            ("global exact match", summary[Metric.GLOBAL_EXACT_MATCH]),
        ]
    else:
        quality = [
            ("personalised accuracy", summary[Metric.PERSONALIZED_ACCURACY]),
            ("global accuracy", summary[Metric.GLOBAL_ACCURACY]),
        ]
    rows = [
        ("rounds", summary["round"]),
        ("train loss", summary[Metric.TRAIN_LOSS]),
        *quality,
        ("bytes up (total)", summary[Metric.BYTES_UP_TOTAL]),
        ("bytes down (total)", summary[Metric.BYTES_DOWN_TOTAL]),
        ("bytes up + down", summary[Metric.BYTES_TOTAL]),
        ("bytes per client (up / down, mean)", _per_client_bytes(summary)),
        ("wall seconds", summary["wall_seconds"]),
    ]
    return [(name, _number(value)) for name, value in rows]


def summary_title(summary: dict) -> str:
    scale = ("VeRA" if summary["gamma"] is None else f"gamma={summary['gamma']:.3g}")
    return f"sfedlora: {summary['method']} ({summary['scaling']} scaling, {scale})"


def summary_text(summary: dict, run_dir) -> list[str]:
    """The final table as plain lines (for a log)."""
    rows = summary_rows(summary)
    width = max(len(name) for name, _ in rows)
    return [summary_title(summary),
            *(f"  {name:<{width}}  {value:>14}" for name, value in rows),
            f"run directory: {run_dir}"]


def _per_client_bytes(summary: dict) -> str:
    up = summary.get(Metric.BYTES_UP_TOTAL_PER_CLIENT) or {}
    down = summary.get(Metric.BYTES_DOWN_TOTAL_PER_CLIENT) or {}
    if not up:
        return "-"
    return f"{sum(up.values()) / len(up):,.0f} / {sum(down.values()) / len(down):,.0f}"

