"""quant.gptq: GPTQ rounding against a slow textbook Optimal-Brain-Quantizer loop and against nearest rounding.

The textbook loop below is written from the paper's equations, not from the module: after rounding column j,
the remaining columns F move by −err·[H_F⁻¹]_{j,F} with err = (w_j − ŵ_j)/[H_F⁻¹]_jj, H_F⁻¹ recomputed by a
plain matrix inverse of the sub-Hessian at every step (no Cholesky, no lazy batches).
"""

import numpy as np
import pytest
import torch

from llc_onnx.calib.gram import ReductionView, input_rows
from llc_onnx.errors import LLCError
from llc_onnx.quant import WeightQuantSpec, qrange, quantize_weight
from llc_onnx.quant.gptq import gptq_matrix, quantize_weight_gptq


def _inputs(n, k, seed=0):
    """Correlated inputs with a few large-variance features (like transformer activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(n, k)) @ mix + 0.2 * rng.normal(size=(n, k))
    x[:, rng.choice(k, size=max(1, k // 10), replace=False)] *= 4.0
    return x


def _textbook(w, h, bits, block, damp, act_order):
    """GPTQ for W [N, K] (rows = outputs), min-max block scales taken when a block's first column comes up."""
    w = w.astype(np.float64).copy()
    n, k = w.shape
    qmin, qmax = qrange(bits)
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    order = list(np.argsort(-np.diag(h), kind="stable")) if act_order else list(range(k))
    group = (lambda c: c // block) if block else (lambda c: 0)
    scales, q = {}, np.zeros((n, k))
    remaining = list(order)
    for j in order:
        g = group(j)
        if g not in scales:
            cols = [c for c in range(k) if group(c) == g]
            amax = np.abs(w[:, cols]).max(axis=1)
            scales[g] = np.where(amax > 0, (amax / qmax).astype(np.float32), np.float32(1)).astype(np.float64)
        s = scales[g]
        q[:, j] = np.clip(np.rint(w[:, j] / s), qmin, qmax)
        hinv = np.linalg.inv(h[np.ix_(remaining, remaining)])
        jj = remaining.index(j)
        err = (w[:, j] - q[:, j] * s) / hinv[jj, jj]
        w[:, remaining] -= np.outer(err, hinv[jj])
        remaining.remove(j)
    return q.astype(np.int32), np.stack([scales[g] for g in sorted(scales)], axis=1).astype(np.float32)


def _out_err(x, w_kn, dq_kn):
    return float(np.linalg.norm(x @ w_kn.astype(np.float64) - x @ dq_kn.astype(np.float64)))


@pytest.mark.parametrize("bits,block,act_order,lazy", [(4, 32, False, 128), (4, 32, True, 16), (2, 32, False, 7),
                                                       (2, 16, True, 128), (8, None, False, 16), (3, 24, True, 5)])
def test_equal_codes_to_the_textbook_loop(bits, block, act_order, lazy):
    k, n_out = 72, 10                                   # 72 = 2·32 + 8: a partial last block
    x = _inputs(300, k, seed=bits)
    w = (np.random.default_rng(7).normal(size=(k, n_out)) * 0.05).astype(np.float32)   # MatMul [K, N]
    h = x.T @ x
    q_ref, s_ref = _textbook(w.T, h, bits, block, 0.01, act_order)
    qw = quantize_weight_gptq(w, h, WeightQuantSpec(bits, block), out_axis=1, reduce_axis=0,
                              act_order=act_order, lazy_block=lazy)
    np.testing.assert_array_equal(qw.q, q_ref.T)
    if block:
        np.testing.assert_array_equal(qw.scale, s_ref.T)      # blocked layout [ceil(K/bs), N]
    else:
        np.testing.assert_array_equal(qw.scale, s_ref[:, 0])  # per output channel


@pytest.mark.parametrize("method", ["minmax", "mse", "hqq"])
@pytest.mark.parametrize("bits,block", [(4, 32), (2, 32), (8, None)])
def test_layer_error_below_nearest_rounding_with_the_same_scales(method, bits, block):
    k, n_out = 96, 24
    x = _inputs(400, k, seed=1)
    w = (np.random.default_rng(2).normal(size=(n_out, k)) * 0.05).astype(np.float32)   # Gemm transB=1 [N, K]
    spec = WeightQuantSpec(bits, block, method)
    rtn = quantize_weight(w, spec, out_axis=0, reduce_axis=1)
    static = quantize_weight_gptq(w, x.T @ x, spec, out_axis=0, reduce_axis=1, static_groups=True)
    dynamic = quantize_weight_gptq(w, x.T @ x, spec, out_axis=0, reduce_axis=1)
    np.testing.assert_array_equal(static.scale, rtn.scale)          # static scales are quantize_weight's
    e_rtn, e_static, e_dyn = (_out_err(x, w.T, q.dequant.T) for q in (rtn, static, dynamic))
    assert e_static < 0.85 * e_rtn
    assert e_dyn < 0.95 * e_rtn          # 2-bit min-max: block scales taken after the feedback grow (0.92 here)
    for q in (static, dynamic):                                     # exactly the format of quantize_weight
        assert q.q.dtype == np.int32 and q.q.shape == w.shape
        assert q.scale.dtype == np.float32 and q.scale.shape == rtn.scale.shape
        assert (q.axis, q.block_size, q.bits, q.nbytes) == (rtn.axis, rtn.block_size, rtn.bits, rtn.nbytes)
        qmin, qmax = qrange(bits)
        assert q.q.min() >= qmin and q.q.max() <= qmax
        if block:
            s = np.repeat(q.scale, block, axis=1)[:, :k]
        else:
            s = q.scale[:, None]
        np.testing.assert_array_equal(q.dequant, q.q.astype(np.float32) * s)


def test_proxy_loss_is_the_dampened_quadratic_error():
    k, n_out = 40, 6
    x = _inputs(200, k, seed=3)
    w = np.random.default_rng(4).normal(size=(n_out, k)) * 0.1
    h = x.T @ x
    groups = np.arange(k) // 16
    res = gptq_matrix(w, h, groups, WeightQuantSpec(4, 16), act_order=True, lazy_block=8)
    s = np.repeat(res.scale.astype(np.float64), 16, axis=1)[:, :k]
    delta = w - res.q * s
    quad = 0.5 * np.einsum("ik,kl,il->", delta, h + res.damp * np.eye(k), delta)
    assert res.proxy_loss == pytest.approx(quad, rel=1e-9)
    assert res.damp == pytest.approx(0.01 * np.mean(np.diag(h)))


def test_codes_do_not_depend_on_the_scale_of_the_gram_matrix_and_runs_repeat():
    x = _inputs(100, 48, seed=5)
    w = (np.random.default_rng(6).normal(size=(48, 8)) * 0.05).astype(np.float32)
    spec = WeightQuantSpec(4, 32, "mse")
    a = quantize_weight_gptq(w, x.T @ x, spec, 1, 0, act_order=True)
    b = quantize_weight_gptq(w, 4.0 * (x.T @ x), spec, 1, 0, act_order=True)
    c = quantize_weight_gptq(w, x.T @ x, spec, 1, 0, act_order=True)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.scale, b.scale)
    assert a.q.tobytes() == c.q.tobytes() and a.dequant.tobytes() == c.dequant.tobytes()


