"""The stacked layout of series terms: packing round-trips, and ORT's MatMulNBits reads the bytes as documented."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.errors import LLCError
from llc_onnx.ort_eval import EXACT, make_session
from llc_onnx.series import StackedTerms, expand_weight, pack_nbits, stack_terms, unpack_nbits

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def stacked(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    n, terms = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    block = draw(st.sampled_from([1, 3, 8, 9, 16, 32]))
    k = draw(st.integers(1, 3 * block))
    nb = -(-k // block)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = np.zeros((n, terms, nb * block), np.int8)
    codes[:, :, :k] = rng.integers(lo, hi + 1, size=(n, terms, k))
    scales = rng.uniform(-1, 1, size=(n, terms, nb)).astype(np.float32)
    return StackedTerms(codes=codes, scales=scales, bits=bits, block=block, k=k)


@SETTINGS
@given(stacked())
def test_pack_unpack_round_trip(st_):
    b, s = pack_nbits(st_)
    blob = -(-st_.block * st_.bits // 8)
    assert b.dtype == np.uint8 and b.shape == (st_.n, st_.terms * st_.nb, blob)
    assert s.shape == (st_.n * st_.terms * st_.nb,)
    back = unpack_nbits(b, s, k=st_.k, n=st_.n, bits=st_.bits, block=st_.block, terms=st_.terms)
    assert np.array_equal(back.codes, st_.codes) and np.array_equal(back.scales, st_.scales)
    assert back.k == st_.k and back.block == st_.block


def test_low_bits_first_and_offset_codes():
    codes = np.array([[[-8, 7, 0, -1]]], np.int8)  # N=1, T=1, K=4, block 4
    b, _ = pack_nbits(StackedTerms(codes, np.ones((1, 1, 1), np.float32), bits=4, block=4, k=4))
    # u = q + 8 = [0, 15, 8, 7]; byte j holds u[2j] in its low nibble
    assert b.tolist() == [[[0 | 15 << 4, 8 | 7 << 4]]]
    b2, _ = pack_nbits(StackedTerms(np.array([[[-2, -1, 0, 1]]], np.int8), np.ones((1, 1, 1), np.float32),
                                    bits=2, block=4, k=4))
    assert b2.tolist() == [[[0 | 1 << 2 | 2 << 4 | 3 << 6]]]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.sampled_from([((40, 6), 1, 0), ((6, 70), 0, 1), ((5, 3, 3, 3), 0, 1), ((20, 4), 1, 0)]),
       st.sampled_from([2, 4, 8]), st.sampled_from(["default", None, 16]), st.integers(1, 3), st.integers(0, 99))
def test_stacked_terms_hold_every_term(layout, bits, block, terms, seed):
    shape, oa, ra = layout
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    sw = expand_weight(w, bits=bits, terms=terms, out_axis=oa, reduce_axis=ra, block_size=block)
    s = stack_terms(sw)
    assert (s.n, s.terms, s.k) == (sw.n, terms, sw.k)
    assert s.k_pad % s.block == 0 and s.k_pad - s.k < s.block
    assert not s.codes[:, :, s.k:].any()
    dq = s.dequant()
    for t, term in enumerate(sw.terms):
        view = term.dequant if sw.view_out_axis == 0 else term.dequant.T
        assert np.array_equal(dq[:, t], view)
    assert s.nbytes == sw.nbytes()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,block", [(64, 32), (40, 16), (96, 32)])
def test_matmulnbits_runs_the_packed_terms(bits, k, block):
    """ORT's com.microsoft::MatMulNBits with K' = T·K_pad, the packed bytes, no zero points and the input tiled
    (and zero-padded) T times computes Σ_t X·(s_t·Q_t)ᵀ: the documented layout is ORT's."""
    rng = np.random.default_rng(bits * k)
    n, terms = 10, 3
    w = rng.normal(size=(k, n)).astype(np.float32)
    sw = expand_weight(w, bits=bits, terms=terms, out_axis=1, reduce_axis=0, block_size=block)
    s = stack_terms(sw)
    b, scales = pack_nbits(s)
    node = oh.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=terms * s.k_pad,
                        N=n, bits=bits, block_size=s.block, accuracy_level=0)
    g = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", TP.FLOAT, [3, terms * s.k_pad])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [3, n])],
                      [nh.from_array(b, "B"), nh.from_array(scales, "scales")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)], ir_version=10)
    onnx.checker.check_model(m)
    x = rng.normal(size=(3, k)).astype(np.float32)
    xt = np.tile(np.pad(x, ((0, 0), (0, s.k_pad - k))), (1, terms))
    y = make_session(m, EXACT).run(None, {"x": xt})[0]
    want = sum(x.astype(np.float64) @ term.dequant.astype(np.float64) for term in sw.terms)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_unpack_checks_the_shape():
    with pytest.raises(LLCError, match="B has shape"):
        unpack_nbits(np.zeros((2, 3, 16), np.uint8), np.ones(6, np.float32), k=32, n=2, bits=4, block=32, terms=2)
