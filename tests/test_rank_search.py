"""The per-rank first-order table equals direct computation on reconstructed matrices."""

import numpy as np
import pytest

from llc_onnx.compressible import CompressibleNode
from llc_onnx.solvers.rank_search import NodeSVD, from_matrix, matrix_view, useful_ranks


def _node(op, shape, out_axis, reduce_axis):
    return CompressibleNode(name="n", op_type=op, weight="w", input="x", weight_shape=shape, out_axis=out_axis,
                            reduce_axis=reduce_axis, bias=None, group=1, shared_with=())


@pytest.mark.parametrize("gamma", [None, 0.3])
def test_rows_match_direct_computation(gamma):
    rng = np.random.default_rng(0)
    m = rng.standard_normal((12, 9))
    g = rng.standard_normal((12, 9))
    svd = NodeSVD.of(m, g)
    rows = svd.rows(useful_ranks(12, 9), radius=None if gamma is None else gamma * svd.norm, negligible=0.0)
    assert [r.rank for r in rows] == [1, 2, 3, 4, 5]  # r*(21) < 108
    for row in rows:
        approx = svd.reconstruct(row.rank, row.alpha)
        delta = approx - m
        assert row.predicted == pytest.approx(float((g * delta).sum()), rel=1e-9, abs=1e-9)
        assert row.rel_error == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(m), rel=1e-9)
        assert row.params == row.rank * (12 + 9)
        if gamma is not None and row.alpha != 1.0:
            assert row.rel_error == pytest.approx(gamma, rel=1e-6)  # the step ends on the neighbourhood boundary
            plain = svd.reconstruct(row.rank) - m
            assert row.predicted < float((g * plain).sum())  # and lowers the first-order term


def test_early_stopping_on_negligible_error():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((40, 2)) @ rng.standard_normal((2, 40))  # exactly rank 2
    svd = NodeSVD.of(m, rng.standard_normal((40, 40)))
    rows = svd.rows(useful_ranks(40, 40), negligible=1e-7)
    assert rows[-1].rank == 2 and rows[-1].rel_error < 1e-7


def test_views_roundtrip_for_each_layout():
    rng = np.random.default_rng(2)
    for node, shape in [(_node("MatMul", (6, 4), 1, 0), (6, 4)), (_node("Gemm", (4, 6), 0, 1), (4, 6)),
                        (_node("Conv", (5, 3, 2, 2), 0, 1), (5, 3, 2, 2))]:
        w = rng.standard_normal(shape)
        m = matrix_view(w, node)
        assert m.shape[1] == w.shape[node.out_axis]
        np.testing.assert_array_equal(from_matrix(m, node), w)


def test_alpha_from_one_gradient_prediction_from_another():
    """With g_eval, α is still the step for g, while `predicted` is G_eval·δ of that step."""
    rng = np.random.default_rng(3)
    m, g, ge = (rng.standard_normal((10, 8)) for _ in range(3))
    fit_only = NodeSVD.of(m, g).rows([1, 2, 3], radius=0.4 * np.linalg.norm(m), negligible=0.0)
    both = NodeSVD.of(m, g, ge)
    rows = both.rows([1, 2, 3], radius=0.4 * np.linalg.norm(m), negligible=0.0)
    for a, b in zip(fit_only, rows):
        assert a.alpha == b.alpha and a.rel_error == b.rel_error
        delta = both.reconstruct(b.rank, b.alpha) - m
        assert b.predicted == pytest.approx(float((ge * delta).sum()), rel=1e-9, abs=1e-12)