def test_dead_input_keeps_its_weight():
    x = _inputs(100, 40, seed=8)
    x[:, 5] = 0.0                                         # an input that is always zero
    w = (np.random.default_rng(9).normal(size=(40, 4)) * 0.05).astype(np.float32)
    spec = WeightQuantSpec(4, None)
    qw = quantize_weight_gptq(w, x.T @ x, spec, 1, 0, static_groups=True)
    rtn = quantize_weight(w, spec, 1, 0)
    np.testing.assert_array_equal(qw.q[5], rtn.q[5])      # not zeroed (the reference code would zero it)
    assert np.all(qw.q[5] != 0)


def _conv(x, w, group):
    return torch.nn.functional.conv2d(torch.as_tensor(x), torch.as_tensor(w, dtype=torch.float64), padding=1,
                                      groups=group).numpy()


@pytest.mark.parametrize("group,bits,block", [(1, 4, 4), (2, 4, 4), (1, 8, None), (2, 3, 2)])
def test_conv_weight_with_the_unfold_gram(group, bits, block):
    rng = np.random.default_rng(10)
    c_in, c_out = 8, 6
    x = rng.normal(size=(6, c_in, 9, 9))                           # spatially smooth, like image features
    x = torch.nn.functional.avg_pool2d(torch.as_tensor(x), 3, stride=1).numpy() * 3
    w = (rng.normal(size=(c_out, c_in // group, 3, 3)) * 0.1).astype(np.float32)
    view = ReductionView("Conv", k=c_in // group * 9, kernel=(3, 3), strides=(1, 1), dilations=(1, 1),
                         pads=(1, 1, 1, 1), group=group)
    rows = input_rows(torch.as_tensor(x), view).numpy()            # [R, g, K]
    gram = np.einsum("rgk,rgl->gkl", rows, rows)
    gram = gram[0] if group == 1 else gram
    spec = WeightQuantSpec(bits, block)                            # e.g. blocks of 4 input channels
    rtn = quantize_weight(w, spec, out_axis=0, reduce_axis=1)
    gq = quantize_weight_gptq(w, gram, spec, out_axis=0, reduce_axis=1)
    gs = quantize_weight_gptq(w, gram, spec, out_axis=0, reduce_axis=1, static_groups=True)
    assert gq.scale.shape == rtn.scale.shape and gq.axis == rtn.axis and gq.nbytes == rtn.nbytes
    np.testing.assert_array_equal(gs.scale, rtn.scale)
    y = _conv(x, w, group)
    e_rtn = np.linalg.norm(y - _conv(x, rtn.dequant, group))
    assert np.linalg.norm(y - _conv(x, gq.dequant, group)) < 0.9 * e_rtn
    assert np.linalg.norm(y - _conv(x, gs.dequant, group)) < 0.9 * e_rtn


@pytest.mark.parametrize("group,c_in,block,act_order,static", [
    (8, 8, 32, True, False),     # depthwise, channel multiplier 2: one scale group per part, parts batched
    (2, 8, 4, False, False),     # blocked, no reordering: the groups come up at the same steps, batched
    (2, 8, 4, False, True),      # blocked, fixed scales, batched
    (2, 8, 4, True, True),       # blocked, fixed scales, act_order: one part at a time
    (2, 8, 4, True, False),      # blocked with act_order: each part reorders its own way, one part at a time
])
def test_grouped_conv_parts_equal_one_matrix_each(group, c_in, block, act_order, static):
    """A grouped Conv's parts (batched where their scales come up at the same steps) give what GPTQ gives
    each part alone as a matrix."""
    rng = np.random.default_rng(11)
    c_out = 2 * group
    x = torch.nn.functional.avg_pool2d(torch.as_tensor(rng.normal(size=(6, c_in, 9, 9))), 3, stride=1) * 3
    w = (rng.normal(size=(c_out, c_in // group, 3, 3)) * 0.1).astype(np.float32)
    view = ReductionView("Conv", k=c_in // group * 9, kernel=(3, 3), strides=(1, 1), dilations=(1, 1),
                         pads=(1, 1, 1, 1), group=group)
    rows = input_rows(x, view).numpy()
    gram = np.einsum("rgk,rgl->gkl", rows, rows)
    spec = WeightQuantSpec(4, block)
    got = quantize_weight_gptq(w, gram, spec, out_axis=0, reduce_axis=1, act_order=act_order,
                               static_groups=static)
    k = c_in // group * 9
    mat = w.reshape(c_out, k).astype(np.float64)
    cols = np.arange(k) // block
    part = c_out // group
    for p in range(group):
        one = gptq_matrix(mat[p * part:(p + 1) * part], gram[p], cols, spec, act_order=act_order,
                          static_groups=static)
        np.testing.assert_array_equal(got.q.reshape(c_out, k)[p * part:(p + 1) * part], one.q)


def test_bad_inputs_are_one_line_errors():
    w = np.ones((8, 4), dtype=np.float32)
    with pytest.raises(LLCError, match=r"Gram matrix of shape \(4, 4\).*expected \[8, 8\]"):
        quantize_weight_gptq(w, np.eye(4), WeightQuantSpec(4, 32), 1, 0)
    with pytest.raises(LLCError, match="rounding='llc'"):
        quantize_weight_gptq(w, np.eye(8), WeightQuantSpec(4, 32, rounding="llc"), 1, 0)
    bad = np.eye(8)
    bad[0, 0] = np.nan
    with pytest.raises(LLCError, match="NaN"):
        quantize_weight_gptq(w, bad, WeightQuantSpec(4, 32), 1, 0)
    with pytest.raises(LLCError, match="scale_method"):
        quantize_weight_gptq(w, np.eye(8), WeightQuantSpec(4, 32, "nope"), 1, 0)
    ok = quantize_weight_gptq(w, np.eye(8), WeightQuantSpec(4, 32, rounding="gptq"), 1, 0)
    assert np.array_equal(ok.dequant, w)                          # ones are exactly on the grid


@pytest.mark.parametrize("act_order,static,method,block", [(True, False, "mse", 32), (False, True, "minmax", 32),
                                                           (True, False, "hqq", None), (False, False, "mse", 16)])
def test_row_chunks_give_the_same_codes(monkeypatch, act_order, static, method, block):
    """Rows are rounded in chunks (a large weight then needs chunk-sized working copies): each row's GPTQ reads
    only H, so codes, scales and the proxy loss do not depend on the chunk size (here 3 rows and a partial last
    chunk vs all 40 rows at once)."""
    from llc_onnx.quant import gptq as G

    k, n_out = 72, 40
    x = _inputs(300, k, seed=3)
    w = np.random.default_rng(5).normal(size=(n_out, k)) * 0.05
    h = x.T @ x
    groups = (np.arange(k) // block) if block else np.zeros(k, dtype=np.int64)
    spec = WeightQuantSpec(4, block, method)
    whole = G.gptq_matrix(w, h, groups, spec, act_order=act_order, static_groups=static)
    monkeypatch.setattr(G, "GPTQ_CHUNK_ELEMENTS", 3 * k)
    chunked = G.gptq_matrix(w, h, groups, spec, act_order=act_order, static_groups=static)
    np.testing.assert_array_equal(whole.q, chunked.q)
    np.testing.assert_array_equal(whole.scale, chunked.scale)
    assert whole.proxy_loss == pytest.approx(chunked.proxy_loss, rel=1e-12)
