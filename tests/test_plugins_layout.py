"""MatMulNBits bytes: our packing against ONNX Runtime itself and against the codes it came from."""

from __future__ import annotations

import numpy as np
import pytest

from llc_onnx.errors import LLCError
from llc_onnx.plugins import layout

from _plugins_util import first_principles, nbits_model, packed, random_terms, run_ort


@pytest.mark.parametrize("bits,bs,K", [(2, 16, 64), (2, 32, 100), (4, 32, 80), (4, 128, 200), (8, 16, 48),
                                       (8, 64, 130)])
def test_ort_computes_what_the_codes_say(bits, bs, K):
    rng = np.random.default_rng(bits * 1000 + K)
    N = 24
    terms = random_terms(rng, K, N, bits, bs)
    B, S = packed(terms, bits, bs)
    assert B.shape == (N, -(-K // bs), bs * bits // 8) and B.dtype == np.uint8
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((5, K)).astype(np.float32)
    y = run_ort(nbits_model(B, S, K=K, N=N, bits=bits, bs=bs, bias=bias), {"x": x})["y"]
    w = first_principles(terms, K, bs)
    ref = x.astype(np.float64) @ w + bias
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    # and our unpacking reads back exactly the codes and weights
    np.testing.assert_array_equal(layout.unpack_codes(B, K, bits).astype(np.int64) - (1 << (bits - 1)), terms[0][0].T)
    np.testing.assert_allclose(layout.dequantize(B, S, K=K, N=N, bits=bits, block_size=bs), w, rtol=1e-6)


def test_series_stacked_along_k_is_what_ort_multiplies_with_the_tiled_input():
    rng = np.random.default_rng(1)
    K, N, bits, bs, T = 96, 40, 2, 32, 3
    terms = random_terms(rng, K, N, bits, bs, terms=T)
    B, S = layout.stack_series(terms, bits=bits, block_size=bs)
    assert B.shape == (N, T * K // bs, bs * bits // 8) and S.shape == (N * T * K // bs,)
    x = rng.standard_normal((3, K)).astype(np.float32)
    y = run_ort(nbits_model(B, S, K=K, N=N, bits=bits, bs=bs, terms=T), {"x": x})["y"]
    ref = x.astype(np.float64) @ first_principles(terms, K, bs)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_zero_points_as_ort_reads_them(kind):
    rng = np.random.default_rng(2)
    K, N, bits, bs = 96, 8, 4, 32
    nblk = K // bs
    u = rng.integers(0, 16, size=(K, N))
    zp = rng.integers(0, 16, size=(N, nblk))
    s = rng.uniform(0.01, 0.02, size=(nblk, N)).astype(np.float32)
    B, S = layout.pack(u - 8, s, bits=bits, block_size=bs)       # bytes hold u
    if kind == "uint8":
        row = -(-nblk // 2)
        zpp = np.zeros((N, row * 2), np.uint8)
        zpp[:, :nblk] = zp
        zarr = (zpp[:, 0::2] | (zpp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    else:
        zarr = zp.astype(np.float32).reshape(-1)
    x = rng.standard_normal((2, K)).astype(np.float32)
    y = run_ort(nbits_model(B, S, K=K, N=N, bits=bits, bs=bs, zero_points=zarr), {"x": x})["y"]
    w = (u - zp.T[np.arange(K) // bs]) * s[np.arange(K) // bs]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layout.dequantize(B, S, K=K, N=N, bits=bits, block_size=bs, zero_points=zarr), w,
                               rtol=1e-6, atol=1e-7)


def test_per_channel_scales_are_found_only_when_every_block_repeats_them():
    rng = np.random.default_rng(3)
    terms = random_terms(rng, 64, 8, 8, 16, per_channel=True)
    B, S = layout.pack(*terms[0], bits=8, block_size=16)
    np.testing.assert_array_equal(layout.per_channel_scales(S, 8, 4), terms[0][1])
    S2 = S.copy()
    S2[5] *= 2
    assert layout.per_channel_scales(S2, 8, 4) is None


def test_bad_layouts_are_one_line_errors():
    with pytest.raises(LLCError, match="bits=3"):
        layout.check_format(64, 8, 3, 32)
    with pytest.raises(LLCError, match="power of two"):
        layout.check_format(64, 8, 4, 24)
    with pytest.raises(LLCError, match="do not fit 2 signed bits"):
        layout.pack(np.full((32, 2), 2), np.ones((1, 2), np.float32), bits=2, block_size=32)
    with pytest.raises(LLCError, match="straddle"):
        layout.stack_series([(np.zeros((40, 2), int), np.ones((2, 2), np.float32))] * 2, bits=4, block_size=32)
