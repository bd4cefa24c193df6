import math

import numpy as np
import pytest

from llc_onnx.errors import LLCError
from llc_onnx.quant import QuantizedWeight, WeightQuantSpec, dominated_levels, qrange, quantize_weight, weight_nbytes


def _rng(seed=0):
    return np.random.default_rng(seed)


def _groups(a, qw, out_axis, reduce_axis):
    """Rows of `a`, one per scale of qw (reference implementation written independently)."""
    if qw.block_size is None:
        return np.moveaxis(a, out_axis, 0).reshape(a.shape[out_axis], -1)
    t = np.moveaxis(a, reduce_axis, -1)
    k = t.shape[-1]
    bs = qw.block_size
    rows = []
    for idx in np.ndindex(*t.shape[:-1]):
        for b0 in range(0, k, bs):
            rows.append(t[idx][b0:b0 + bs])
    return rows


def _expand_scale(qw, shape):
    if qw.block_size is None:
        bshape = [1] * len(shape)
        bshape[qw.axis] = shape[qw.axis]
        return qw.scale.reshape(bshape).astype(np.float64)
    s = np.repeat(qw.scale, qw.block_size, axis=qw.axis)
    return np.take(s, np.arange(shape[qw.axis]), axis=qw.axis).astype(np.float64)


def _layout(qw, out_axis, reduce_axis, *arrays):
    """Arrays in the layout of qw.q (the (O, R) matrix for a blocked Conv weight) and the axes there."""
    if qw.q.shape == arrays[0].shape:
        return (out_axis, reduce_axis, *arrays)
    return (0, 1, *[a.reshape(qw.q.shape) for a in arrays])


CASES = [  # (shape, out_axis, reduce_axis)
    ((8, 3, 3, 3), 0, 1),        # Conv [O, I, kh, kw]
    ((40, 12), 1, 0),            # MatMul [K, N]
    ((12, 40), 0, 1),            # Gemm transB=1 [N, K]
]


@pytest.mark.parametrize("shape,out_axis,reduce_axis", CASES)
@pytest.mark.parametrize("bits,block", [(8, None), (16, None), (4, 32), (2, 16), (4, None), (8, 7)])
def test_nearest_error_bounded_and_layout(shape, out_axis, reduce_axis, bits, block):
    w = _rng(bits).standard_normal(shape).astype(np.float32)
    qw = quantize_weight(w, WeightQuantSpec(bits, block), out_axis, reduce_axis)
    assert isinstance(qw, QuantizedWeight)
    assert qw.q.dtype == np.int32 and qw.dequant.shape == w.shape
    assert qw.scale.dtype == np.float32 and qw.dequant.dtype == np.float32
    if block is None:
        assert qw.q.shape == w.shape
        assert qw.axis == out_axis and qw.scale.shape == (shape[out_axis],)
    elif len(shape) >= 3:  # Conv: matrix layout, blocks over C·kh·kw
        r = math.prod(shape[1:])
        assert qw.q.shape == (shape[0], r)
        assert qw.axis == 1 and qw.scale.shape == (shape[0], math.ceil(r / block))
    else:
        assert qw.q.shape == w.shape
        exp = list(shape)
        exp[reduce_axis] = math.ceil(shape[reduce_axis] / block)
        assert qw.axis == reduce_axis and qw.scale.shape == tuple(exp)
    out_axis, reduce_axis, w = _layout(qw, out_axis, reduce_axis, w)
    s = _expand_scale(qw, w.shape)
    # dequant is exactly q * scale in float32, as DequantizeLinear computes it (reshaped to the weight)
    np.testing.assert_array_equal(qw.dequant.reshape(w.shape), (qw.q.astype(np.float32) * s.astype(np.float32)))
    dequant = qw.dequant.reshape(w.shape)
    # minmax + nearest: no clipping, |w - dq| <= scale / 2 (+ float32 rounding of the product)
    err = np.abs(dequant.astype(np.float64) - w)
    assert np.all(err <= s / 2 * (1 + 1e-6) + 1e-7 * np.abs(w))
    qmin, qmax = qrange(bits)
    assert qw.q.min() >= qmin and qw.q.max() <= qmax
    # minmax: the largest |w| of each group maps to ±qmax
    for row in _groups(qw.q, qw, out_axis, reduce_axis):
        assert np.abs(row).max() == qmax


