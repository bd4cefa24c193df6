"""Series expansion of weights: T = 1 is the quantizer, residuals shrink, and the abelian algebra of expansions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llc_onnx.errors import LLCError
from llc_onnx.quant import WeightQuantSpec, quantize_weight
from llc_onnx.series import (
    SeriesModel,
    abelian_add,
    abelian_mul,
    expand_options,
    expand_weight,
    identity,
    inverse,
    model_add,
    model_identity,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

# (shape, out_axis, reduce_axis): MatMul [K, N], Gemm transB=1 [N, K], Conv [O, C, kh, kw]
layouts = st.sampled_from([((37, 6), 1, 0), ((6, 37), 0, 1), ((64, 5), 1, 0), ((5, 3, 3, 3), 0, 1),
                           ((4, 8, 2, 2), 0, 1), ((3, 9), 1, 0)])
bits_s = st.sampled_from([2, 4, 8])
blocks = st.sampled_from(["default", None, 8, 16, 32])
scale_methods = st.sampled_from(["mse", "minmax", "aciq"])


@st.composite
def weights(draw, layout=None):
    shape, out_axis, reduce_axis = draw(layouts) if layout is None else layout
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    dist = draw(st.sampled_from(["normal", "laplace", "outliers", "tiny"]))
    w = rng.normal(size=shape)
    if dist == "laplace":
        w = rng.laplace(size=shape)
    elif dist == "outliers":
        w[tuple(rng.integers(0, s) for s in shape)] = 25.0
    elif dist == "tiny":
        w = w * 1e-30
    return w.astype(np.float32), out_axis, reduce_axis


@st.composite
def expansions(draw, layout=None, bits=None, block="draw"):
    w, oa, ra = draw(weights(layout))
    b = draw(bits_s) if bits is None else bits
    bs = draw(blocks) if block == "draw" else block
    terms = draw(st.integers(1, 3))
    return expand_weight(w, bits=b, terms=terms, out_axis=oa, reduce_axis=ra, block_size=bs)


@SETTINGS
@given(weights(), bits_s, blocks, scale_methods)
def test_one_term_is_the_quantizer_bit_for_bit(wt, bits, block, method):
    w, oa, ra = wt
    sw = expand_weight(w, bits=bits, terms=1, out_axis=oa, reduce_axis=ra, block_size=block, scale_method=method)
    bs = (None if bits == 8 else 32) if block == "default" else block
    spec = WeightQuantSpec(bits=bits, block_size=bs, scale_method=method)
    if w.ndim == 2:
        ref = quantize_weight(w, spec, oa, ra)
    else:  # Conv: the matrix view [O, C·kh·kw] (blocks over C·kh·kw; per channel identical to the 4-D call)
        ref = quantize_weight(w.reshape(w.shape[0], -1), spec, 0, 1)
        if bs is None:
            ref4 = quantize_weight(w, spec, 0, 1)
            assert np.array_equal(ref4.q.reshape(ref.q.shape), ref.q)
            assert np.array_equal(ref4.scale, ref.scale)
    (term,) = sw.terms
    for f in ("q", "scale", "dequant"):
        a, b = getattr(term, f), getattr(ref, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f
    assert (term.axis, term.block_size, term.bits, term.nbytes) == (ref.axis, ref.block_size, ref.bits, ref.nbytes)
    assert np.array_equal(sw.dequant(), ref.dequant.reshape(w.shape))


@SETTINGS
@given(weights(), bits_s, blocks, st.sampled_from(["mse", "minmax"]))
def test_residual_norm_decreases_with_every_term(wt, bits, block, method):
    w, oa, ra = wt
    sw = expand_weight(w, bits=bits, terms=4, out_axis=oa, reduce_axis=ra, block_size=block, scale_method=method)
    norms = (float(np.linalg.norm(w.astype(np.float64))), *sw.residual_norms)
    assert len(norms) == 5
    for a, b in zip(norms, norms[1:]):
        assert b <= a * (1 + 1e-12)
    assert norms[-1] < norms[0] or norms[0] == 0
    for t in range(1, 5):  # the reported norm is the norm of W − Σ_{s<t} s_s·Q_s
        exact = sum(sw.terms[s].dequant.astype(np.float64) for s in range(t)).reshape(w.shape)
        np.testing.assert_allclose(np.linalg.norm(w - exact), sw.residual_norms[t - 1], rtol=1e-9,
                                   atol=1e-14 * norms[0])  # summation order: float64 rounding of ‖W‖


def test_residuals_shrink_geometrically_at_four_bits():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 64)).astype(np.float32)
    sw = expand_weight(w, bits=4, terms=3, out_axis=1, reduce_axis=0)
    rel = np.array(sw.residual_norms) / sw.weight_norm
    assert rel[0] < 0.12 and rel[1] < rel[0] / 5 and rel[2] < rel[1] / 5, rel
    # T terms at 4 bits beat one term at 8 bits in error from T = 2 on (8-bit per channel)
    one8 = expand_weight(w, bits=8, terms=1, out_axis=1, reduce_axis=0)
    assert sw.residual_norms[1] < one8.residual_norms[0] * 1.5


@SETTINGS
@given(st.data())
def test_abelian_add_is_a_monoid_and_a_group_on_values(data):
    layout = data.draw(layouts)
    bits = data.draw(bits_s)
    block = data.draw(blocks)
    a, b, c = (data.draw(expansions(layout, bits, block)) for _ in range(3))
    # associativity and identity: exact, as term sequences
    assert abelian_add(abelian_add(a, b), c).same_terms(abelian_add(a, abelian_add(b, c)))
    assert abelian_add(a, identity(a)).same_terms(a) and abelian_add(identity(a), a).same_terms(a)
    assert identity(a).order == 0 and not identity(a).dequant().any()
    # commutativity: the same multiset of terms, the same value
    ab, ba = a + b, b + a
    assert ab.order == ba.order == a.order + b.order
    assert ab.term(0).same_terms(a.term(0)) and ba.term(0).same_terms(b.term(0))
    scale = max(1e-30, float(np.abs(a.dequant()).max()), float(np.abs(b.dequant()).max()))
    np.testing.assert_allclose(ab.dequant(), ba.dequant(), rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(ab.dequant(), a.dequant().astype(np.float64) + b.dequant(), rtol=0, atol=1e-6 * scale)
    # inverse: value 0, and inverse(inverse(a)) is a exactly
    np.testing.assert_allclose((a + inverse(a)).dequant(), 0, atol=1e-6 * scale)
    assert inverse(inverse(a)).same_terms(a)
    assert (-a).same_terms(inverse(a))


@SETTINGS
@given(st.data(), st.floats(-4, 4, allow_nan=False, width=32), st.floats(-4, 4, allow_nan=False, width=32))
def test_abelian_mul_laws(data, c, d):
    layout = data.draw(layouts)
    bits = data.draw(bits_s)
    block = data.draw(blocks)
    a, b = (data.draw(expansions(layout, bits, block)) for _ in range(2))
    assert abelian_mul(1.0, a).same_terms(a)
    assert all(np.array_equal(t.dequant, u.dequant) for t, u in zip(abelian_mul(1.0, a).terms, a.terms))
    assert abelian_mul(c, a + b).same_terms(abelian_mul(c, a) + abelian_mul(c, b))   # exact distributivity
    scale = max(1e-30, float(np.abs(a.dequant()).max()))
    tol = 1e-5 * scale * (1 + abs(c)) * (1 + abs(d))
    np.testing.assert_allclose(abelian_mul(c, a).dequant(), c * a.dequant().astype(np.float64), atol=tol)
    np.testing.assert_allclose(abelian_mul(c, abelian_mul(d, a)).dequant(), abelian_mul(c * d, a).dequant(), atol=tol)
    np.testing.assert_allclose(abelian_mul(c + d, a).dequant(), (abelian_mul(c, a) + abelian_mul(d, a)).dequant(),
                               atol=tol)
    assert np.array_equal((2.0 * a).terms[0].q, a.terms[0].q)  # codes never change, only scales


def test_add_needs_the_same_layout():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 4)).astype(np.float32)
    a = expand_weight(w, bits=4, terms=1, out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="different layouts"):
        abelian_add(a, expand_weight(w, bits=2, terms=1, out_axis=1, reduce_axis=0))
    with pytest.raises(LLCError, match="different layouts"):
        abelian_add(a, expand_weight(w.T.copy(), bits=4, terms=1, out_axis=0, reduce_axis=1))


def test_truncation_is_a_progressive_family():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(96, 16)).astype(np.float32)
    sw = expand_weight(w, bits=2, terms=4, out_axis=1, reduce_axis=0)
    sizes = [sw.nbytes(t) for t in range(1, 5)]
    assert sizes == [sizes[0] * t for t in range(1, 5)]  # each 2-bit term: 96·16/4 bytes + 16·3 scales
    assert sizes[0] == 96 * 16 // 4 + 4 * 16 * 3
    for t in range(1, 5):
        tr = sw.truncate(t)
        assert tr.order == t and tr.residual_norms == sw.residual_norms[:t]
        assert np.array_equal(tr.dequant(), sw.dequant(t))
    # the sum of the single-term basis expansions is the expansion
    total = identity(sw)
    for t in range(4):
        total = total + sw.term(t)
    assert total.same_terms(sw)


def test_model_is_the_sum_of_its_basis_models():
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    model = SeriesModel({"fc": expand_weight(w1, bits=4, terms=3, out_axis=1, reduce_axis=0),
                         "conv": expand_weight(w2, bits=4, terms=2, out_axis=0, reduce_axis=1)})
    assert model.order == 3
    total = model_identity(model)
    for t in range(model.order):
        basis = model.basis(t)
        assert basis.weights["fc"].order == 1 and basis.weights["conv"].order == (1 if t < 2 else 0)
        total = model_add(total, basis)
    assert total.same_terms(model)
    assert (model.basis(0) + model.basis(1)).same_terms(model.truncate(2))
    assert model.truncate(1).nbytes() < model.truncate(2).nbytes() < model.nbytes()
    np.testing.assert_allclose((model + -model).dequant()["fc"], 0, atol=1e-6)
    with pytest.raises(LLCError, match="different nodes"):
        model_add(model, SeriesModel({"fc": model.weights["fc"]}))


def test_bad_arguments_are_one_line_errors():
    w = np.ones((8, 4), np.float32)
    with pytest.raises(LLCError, match="bits=3"):
        expand_weight(w, bits=3, terms=1, out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="terms=0"):
        expand_weight(w, bits=4, terms=0, out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="Conv weight"):
        expand_weight(np.ones((2, 3, 4), np.float32), bits=4, terms=1, out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="not floating point"):
        expand_weight(np.ones((8, 4), np.int32), bits=4, terms=1, out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="order=5"):
        expand_weight(w, bits=4, terms=2, out_axis=1, reduce_axis=0).dequant(5)


def test_layer_options_are_truncations_of_one_expansion():
    w = np.random.default_rng(4).normal(size=(5, 4, 3, 3)).astype(np.float32)
    opts = expand_options(w, out_axis=0, reduce_axis=1, bits=(2, 4, 8), terms=(1, 2, 3))
    assert sorted(opts) == [(b, t) for b in (2, 4, 8) for t in (1, 2, 3)]
    for (b, t), sw in opts.items():
        assert sw.same_terms(expand_weight(w, bits=b, terms=t, out_axis=0, reduce_axis=1))
        assert sw.residual_norms == expand_weight(w, bits=b, terms=t, out_axis=0, reduce_axis=1).residual_norms
    assert opts[(4, 2)].nbytes() == 2 * opts[(4, 1)].nbytes()
    lean = expand_weight(w, bits=4, terms=2, out_axis=0, reduce_axis=1, keep_target=False)
    assert lean.target is None and lean.residual_norms == opts[(4, 2)].residual_norms
