"""Small MatMulNBits / series models and weights for the plugin tests (numpy first principles, ORT sessions)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.plugins import layout

MS = "com.microsoft"


def random_terms(rng, K, N, bits, bs, terms=1, per_channel=False):
    """``terms`` pairs (signed codes [K, N], scales [nblk, N] or [N])."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    nblk = -(-K // bs)
    out = []
    for _ in range(terms):
        q = rng.integers(lo, hi + 1, size=(K, N))
        s = (rng.uniform(0.5, 1.5, size=(N,) if per_channel else (nblk, N)) / (hi * np.sqrt(K))).astype(np.float32)
        out.append((q, s))
    return out


def first_principles(terms, K, bs):
    """``W = Σ_t q_t · s_t[k // bs]`` in float64, straight from the codes (no packing involved)."""
    w = 0.0
    for q, s in terms:
        s = np.asarray(s, np.float64)
        sk = s[None, :] if s.ndim == 1 else s[np.arange(K) // bs]
        w = w + q.astype(np.float64) * sk
    return w


def packed(terms, bits, bs):
    if len(terms) == 1:
        return layout.pack(*terms[0], bits=bits, block_size=bs)
    return layout.stack_series(terms, bits=bits, block_size=bs)


def nbits_model(B, S, *, K, N, bits, bs, terms=1, bias=None, M="m", zero_points=None) -> onnx.ModelProto:
    """x [M, K] -> (Concat ×terms) -> MatMulNBits -> y [M, N]: the ORT deployment form."""
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(S, "S")]
    nodes = []
    a = "x"
    if terms > 1:
        nodes.append(helper.make_node("Concat", ["x"] * terms, ["xt"], axis=-1, name="tile"))
        a = "xt"
    ins = [a, "B", "S", "", "", ""]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zp"))
        ins[3] = "zp"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        ins[5] = "bias"
    while ins and not ins[-1]:
        ins.pop()
    nodes.append(helper.make_node("MatMulNBits", ins, ["y"], domain=MS, name="mm", K=K * terms, N=N, bits=bits,
                                  block_size=bs, accuracy_level=0))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