def test_blocked_partial_last_block_scale_values():
    rng = _rng(1)
    w = rng.standard_normal((70, 5)).astype(np.float32)     # MatMul [K=70, N=5], blocks 32, 32, 6
    qw = quantize_weight(w, WeightQuantSpec(4, 32), out_axis=1, reduce_axis=0)
    assert qw.scale.shape == (3, 5)
    for b, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        expect = (np.abs(w[lo:hi].astype(np.float64)).max(axis=0) / 7).astype(np.float32)
        np.testing.assert_array_equal(qw.scale[b], expect)


@pytest.mark.parametrize("rounding", ["up", "down"])
@pytest.mark.parametrize("block", [None, 16])
def test_directed_rounding(rounding, block):
    w = _rng(2).standard_normal((6, 50)).astype(np.float32)
    qw = quantize_weight(w, WeightQuantSpec(4, block, "minmax", rounding), 0, 1)
    near = quantize_weight(w, WeightQuantSpec(4, block), 0, 1)
    np.testing.assert_array_equal(qw.scale, near.scale)
    if rounding == "up":
        assert np.all(qw.dequant >= w)
    else:
        assert np.all(qw.dequant <= w)
    s = _expand_scale(qw, w.shape)
    assert np.all(np.abs(qw.dequant - w) < s * (1 + 1e-6))
    assert np.all(np.abs(qw.q - near.q) <= 1)


def test_directed_rounding_with_clipping_stays_in_range():
    w = _rng(3).laplace(size=(4, 512)).astype(np.float32)
    for rounding in ("up", "down"):
        qw = quantize_weight(w, WeightQuantSpec(4, None, "aciq", rounding), 0, 1)
        qmin, qmax = qrange(4)
        assert qw.q.min() >= qmin and qw.q.max() <= qmax
        s = _expand_scale(qw, w.shape)
        inside = np.abs(w) <= qmax * s          # not clipped
        if rounding == "up":
            assert np.all(qw.dequant[inside] >= w[inside])
        else:
            assert np.all(qw.dequant[inside] <= w[inside])


def _sign_round(w, g, qw, out_axis, reduce_axis):
    s = _expand_scale(qw, w.shape)
    qmin, qmax = qrange(qw.bits)
    x = w.astype(np.float64) / s
    q = np.where(g < 0, np.ceil(x), np.floor(x))
    return np.clip(q, qmin, qmax) * s


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,out_axis,reduce_axis,block,bits", [
    ((16, 64), 0, 1, None, 8), ((16, 64), 0, 1, None, 4), ((96, 8), 1, 0, 32, 4),
    ((8, 4, 3, 3), 0, 1, None, 8), ((8, 20, 3, 3), 0, 1, 16, 2), ((50, 6), 1, 0, 64, 4)])
