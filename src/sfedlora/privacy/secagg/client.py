"""A client's side of secure aggregation, the same for every runtime.

Each exchange is a pure step ``(session state, request bytes) -> (session state, reply
bytes)``; the runtime keeps the state between exchanges (the in-process pool in
memory, a Flower node in its state directory). :func:`upload_vector` turns a client's
trained upload into what it masks: the tensors the server would have decoded, in name
order, with DP clipping done here (the server never sees an individual change), and the
client's own integer weight.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

import sfedlora.privacy.secagg.field as field
import sfedlora.privacy.secagg.messages as sm
from sfedlora.core.records import FitResult, StageRequest
from sfedlora.privacy.secagg.protocol import ClientSession, ProtocolViolation, RoundParams
from sfedlora.settings import ConfigError

log = logging.getLogger(__name__)


def exchange(state: dict | None, cid: int, stage: str, request: bytes
             ) -> tuple[dict | None, bytes]:
    """One of the exchanges ``advertise``, ``share``, ``unmask`` (after which the
    state holds no secret, only that the round was answered: a replayed request of that
    round is refused with :class:`ProtocolViolation`)."""
    body = sm.loads(request)
    if state is not None and "answered" in state:  # that round's secrets are gone
        replay = stage != sm.ADVERTISE or int(body["params"]["round"]) <= state["answered"]
        if replay:
            raise ProtocolViolation(
                f"client {cid}: secure-aggregation {stage} after the unmask of round "
                f"{state['answered']} was answered (a server replaying a round)")
    if stage == sm.ADVERTISE:
        session = ClientSession(cid)
        reply = sm.dumps(session.advertise())  # draws the keys the state must hold
        return {"session": session.state_dict(), "params": body["params"]}, reply
    if state is None:
        raise ValueError(f"client {cid}: secure-aggregation {stage} before advertise")
    session = ClientSession.from_state(state["session"])
    if stage == sm.SHARE:
        reply = session.share(RoundParams.from_json(state["params"]), body["keys"])
    elif stage == sm.UNMASK:  # the last exchange: the round's secrets are dropped,
        # and what is kept says only that it was answered, so it is never answered again
        reply = sm.dumps(session.unmask([int(c) for c in body["survivors"]]))
        return {"answered": int(state["params"]["round"])}, reply
    else:
        raise ValueError(f"unknown secure-aggregation exchange {stage!r}")
    return {**state, "session": session.state_dict()}, sm.dumps(reply)


def mask(state: dict, request: bytes, values: np.ndarray, weight: int
         ) -> tuple[dict, bytes]:
    """The masked, quantised, pre-weighted upload (the ``mask`` exchange)."""
    body = sm.loads(request)
    params = RoundParams.from_json(state["params"])
    session = ClientSession.from_state(state["session"])
    if not np.isfinite(values).all():
        raise ValueError(f"client {session.cid}: non-finite values in the upload")
    vector, clipped = field.quantize(values, weight, params.step, params.value_range,
                                     params.weight_step)
    if clipped:
        log.warning("client %d: %d uploaded values beyond privacy.secagg_range=%g were "
                    "clipped to it", session.cid, clipped, params.value_range)
    masked = session.mask(params, vector, sm.int_keys(body["received"]),
                          [int(c) for c in body["u2"]])
    return {**state, "session": session.state_dict()}, sm.encode_masked(masked)


def masked_fit(worker, cid: int, round_idx: int, download: bytes, fit, state: dict,
               request: bytes):
    """``(state, fit)`` with the fit's upload replaced by its masked vector, and
    nothing else about this client: its data size (the weight is inside the masked
    sum), training loss, gradient norms, steps, token count and method report stay on
    the client, since in the clear they would undo what masking hides."""
    values, weight = upload_vector(worker, cid, round_idx, download, fit.upload,
                                   fit.num_examples)
    state, masked = mask(state, request, values, weight)
    return state, replace(fit, upload=masked, num_examples=0, train_loss=None,
                          grad_norm_A=None, grad_norm_B=None, steps=0, tokens=0, report={})


def upload_vector(worker, cid: int, round_idx: int, download: bytes, upload: bytes,
                  num_examples: int) -> tuple[np.ndarray, float]:
    """What client ``cid`` masks: its upload as the server would decode it (absolute
    values whatever the codec, zero-padded to the server's rank), flattened in name
    order, and its weight (the method's :meth:`~sfedlora.methods.Method.client_weight`;
    1 under DP, where the client also clips its change against what it started from)."""
    from sfedlora.aggregation.combiners import clip_update
    from sfedlora.core import codecs  # model-side: imported where a worker exists
    from sfedlora.core.ranks import pad

    cfg, method = worker.cfg, worker.method
    received, _ = worker.split_download(codecs.decode(download))
    tensors = codecs.decode(upload, reference=received)
    if cfg.privacy.enabled:
        start = {**worker.drawn_start(cid, round_idx), **received}
        tensors = clip_update(tensors, start, cfg.privacy.clip_norm)
    tensors = pad(tensors, worker.spec)
    values = np.concatenate([tensors[n].detach().double().reshape(-1).numpy()
                             for n in sorted(tensors)])
    if cfg.server.weighting == "uniform":  # every client counts as one example
        num_examples = 1
    weight = 1.0 if cfg.privacy.enabled else method.client_weight(num_examples, tensors)
    check_weights(cfg, method, [weight])
    return values, weight


def weight_bound(cfg, method) -> float:
    """The largest weight a client may carry: 1 where the method averages uniformly
    or under DP, else ``privacy.secagg_max_weight``."""
    if cfg.privacy.enabled or method.traits.weighting == "uniform":
        return 1.0
    return float(cfg.privacy.secagg_max_weight)


def check_weights(cfg, method, weights) -> None:
    """Refuse clients heavier than the quantisation was sized for (before training,
    where the data sizes are known, and for every upload)."""
    bound = weight_bound(cfg, method)
    if weights and max(weights) > bound:
        raise ConfigError(
            f"a client weighs {max(weights):g} > privacy.secagg_max_weight={bound:g}: raise "
            f"privacy.secagg_max_weight to at least {max(weights):g} (the quantisation "
            "step grows with it; see docs/reliability.md)")


class SecureAggregationClient:
    """Secure aggregation's client stage (:class:`sfedlora.core.stages.ClientStage`):
    the key exchanges and the masked upload, over any pool."""

    def exchange(self, session: dict | None, cid: int, request: StageRequest
                 ) -> tuple[dict | None, bytes]:
        return exchange(session, cid, request.step, request.body)

    def after_fit(self, worker, cid: int, round_idx: int, download: bytes, fit: FitResult,
                  session: dict | None, request: StageRequest
                  ) -> tuple[dict | None, FitResult]:
        return masked_fit(worker, cid, round_idx, download, fit, session, request.body)
