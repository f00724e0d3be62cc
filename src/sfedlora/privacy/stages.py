"""The privacy layer's stages, as the runtime finds them.

A runtime never names a privacy feature: its pools look a :class:`~sfedlora.core.
stages.ClientStage` up here by the name a :class:`~sfedlora.core.records.StageRequest`
carries, and its round loop asks :func:`upload_stage` for the server's side of the
round's uploads, taking its own plain stage where this returns None. A new stage that
exchanges messages with clients is one entry in :data:`CLIENT_STAGES` and one branch in
:func:`upload_stage`.
"""

from __future__ import annotations

from sfedlora.core.stages import ClientStage, UploadStage
from sfedlora.privacy.secagg.client import SecureAggregationClient, check_weights
from sfedlora.privacy.secagg.server_stage import STAGE as SECURE_AGGREGATION
from sfedlora.privacy.secagg.server_stage import SecureUploads
from sfedlora.settings import ExperimentConfig

CLIENT_STAGES: dict[str, ClientStage] = {SECURE_AGGREGATION: SecureAggregationClient()}


def client_stage(name: str) -> ClientStage:
    """The client stage that answers requests named ``name``."""
    try:
        return CLIENT_STAGES[name]
    except KeyError:
        raise ValueError(f"no client stage {name!r} (known: {sorted(CLIENT_STAGES)}); "
                         "the server and this client run different sfedlora versions"
                         ) from None


def upload_stage(cfg: ExperimentConfig, server, pool) -> UploadStage | None:
    """The stage that collects a round's uploads where privacy settings replace the
    plain exchange (``privacy.secure_aggregation``: the server sees only masked vectors
    and, once unmasked, their sum); None: the runtime's plain stage."""
    if cfg.privacy.secure_aggregation:
        return SecureUploads(cfg, server, pool)
    return None


def check_clients(cfg: ExperimentConfig, method, train_sizes: list[int]) -> None:
    """Refuse, before training, clients that the configured stages cannot carry: under
    secure aggregation, data-size weights beyond what its quantisation was sized for
    (``privacy.secagg_max_weight``; known in advance for integer weights without DP)."""
    if cfg.privacy.secure_aggregation and method.traits.integer_weights and not cfg.privacy.enabled:
        check_weights(cfg, method, [method.client_weight(n, {}) for n in train_sizes])