def test_llc_rounding_first_order_nonpositive_and_small(seed, shape, out_axis, reduce_axis, block, bits):
    rng = _rng(100 + seed)
    w = rng.standard_normal(shape).astype(np.float32)
    # gradient correlated with the rounding error of nearest rounding so nearest is often "bad"
    g = rng.standard_normal(shape) + 0.5 * rng.standard_normal(shape[out_axis]).reshape(
        [-1 if i == out_axis else 1 for i in range(len(shape))])
    spec = WeightQuantSpec(bits, block, "minmax", "llc")
    qw = quantize_weight(w, spec, out_axis, reduce_axis, grad=g)
    near = quantize_weight(w, WeightQuantSpec(bits, block), out_axis, reduce_axis)
    np.testing.assert_array_equal(qw.scale, near.scale)
    out_axis, reduce_axis, w, g = _layout(qw, out_axis, reduce_axis, w, g)
    s = _expand_scale(qw, w.shape)
    delta = qw.q * s - w.astype(np.float64)
    d_sign = _sign_round(w, g, qw, out_axis, reduce_axis) - w.astype(np.float64)
    d_near = near.q * s - w.astype(np.float64)
    gd_rows = _groups(g * delta, qw, out_axis, reduce_axis)
    gabs_rows = _groups(np.abs(g) * s, qw, out_axis, reduce_axis)
    n_fixed = 0
    for gd, ga, gn in zip(gd_rows, gabs_rows, _groups(g * d_near, qw, out_axis, reduce_axis)):
        assert gd.sum() <= 1e-9 * ga.sum()
        if gn.sum() > 0:
            n_fixed += 1
        else:  # nearest already fine: kept unchanged
            assert gd.sum() == pytest.approx(gn.sum(), abs=1e-12 * ga.sum())
    assert n_fixed > 0, "test data should contain groups where nearest rounding has Σ g·δ > 0"
    # per group the noise is no larger than pure sign rounding, and at least nearest's
    for dl, ds, dn in zip(_groups(delta, qw, out_axis, reduce_axis), _groups(d_sign, qw, out_axis, reduce_axis),
                          _groups(d_near, qw, out_axis, reduce_axis)):
        assert np.sum(dl ** 2) <= np.sum(ds ** 2) * (1 + 1e-12)
        assert np.sum(dl ** 2) >= np.sum(dn ** 2) * (1 - 1e-12)
    assert np.all(np.abs(qw.q - near.q) <= 1)
    qmin, qmax = qrange(bits)
    assert qw.q.min() >= qmin and qw.q.max() <= qmax


def test_llc_strictly_smaller_than_sign_rounding_on_random_data():
    rng = _rng(7)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    g = rng.standard_normal(w.shape)
    qw = quantize_weight(w, WeightQuantSpec(4, None, "minmax", "llc"), 0, 1, grad=g)
    s = _expand_scale(qw, w.shape)
    d = qw.q * s - w
    ds = _sign_round(w, g, qw, 0, 1) - w
    assert np.sum(d ** 2) < 0.8 * np.sum(ds ** 2)


def test_llc_with_clipping_stays_in_range_and_needs_grad():
    rng = _rng(8)
    w = rng.laplace(size=(8, 256)).astype(np.float32)
    g = rng.standard_normal(w.shape)
    for method in ("mse", "aciq"):
        qw = quantize_weight(w, WeightQuantSpec(2, 64, method, "llc"), 0, 1, grad=g)
        assert qw.q.min() >= -2 and qw.q.max() <= 1
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(4, None, "minmax", "llc"), 0, 1)
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(4, None, "minmax", "llc"), 0, 1, grad=g[:, :3])


def test_llc_zero_gradient_equals_nearest():
    w = _rng(9).standard_normal((5, 40)).astype(np.float32)
    a = quantize_weight(w, WeightQuantSpec(4, 8, "minmax", "llc"), 0, 1, grad=np.zeros_like(w))
    b = quantize_weight(w, WeightQuantSpec(4, 8), 0, 1)
    np.testing.assert_array_equal(a.q, b.q)


@pytest.mark.parametrize("bits,block", [(4, None), (4, 64), (2, 32), (8, None)])
def test_mse_beats_minmax_on_heavy_tails(bits, block):
    rng = _rng(10)
    w = rng.standard_t(df=2, size=(16, 256)).astype(np.float32)
    mm = quantize_weight(w, WeightQuantSpec(bits, block, "minmax"), 0, 1)
    ms = quantize_weight(w, WeightQuantSpec(bits, block, "mse"), 0, 1)
    e_mm = np.sum((mm.dequant.astype(np.float64) - w) ** 2)
    e_ms = np.sum((ms.dequant.astype(np.float64) - w) ** 2)
    assert e_ms < e_mm
    # and per group never worse (ratio 1.0 is on the grid)
    for r_ms, r_mm in zip(_groups((ms.dequant.astype(np.float64) - w) ** 2, ms, 0, 1),
                          _groups((mm.dequant.astype(np.float64) - w) ** 2, mm, 0, 1)):
        assert r_ms.sum() <= r_mm.sum() * (1 + 1e-9)
    assert np.all(ms.scale <= mm.scale)


