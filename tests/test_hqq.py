"""quant.hqq: half-quadratic scale search for symmetric groups, and the "hqq" scale method of quantize_weight."""

import numpy as np
import pytest

from llc_onnx.errors import LLCError
from llc_onnx.quant import WeightQuantSpec, qrange, quantize_weight
from llc_onnx.quant.hqq import HQQ_START_RATIOS, hqq_scales, lp_error


def _rows(seed=0, r=512, l=32, kind="normal"):
    rng = np.random.default_rng(seed)
    draw = {"normal": rng.normal, "laplace": rng.laplace}[kind]
    return draw(size=(r, l)) * 0.02


def _lp_grid_best(rows, bits, ratios):
    """Independent reference: the best clipping ratio of a grid under the lp error (p = 0.7), per row."""
    qmin, qmax = qrange(bits)
    amax = np.abs(rows).max(axis=1)
    best = np.full(rows.shape[0], np.inf)
    for r in ratios:
        s = (r * amax / qmax).astype(np.float32).astype(np.float64)[:, None]
        q = np.clip(np.rint(rows / s), qmin, qmax)
        best = np.minimum(best, (np.abs(rows - q * s) ** 0.7).sum(axis=1))
    return best


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "laplace"])
def test_default_refines_minmax_under_the_lp_error(bits, kind):
    rows = _rows(bits, kind=kind)
    s = hqq_scales(rows, bits)
    assert s.dtype == np.float32 and s.shape == (rows.shape[0],) and np.all(s > 0)
    err = lp_error(rows, s, bits)
    s_mm = (np.abs(rows).max(1) / qrange(bits)[1]).astype(np.float32)
    minmax = lp_error(rows, s_mm, bits)
    assert np.all(err <= minmax)                                    # never loses to its start
    assert err.mean() < 0.99 * minmax.mean()
    assert np.mean(s / s_mm) > 0.45                                 # a refinement: no search of hard clipping


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "laplace"])
def test_grid_start_searches_the_lp_objective(bits, kind):
    rows = _rows(bits, kind=kind)
    s = hqq_scales(rows, bits, start="grid")
    err = lp_error(rows, s, bits)
    grid = _lp_grid_best(rows, bits, HQQ_START_RATIOS)
    assert np.all(err <= grid * (1 + 1e-12))                       # the half-quadratic rounds never lose
    assert err.mean() < grid.mean()                                # and improve on their start
    fine = _lp_grid_best(rows, bits, np.linspace(0.3, 1.0, 141))    # within 3 % of a 141-ratio search
    assert err.mean() <= fine.mean() * 1.03
    assert err.mean() < lp_error(rows, hqq_scales(rows, bits), bits).mean()
    with pytest.raises(LLCError, match="start='x'"):
        hqq_scales(rows, bits, start="x")


def test_on_grid_group_keeps_its_exact_scale():
    """A group whose values lie on a symmetric grid that spans it (max |code| = qmax) is represented exactly."""
    rng = np.random.default_rng(4)
    s0 = np.float32(0.013)
    codes = rng.integers(-7, 8, size=(16, 32))
    codes[:, 0] = 7
    rows = codes * np.float64(s0)
    s = hqq_scales(rows, 4)
    q = np.clip(np.rint(rows / s[:, None].astype(np.float64)), -8, 7)
    np.testing.assert_allclose(q * s[:, None], rows, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape,out_axis,reduce_axis,block", [((40, 12), 1, 0, 16), ((12, 40), 0, 1, 32),
                                                                ((8, 3, 3, 3), 0, 1, 2), ((40, 12), 1, 0, None)])
def test_quantize_weight_hqq_method(shape, out_axis, reduce_axis, block):
    w = np.random.default_rng(5).normal(size=shape).astype(np.float32) * 0.05
    spec = WeightQuantSpec(4 if block else 8, block, "hqq")
    qw = quantize_weight(w, spec, out_axis, reduce_axis)
    ref = quantize_weight(w, WeightQuantSpec(spec.bits, block, "minmax"), out_axis, reduce_axis)
    assert qw.scale.shape == ref.scale.shape and qw.axis == ref.axis and qw.nbytes == ref.nbytes
    assert qw.q.dtype == np.int32
    qmin, qmax = qrange(spec.bits)
    assert qw.q.min() >= qmin and qw.q.max() <= qmax
    if block is None:
        bshape = [1] * len(shape)
        bshape[out_axis] = shape[out_axis]
        s = qw.scale.reshape(bshape)
    elif len(shape) >= 3:  # blocked Conv: codes and scales in the [O, R] matrix layout
        o, r = shape[0], int(np.prod(shape[1:]))
        s = np.take(np.repeat(qw.scale, block, axis=1), np.arange(r), axis=1).reshape(shape)
    else:
        s = np.take(np.repeat(qw.scale, block, axis=reduce_axis), np.arange(shape[reduce_axis]), axis=reduce_axis)
    q = qw.q.reshape(shape)
    np.testing.assert_array_equal(qw.dequant, q.astype(np.float32) * s)
    np.testing.assert_array_equal(q, np.clip(np.rint(w.astype(np.float64) / s), qmin, qmax))   # nearest
    again = quantize_weight(w, spec, out_axis, reduce_axis)
    assert again.dequant.tobytes() == qw.dequant.tobytes()
