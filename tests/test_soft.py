"""SOFT's pieces against their formulas (issue 18): orthonormal starts, the penalty,
importance = singular values for orthogonal factors, whole-component uploads, and the
server's mean over each coordinate's senders."""

from __future__ import annotations

import math

import pytest
import torch

from sfedlora.aggregation.combiners import mean_over_senders
from sfedlora.config import ConfigError
from sfedlora.core import codecs
from sfedlora.methods import Part, Update, get_method
from sfedlora.methods.soft import SoftClient
from sfedlora.methods.soft.components import (
    component_positions,
    importance,
    orthogonality_penalty,
    orthonormal_rows,
    svd_importance,
    top_components,
)
from sfedlora.runtime.simulation import Simulation


def _orthogonal_factors(r=4, d_in=16, d_out=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = orthonormal_rows(torch.randn(r, d_in, generator=gen, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))
    scales = torch.tensor([3.0, 0.5, 2.0, 1.0], dtype=torch.float64)[:r]
    return a, q * scales  # B's columns orthogonal, of norms 3, 0.5, 2, 1


def test_orthonormal_rows_span_the_same_rows():
    a = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = orthonormal_rows(a)
    assert torch.allclose(q @ q.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # same row space: projecting a onto q's rows gives a back
    assert torch.allclose(a @ q.T @ q, a, atol=1e-10)


def test_importance_equals_the_singular_values_for_orthogonal_factors():
    a, b = _orthogonal_factors()
    s = importance(a, b)
    assert torch.allclose(s, torch.tensor([3.0, 0.5, 2.0, 1.0], dtype=torch.float64))
    singular = torch.linalg.svdvals(b @ a)[:4]
    assert torch.allclose(torch.sort(s, descending=True).values, singular, atol=1e-10)


def test_svd_importance_gives_the_top_components_their_singular_values():
    a, b = _orthogonal_factors()  # components of singular values 3, 0.5, 2, 1
    s = svd_importance(a, b, keep=0.5)  # the best rank-2 part: components 0 and 2
    assert torch.allclose(s, torch.tensor([3.0, 0.0, 2.0, 0.0], dtype=torch.float64),
                          atol=1e-10)
    assert top_components(s, 0.5).tolist() == top_components(importance(a, b), 0.5).tolist()
    # components 0 and 1 nearly cancel (B A = diag(0.1, 0.5)): the norms rule keeps
    # component 0 (1 x 1), the SVD rule component 2, which holds the top direction
    a3 = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    b3 = torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(b3 @ a3, torch.diag(torch.tensor([0.1, 0.5], dtype=torch.float64)))
    assert top_components(importance(a3, b3), 1 / 3).tolist() == [0]
    assert torch.allclose(svd_importance(a3, b3, 1 / 3),
                          torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64), atol=1e-12)
    assert top_components(svd_importance(a3, b3, 1 / 3), 1 / 3).tolist() == [2]


@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_svd_importance_equals_its_formula_on_the_full_product(keep):
    """The QR route gives what the definition does on the d_out x d_in product B A,
    for factors that are not orthogonal."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 30, generator=gen, dtype=torch.float64)
    b = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    k = math.ceil(keep * 8)
    u, _, vh = torch.linalg.svd(b @ a, full_matrices=False)
    expected = (torch.linalg.vector_norm(u[:, :k].T @ b, dim=0)
                * torch.linalg.vector_norm(vh[:k] @ a.T, dim=0))
    torch.testing.assert_close(svd_importance(a, b, keep), expected, rtol=1e-9, atol=1e-9)


def test_penalty_is_zero_for_orthogonal_factors_and_its_formula_otherwise():
    a, b = _orthogonal_factors()
    assert orthogonality_penalty(a, b).item() == pytest.approx(0.0, abs=1e-20)
    a2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    b2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # A A^T - I = [[1, 1], [1, 0]]: 3; B^T B off-diagonal 1*2 + 3*4 = 14, twice: 392
    assert orthogonality_penalty(a2, b2).item() == 3.0 + 2 * 14.0 ** 2


def test_top_components_and_their_positions():
    chosen = top_components(torch.tensor([0.1, 3.0, 0.1, 2.0]), keep=0.5)
    assert chosen.tolist() == [1, 3]
    assert top_components(torch.ones(4), keep=0.3).tolist() == [0, 1]  # ceil, ties low
    a_pos, b_pos = component_positions(chosen, torch.Size([4, 3]), torch.Size([2, 4]))
    assert a_pos.tolist() == [3, 4, 5, 9, 10, 11]  # rows 1 and 3 of A (4 x 3)
    assert b_pos.tolist() == [1, 3, 5, 7]  # columns 1 and 3 of B (2 x 4)


@pytest.mark.parametrize("rule", ["norms", "svd"])  # the same for orthogonal factors
def test_an_upload_carries_exactly_the_top_components_of_each_layer(rule):
    from sfedlora.methods.soft.components import IMPORTANCE

    a, b = (t.float() for t in _orthogonal_factors())
    upload = {"l.lora_A.default.weight": a, "l.lora_B.default.weight": b,
              "head.weight": torch.ones(3, 2)}
    reference = {n: torch.zeros_like(t) for n, t in upload.items()}
    client = SoftClient.__new__(SoftClient)  # no model needed to choose components
    client.keep, client.score = 0.5, IMPORTANCE[rule]
    positions = client.choose_upload(upload).positions
    payload = codecs.Codec(delta=True).encode(upload, reference, positions=positions)
    decoded, present = codecs.decode_with_presence(payload, reference)
    rows = present["l.lora_A.default.weight"].all(dim=1)
    cols = present["l.lora_B.default.weight"].all(dim=0)
    assert rows.tolist() == cols.tolist() == [True, False, True, False]  # norms 3 and 2
    assert not present["l.lora_A.default.weight"][~rows].any()
    assert torch.equal(decoded["l.lora_A.default.weight"][rows], a[rows])
    assert torch.equal(decoded["l.lora_A.default.weight"][~rows], torch.zeros(2, 16))
    assert torch.equal(decoded["head.weight"], upload["head.weight"])  # sent whole
    sent = sum(int(m.sum()) for m in present.values())
    assert sent == 2 * 16 + 12 * 2 + 6  # two rows of A, two columns of B, the whole head


def test_mean_over_senders_is_its_formula():
    x = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0]),
         torch.tensor([9.0, 10.0, 11.0])]
    sent = [torch.tensor([True, True, False]), torch.tensor([True, False, False]),
            torch.tensor([False, True, False])]
    w = [0.5, 0.25, 0.25]
    out = mean_over_senders(x, w, sent)
    assert out[0].item() == pytest.approx((0.5 * 1 + 0.25 * 5) / 0.75)
    assert out[1].item() == pytest.approx((0.5 * 2 + 0.25 * 10) / 0.75)
    assert out[2].item() == 3.0  # nobody sent it: the decoded (reference) value stays
    plain = sum(wi * xi for wi, xi in zip(w, x, strict=True))
    assert torch.equal(mean_over_senders(x, w, None), plain)


def _two_uploads() -> list[Update]:
    """Client 0 (10 examples) sent row 0 of A; client 1 (30 examples) both rows."""
    one = Update(0, 10, {"A": torch.tensor([[1.0, 1.0], [0.0, 0.0]])},
                 {"A": torch.tensor([[True, True], [False, False]])})
    two = Update(1, 30, {"A": torch.tensor([[3.0, 3.0], [4.0, 4.0]])},
                 {"A": torch.tensor([[True, True], [True, True]])})
    return [one, two]


def test_the_server_averages_each_component_over_its_senders():
    new = get_method("soft").aggregate({"A": torch.zeros(2, 2)}, _two_uploads())["A"]
    assert torch.allclose(new[0], torch.full((2,), (10 * 1 + 30 * 3) / 40))
    assert torch.allclose(new[1], torch.full((2,), 4.0))  # only client 1 sent row 1


def test_under_dp_a_component_is_averaged_over_every_client_not_its_senders():
    from sfedlora.aggregation.combiners import uniform_mean

    new = get_method("soft").aggregate({"A": torch.zeros(2, 2)}, _two_uploads(),
                                       uniform_mean)["A"]
    # the DP noise is sized for a mean over both clients: row 1 moves by 4 / 2, not 4
    assert torch.equal(new, torch.tensor([[2.0, 2.0], [2.0, 2.0]]))


def test_a_soft_run_starts_from_orthonormal_a_and_sends_fewer_bytes(tiny_config):
    sims = {keep: Simulation(tiny_config("method=soft", f"options.keep={keep}", "rounds=1",
                                         f"output_dir={tiny_config().output_dir}-{keep}"))
            for keep in (0.5, 1.0)}
    state = sims[0.5].server.state
    for name in sims[0.5].server.names_for({Part.A}):
        a = state[name]
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-5), name
    up = {keep: sim.run_round(1).metrics["bytes_up"] for keep, sim in sims.items()}
    assert up[0.5] < 0.8 * up[1.0]
    svd = Simulation(tiny_config("method=soft", "options.keep=0.5", "options.importance=svd",
                                 "rounds=1", f"output_dir={tiny_config().output_dir}-svd"))
    assert svd.run_round(1).metrics["bytes_up"] < 0.8 * up[1.0]  # it too sends half


@pytest.mark.parametrize(("overrides", "field"), [
    (("options.keep=0",), "options.keep"), (("options.keep=1.5",), "options.keep"),
    (("options.ortho_weight=-1",), "options.ortho_weight"),
    (("comm.up.density=0.25",), "comm.up.density"),
    (("options.importance=eigen",), "options.importance"),
])
def test_bad_soft_settings_are_refused_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config("method=soft", *overrides)


def test_keep_is_a_ceiling_of_the_rank():
    assert math.ceil(0.3 * 4) == len(top_components(torch.arange(4.0), 0.3))


def test_error_feedback_keeps_the_change_of_the_components_not_sent():
    from sfedlora.methods.soft.components import IMPORTANCE

    a, b = (t.float() for t in _orthogonal_factors())
    names = ("l.lora_A.default.weight", "l.lora_B.default.weight")
    reference = {names[0]: torch.zeros_like(a), names[1]: torch.zeros_like(b)}
    client = SoftClient.__new__(SoftClient)
    client.keep, client.score = 0.5, IMPORTANCE["norms"]
    codec = codecs.Codec(delta=True, error_feedback=True)
    upload = dict(zip(names, (a, b), strict=True))
    payload, residual = codec.send(upload, reference, None,
                                   positions=client.choose_upload(upload).positions)
    sent = [True, False, True, False]  # components 0 and 2 have the larger norms
    unsent = torch.tensor([not s for s in sent])
    # what was not sent is kept exactly; what was sent is kept as nothing
    assert torch.equal(residual[names[0]][unsent], a[unsent])
    assert not residual[names[0]][~unsent].any()
    assert torch.equal(residual[names[1]][:, unsent], b[:, unsent])
    assert not residual[names[1]][:, ~unsent].any()
    # a later message that sends every component carries the kept change with it
    client.keep = 1.0
    again = {n: reference[n] + 0.5 * t for n, t in upload.items()}
    payload, residual = codec.send(again, reference, residual,
                                   positions=client.choose_upload(again).positions)
    decoded = codecs.decode(payload, reference)
    assert torch.equal(decoded[names[0]][unsent], 1.5 * a[unsent])
    assert torch.equal(decoded[names[0]][~unsent], 0.5 * a[~unsent])
    assert not any(r.any() for r in residual.values())


def test_a_soft_run_accepts_error_feedback_and_keeps_residuals(tiny_config):
    cfg = tiny_config("method=soft", "options.keep=0.5", "comm.up.error_feedback=true",
                      "rounds=1", "clients.per_round=1")
    assert cfg.codec("up").error_feedback and cfg.codec("up").lossless
    sim = Simulation(cfg)
    sim.run_round(1)
    kept = [s.residual for s in (sim.pool.states[c] for c in range(cfg.clients.num))
            if s.residual]
    assert len(kept) == 1  # the one client that trained
    a_names = [n for n in kept[0] if ".lora_A." in n]
    for name in a_names:
        # the unsent half keeps its change; the sent half only float rounding (the
        # received value is the reference plus the change, not the trained value)
        norms = kept[0][name].norm(dim=1)
        assert int((norms > 1e-3 * norms.max()).sum()) == norms.numel() // 2, name
    with pytest.raises(ConfigError, match="lossless"):  # FedIT loses nothing to feed back
        tiny_config("method=fedit", "comm.up.error_feedback=true")
