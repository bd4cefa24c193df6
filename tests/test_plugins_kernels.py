"""The Triton kernels and the torch custom ops against first principles and ONNX Runtime on the same bytes.

The kernels run in a subprocess (``python -m llc_onnx.plugins.triton.selfcheck``): on CUDA when torch sees a
GPU, else in Triton's interpreter (TRITON_INTERPRET=1, a process-wide mode). This process builds the cases,
the numpy references and the ONNX Runtime sessions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llc_onnx.errors import LLCError
from llc_onnx.plugins.triton import dispatch, reference

from _plugins_util import first_principles, nbits_model, packed, random_terms, run_ort

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -c constraints.txt "
                                                         "triton; it is in the 'test' extra)")

# (bits, block, K, N, M, terms, dtype, per_channel, scales in the activation dtype): K not a multiple of the
# block, N not of the tile, bs 16, 2-bit / 8-bit, 2- and 3-term series, per-channel scales, every activation
# dtype, fp32 and fp16/bf16 scales (ORT stores an fp16 model's scales in fp16)
CASES = [
    (4, 32, 200, 48, 1, 1, "float16", False, True),
    (2, 32, 200, 40, 3, 1, "float16", False, False),
    (8, 128, 300, 33, 2, 1, "float32", False, False),
    (8, 64, 256, 48, 3, 1, "bfloat16", True, True),
    (4, 128, 256, 40, 2, 2, "float16", False, True),
    (2, 16, 64, 24, 2, 3, "float32", True, False),
    (4, 16, 96, 40, 5, 1, "bfloat16", False, False),
    (2, 64, 128, 64, 1, 2, "bfloat16", False, True),
]
TOL = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 2e-5}  # max error / max |y| (output rounding, fp16 weights)
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _build_cases():
    from llc_onnx.plugins.layout import per_channel_scales
    from llc_onnx.plugins.triton.configs import GEMM_LARGE_M_CONFIGS, GEMM_SMALL_M_CONFIGS, GEMV_CONFIGS, candidates

    gemm = GEMM_SMALL_M_CONFIGS + GEMM_LARGE_M_CONFIGS
    rng = np.random.default_rng(0)
    cases = []
    for i, (bits, bs, K, N, M, T, dtype, pc, low_scales) in enumerate(CASES):
        terms = random_terms(rng, K, N, bits, bs, terms=T, per_channel=pc)
        if low_scales:  # scales representable in the activation dtype, so the reference stays exact
            terms = [(q, torch.from_numpy(s).to(DT[dtype]).float().numpy()) for q, s in terms]
        B, S = packed(terms, bits, bs)
        if pc:
            S = per_channel_scales(S, N, -(-K // bs), T)
        x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)).to(DT[dtype]).float().numpy()
        configs = sorted({candidates(M)[0].label, GEMV_CONFIGS[i % len(GEMV_CONFIGS)].label, gemm[i % len(gemm)].label})
        meta = dict(K=K, N=N, bits=bits, block_size=bs, terms=T, dtype=dtype, configs=configs,
                    scale_dtype=dtype if low_scales else "float32")
        cases.append(dict(meta=meta, x=x, B=B, S=S, terms=terms,
                          ref=x.astype(np.float64) @ first_principles(terms, K, bs)))
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    cases = _build_cases()
    d = tmp_path_factory.mktemp("triton")
    arrays = {}
    for i, c in enumerate(cases):
        arrays.update({f"{i}.x": c["x"], f"{i}.b": c["B"], f"{i}.s": c["S"], f"{i}.meta": np.array(json.dumps(c["meta"]))})
    np.savez(d / "cases.npz", **arrays)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", LLC_ONNX_AUTOTUNE="0")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-m", "llc_onnx.plugins.triton.selfcheck", str(d / "cases.npz"),
                        str(d / "out.npz"), "--device", device], env=env, capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(d / "out.npz")
    return cases, {k: out[k] for k in out.files}


@needs_triton
def test_every_kernel_configuration_computes_the_first_principles_product(interpreted):
    cases, out = interpreted
    worst = {}
    for i, c in enumerate(cases):
        for label in c["meta"]["configs"]:
            y = out[f"{i}.{label}"]
            assert y.shape == c["ref"].shape
            err = np.abs(y - c["ref"]).max() / np.abs(c["ref"]).max()
            worst[(i, label)] = err
            assert err <= TOL[c["meta"]["dtype"]], f"case {CASES[i]} config {label}: relative error {err:.2e}"
    # the check has teeth: a zero point off by one code is far outside the tolerance
    c = cases[0]
    wrong = c["x"].astype(np.float64) @ first_principles([(q + 1, s) for q, s in c["terms"]], 200, 32)
    assert np.abs(wrong - c["ref"]).max() / np.abs(c["ref"]).max() > 10 * TOL["float16"]


@needs_triton
def test_every_configuration_and_both_kernels_are_exercised(interpreted):
    from llc_onnx.plugins.triton.configs import ALL_CONFIGS

    cases, out = interpreted
    ran = {k.split(".", 1)[1] for k in out}
    assert ran == {c.label for c in ALL_CONFIGS}


@needs_triton
def test_the_kernels_read_the_bytes_ort_reads(interpreted):
    """Same B / scales feed ORT's MatMulNBits (series: input tiled by a Concat) and the kernels."""
    cases, out = interpreted
    for i, c in enumerate(cases):
        m = c["meta"]
        if m["terms"] == 1 and c["S"].size != m["N"]:
            model = nbits_model(c["B"], c["S"], K=m["K"], N=m["N"], bits=m["bits"], bs=m["block_size"])
        elif c["S"].size != m["N"] * m["terms"]:
            model = nbits_model(c["B"], c["S"], K=m["K"], N=m["N"], bits=m["bits"], bs=m["block_size"],
                                terms=m["terms"])
        else:
            continue  # per-channel scales are our collapsed form, not an ORT input
        y_ort = run_ort(model, {"x": c["x"]})["y"]
        for label in m["configs"]:
            err = np.abs(out[f"{i}.{label}"] - y_ort).max() / np.abs(y_ort).max()
            assert err <= TOL[m["dtype"]], f"case {CASES[i]} config {label} vs ORT: {err:.2e}"