def test_aciq_clips_laplace_at_4_bits():
    rng = _rng(11)
    b = np.array([0.5, 1.0, 2.0, 0.1])[:, None]
    w = (rng.laplace(size=(4, 4096)) * b).astype(np.float32)
    qw = quantize_weight(w, WeightQuantSpec(4, None, "aciq"), 0, 1)
    w64 = w.astype(np.float64)
    absmax = np.abs(w64).max(axis=1)
    clip = qw.scale.astype(np.float64) * 7
    assert np.all(clip < absmax)
    b_hat = np.abs(w64 - w64.mean(axis=1, keepdims=True)).mean(axis=1)
    np.testing.assert_allclose(clip, 5.03 * b_hat, rtol=1e-6)
    # 16 bit falls back to minmax
    q16 = quantize_weight(w, WeightQuantSpec(16, None, "aciq"), 0, 1)
    np.testing.assert_array_equal(q16.scale, (absmax / 32767).astype(np.float32))
    # aciq at 4 bits has lower MSE than minmax on Laplace data
    mm = quantize_weight(w, WeightQuantSpec(4, None, "minmax"), 0, 1)
    assert np.sum((qw.dequant - w64) ** 2) < np.sum((mm.dequant - w64) ** 2)


def test_aciq_blocked_ignores_padding():
    rng = _rng(12)
    w = rng.laplace(size=(3, 40)).astype(np.float32)           # blocks of 32 and 8
    qw = quantize_weight(w, WeightQuantSpec(3, 32, "aciq"), 0, 1)
    tail = w[:, 32:].astype(np.float64)
    b_hat = np.abs(tail - tail.mean(axis=1, keepdims=True)).mean(axis=1)
    expect = np.minimum(3.89 * b_hat, np.abs(tail).max(axis=1)) / 3
    np.testing.assert_allclose(qw.scale[:, 1], expect, rtol=1e-6)


@pytest.mark.parametrize("spec", [WeightQuantSpec(4, 32, "mse", "llc"), WeightQuantSpec(8, None, "aciq", "nearest"),
                                  WeightQuantSpec(2, 64, "minmax", "up")])
def test_deterministic(spec):
    rng = _rng(13)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    g = rng.standard_normal(w.shape)
    a = quantize_weight(w, spec, 1, 0, grad=g)
    b = quantize_weight(w.copy(), spec, 1, 0, grad=g.copy())
    assert a.q.tobytes() == b.q.tobytes()
    assert a.scale.tobytes() == b.scale.tobytes()
    assert a.dequant.tobytes() == b.dequant.tobytes()


@pytest.mark.parametrize("shape,out_axis,reduce_axis", CASES + [((100, 3), 1, 0), ((7,), 0, 0)])
@pytest.mark.parametrize("bits,block", [(8, None), (16, None), (4, 32), (2, 128), (4, 64), (3, 5)])
def test_nbytes_exact(shape, out_axis, reduce_axis, bits, block):
    w = _rng(14).standard_normal(shape).astype(np.float32)
    spec = WeightQuantSpec(bits, block)
    qw = quantize_weight(w, spec, out_axis, reduce_axis)
    numel = int(np.prod(shape))
    expect = (bits * numel + 7) // 8 + 4 * qw.scale.size
    assert qw.nbytes == expect
    assert weight_nbytes(shape, spec, reduce_axis, out_axis=out_axis) == expect
    if len(shape) >= 2:  # out_axis inferred for 2-D (other axis) and Conv (0)
        assert weight_nbytes(shape, spec, reduce_axis) == expect


def test_zero_and_constant_groups():
    w = np.zeros((3, 10), dtype=np.float32)
    w[1] = 0.25
    for method in ("minmax", "mse", "aciq"):
        qw = quantize_weight(w, WeightQuantSpec(4, None, method), 0, 1)
        assert np.all(np.isfinite(qw.scale)) and np.all(qw.scale > 0)
        np.testing.assert_array_equal(qw.dequant[0], 0)
        np.testing.assert_allclose(qw.dequant[1], 0.25, rtol=1e-6)