# -- the torch reference and the custom ops (no triton needed) ----------------------------------------------
def _op_case(bits=4, bs=32, K=96, N=40, T=1, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    terms = random_terms(rng, K, N, bits, bs, terms=T)
    B, S = packed(terms, bits, bs)
    x = rng.standard_normal((2, 3, K)).astype(dtype)
    return terms, torch.from_numpy(B), torch.from_numpy(S), torch.from_numpy(x)


@pytest.mark.parametrize("bits,bs,K", [(2, 16, 64), (4, 32, 100), (8, 128, 200)])
def test_custom_op_on_cpu_is_the_reference(bits, bs, K):
    terms, B, S, x = _op_case(bits, bs, K)
    bias = torch.linspace(-1, 1, 40, dtype=torch.float64)
    y = torch.ops.llc_onnx.matmul_nbits(x, B, S, K, 40, bits, bs, bias)
    ref = x.numpy() @ first_principles(terms, K, bs) + bias.numpy()
    assert y.shape == (2, 3, 40) and y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6, atol=1e-9)
    y32 = torch.ops.llc_onnx.matmul_nbits(x.float(), B, S, K, 40, bits, bs)
    assert y32.dtype == torch.float32


def test_series_op_uses_the_untiled_input():
    terms, B, S, x = _op_case(2, 32, 64, 24, T=3)
    y = torch.ops.llc_onnx.series_matmul(x, B, S, 64, 24, 2, 32, 3)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ first_principles(terms, 64, 32), rtol=1e-6, atol=1e-9)


def test_gradients_flow_to_the_input_and_bias():
    terms, B, S, x = _op_case(4, 32, 64, 8)
    x = x[:1, :2].clone().requires_grad_(True)
    bias = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.llc_onnx.matmul_nbits(a, B, S, 64, 8, 4, 32, b),
                                    (x, bias))
    _, B3, S3, _ = _op_case(2, 32, 64, 8, T=2, seed=4)
    assert torch.autograd.gradcheck(lambda a: torch.ops.llc_onnx.series_matmul(a, B3, S3, 64, 8, 2, 32, 2), (x,))


def test_fake_tensors_give_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, B, S, x = _op_case()
    with FakeTensorMode() as mode:
        y = torch.ops.llc_onnx.matmul_nbits(mode.from_tensor(x), mode.from_tensor(B), mode.from_tensor(S),
                                            96, 40, 4, 32)
    assert tuple(y.shape) == (2, 3, 40)


def test_dispatch_with_zero_points_matches_ort():
    rng = np.random.default_rng(7)
    K, N, bs = 64, 16, 32
    u = rng.integers(0, 16, (K, N))
    s = rng.uniform(0.01, 0.02, (2, N)).astype(np.float32)
    from llc_onnx.plugins.layout import pack

    B, S = pack(u - 8, s, bits=4, block_size=bs)
    zp = rng.integers(0, 256, N).astype(np.uint8)  # one byte per row holds both blocks' zero points
    x = rng.standard_normal((3, K)).astype(np.float32)
    y_ort = run_ort(nbits_model(B, S, K=K, N=N, bits=4, bs=bs, zero_points=zp), {"x": x})["y"]
    y = dispatch.matmul_nbits(torch.from_numpy(x), torch.from_numpy(B), torch.from_numpy(S), K=K, N=N, bits=4,
                              block_size=bs, zero_points=torch.from_numpy(zp))
    np.testing.assert_allclose(y.numpy(), y_ort, rtol=1e-5, atol=1e-5)
    with pytest.raises(LLCError, match="g_idx"):
        dispatch.matmul_nbits(torch.from_numpy(x), torch.from_numpy(B), torch.from_numpy(S), K=K, N=N, bits=4,
                              block_size=bs, g_idx=torch.zeros(K, dtype=torch.int32))


def test_reference_rejects_inconsistent_shapes():
    _, B, S, x = _op_case()
    with pytest.raises(LLCError, match="block_size=24"):
        reference.matmul_nbits(x, B, S, K=96, N=40, bits=4, block_size=24)
    with pytest.raises(LLCError, match="fewer than K"):
        reference.matmul_nbits(x, B, S, K=960, N=40, bits=4, block_size=32)