def test_bad_input():
    w = np.ones((4, 4), dtype=np.float32)
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(1, None), 0, 1)
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(4, 0), 0, 1)
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(4, None, "foo"), 0, 1)
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(4, None, "minmax", "stochastic"), 0, 1)
    with pytest.raises(LLCError):
        quantize_weight(w, WeightQuantSpec(4, None), 2, 1)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(LLCError):
        quantize_weight(bad, WeightQuantSpec(4, None), 0, 1)


def test_llc_flips_no_more_than_needed():
    """Un-flipping the last flip taken (worst added error per unit of Σ g·δ) makes Σ g·δ positive again."""
    rng = _rng(15)
    w = rng.standard_normal((40, 48)).astype(np.float32)
    g = rng.standard_normal(w.shape)
    qw = quantize_weight(w, WeightQuantSpec(4, 16, "minmax", "llc"), 0, 1, grad=g)
    near = quantize_weight(w, WeightQuantSpec(4, 16), 0, 1)
    s = _expand_scale(qw, w.shape)
    w64 = w.astype(np.float64)
    n_checked = 0
    for q, qn, ss, gg, ww in zip(*[_groups(a, qw, 0, 1) for a in (qw.q.astype(np.float64), near.q.astype(np.float64),
                                                                    s, g, w64)]):
        flipped = np.flatnonzero(q != qn)
        if flipped.size == 0:
            assert np.sum(gg * (qn * ss - ww)) <= 0
            continue
        gain = -gg * (q - qn) * ss
        assert np.all(gain[flipped] > 0)                       # every flip moves against the gradient
        extra = (q * ss - ww) ** 2 - (qn * ss - ww) ** 2
        last = flipped[np.argmax(extra[flipped] / gain[flipped])]
        q2 = q.copy()
        q2[last] = qn[last]
        assert np.sum(gg * (q2 * ss - ww)) > 0
        n_checked += 1
    assert n_checked > 10


def test_depthwise_conv_blocks_run_over_the_flattened_reduction():
    """A depthwise (32, 1, 3, 3) weight at int4: one block of 9 per output channel (272 B), not one
    1-element block per (o, kh, kw) (1,296 B, more than the 1,152 B of float32)."""
    w = _rng(16).standard_normal((32, 1, 3, 3)).astype(np.float32)
    spec = WeightQuantSpec(4, 32)
    qw = quantize_weight(w, spec, 0, 1)
    assert qw.q.shape == (32, 9) and qw.scale.shape == (32, 1) and qw.axis == 1
    assert qw.nbytes == weight_nbytes(w.shape, spec, 1) == 32 * 9 // 2 + 4 * 32 == 272 < w.nbytes
    # per output channel, the largest |w| over C·kh·kw maps to ±7: the block is the whole filter
    np.testing.assert_array_equal(np.abs(qw.q).max(axis=1), 7)
    np.testing.assert_array_equal(qw.scale[:, 0], (np.abs(w.reshape(32, 9).astype(np.float64)).max(1) / 7).astype(np.float32))
    np.testing.assert_array_equal(qw.dequant, (qw.q * qw.scale).astype(np.float32).reshape(w.shape))
    # a regular conv (8, 20, 3, 3) with block 32: 180 = 5 full blocks + 20 per output channel
    w2 = _rng(17).standard_normal((8, 20, 3, 3)).astype(np.float32)
    qw2 = quantize_weight(w2, spec, 0, 1)
    assert qw2.q.shape == (8, 180) and qw2.scale.shape == (8, 6)
    np.testing.assert_array_equal(qw2.scale[:, 5], (np.abs(w2.reshape(8, 180)[:, 160:].astype(np.float64)).max(1) / 7)
                                  .astype(np.float32))
    with pytest.raises(LLCError, match="out_axis=0, reduce_axis=1"):
        quantize_weight(w2, spec, 1, 0)


def test_dominated_levels():
    # depthwise 3x3 conv with 8 output channels: int8 per channel costs 72 + 32, int4 blocked 36 + 32,
    # int2 blocked 18 + 32; float 288
    assert dominated_levels({0: 288, 8: 104, 4: 68, 2: 50}) == set()
    assert dominated_levels({"float": 100, "int8": 104, "int4": 68}) == {"int8"}
    assert dominated_levels({16: 60, 8: 60, 4: 70, 2: 40}) == {8, 4}
    assert dominated_levels({}) == set()


@pytest.mark.parametrize("scale", ["minmax", "mse", "aciq", "hqq"])
@pytest.mark.parametrize("rounding", ["nearest", "llc", "up"])
@pytest.mark.parametrize("shape, out_axis, reduce_axis, block", [
    ((40, 24), 1, 0, 16), ((24, 40), 0, 1, None), ((6, 3, 3, 3), 0, 1, 8), ((6, 3, 3, 3), 0, 1, None)])
def test_row_chunks_change_nothing(monkeypatch, scale, rounding, shape, out_axis, reduce_axis, block):
    """Rows (channels / blocks) are quantized in chunks to bound the temporaries of a large weight: every
    decision is one row's, so codes, scales and dequantized values are the same with any chunk size."""
    from llc_onnx.quant import weights as Wm

    rng = np.random.default_rng(7)
    w = rng.standard_t(3, size=shape)
    g = rng.standard_normal(shape)
    spec = WeightQuantSpec(4, block, scale, rounding)
    one = quantize_weight(w, spec, out_axis, reduce_axis, grad=g)
    monkeypatch.setattr(Wm, "ROW_CHUNK_ELEMENTS", 20)   # a few rows per chunk, and a last partial chunk
    chunked = quantize_weight(w, spec, out_axis, reduce_axis, grad=g)
    assert one.q.dtype == chunked.q.dtype == np.int32
    np.testing.assert_array_equal(one.q, chunked.q)
    np.testing.assert_array_equal(one.scale, chunked.scale)
    np.testing.assert_array_equal(one.dequant, chunked.dequant)
    assert one.nbytes == chunked.nbytes


@pytest.mark.parametrize("shape,out_axis,reduce_axis,block", [
    ((40, 24), 1, 0, None), ((40, 24), 1, 0, 16), ((45, 24), 1, 0, 16), ((24, 45), 0, 1, 32),
    ((8, 3, 3, 3), 0, 1, None), ((8, 3, 3, 3), 0, 1, 16), ((6, 1, 3, 3), 0, 1, 4)])
@pytest.mark.parametrize("bits,float_type", [(4, "float32"), (8, "float32"), (4, "float16"), (2, "bfloat16")])
def test_dequantize_rebuilds_the_dequant_bit_for_bit(shape, out_axis, reduce_axis, block, bits, float_type):
    """``dequantize(q, scale, …)`` — what the code store (``flows.code_store``) rebuilds a kept weight with — equals
    the ``dequant`` of quantize_weight and of GPTQ bit for bit, in every layout (per channel, blocked with a
    padded last block, a blocked Conv's matrix layout), with the codes in the int8 the store keeps."""
    from llc_onnx.quant.gptq import quantize_weight_gptq
    from llc_onnx.quant.weights import dequantize

    rng = np.random.default_rng(7)
    w = rng.standard_t(3, size=shape).astype(np.float32)
    spec = WeightQuantSpec(bits=bits, block_size=block, scale_method="mse", float_type=float_type)
    got = [quantize_weight(w, spec, out_axis, reduce_axis)]
    k = w.size // w.shape[out_axis]
    x = rng.normal(size=(64, k))
    got.append(quantize_weight_gptq(w, x.T @ x, spec, out_axis, reduce_axis))
    for qw in got:
        dq = dequantize(qw.q.astype(np.int8), qw.scale, qw.block_size, out_axis, reduce_axis, w.shape)
        assert dq.dtype == np.float32 and dq.shape == w.shape
        assert np.array_equal(dq.view(np.int32), qw.dequant.view(np.int32))
