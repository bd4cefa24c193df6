"""Shared helpers for the interpreter op tests: one-node models built with onnx.helper at a stated opset,
run in ONNX Runtime and in TorchGraph, and gradients through the interpreter against finite differences."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.interpreter import TorchGraph


class Init:
    """An input given as an initializer (constant) instead of a graph input."""

    def __init__(self, arr):
        self.arr = np.asarray(arr)


def one_node_model(op, inputs, attrs=None, n_out=1, opset=21, domain="", out_types=None):
    """One node; float and integer arrays become graph inputs, Init(...) initializers, None empty inputs."""
    names, ginputs, inits, feeds = [], [], [], {}
    for i, a in enumerate(inputs):
        if a is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(a, Init):
            inits.append(numpy_helper.from_array(a.arr, name))
        else:
            ginputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
            feeds[name] = a
    outs = [f"out{i}" for i in range(n_out)]
    out_types = out_types or [TensorProto.FLOAT] * n_out
    node = helper.make_node(op, names, outs, domain=domain, **(attrs or {}))
    graph = helper.make_graph([node], "g", ginputs,
                              [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)],
                              initializer=inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=11 if opset > 22 else 10), feeds


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(out, ref, rtol=1e-5, atol=1e-5):
    out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    ref = np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if ref.dtype.kind in "biu" or str(ref.dtype).startswith(("int", "uint")):
        np.testing.assert_array_equal(out.astype(np.int64), ref.astype(np.int64))
        return
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol * max(scale, 1e-6))


def check_against_ort(model, feeds, rtol=1e-5, atol=1e-5, outputs=None):
    """Every output (or those at indices ``outputs``) of TorchGraph equals ORT's; returns the ORT outputs."""
    g = TorchGraph(model)
    refs = ort_run(model, feeds)
    outs, _ = g.run(feeds)
    assert list(outs) == g.output_names
    for i, (name, ref) in enumerate(zip(g.output_names, refs)):
        if outputs is None or i in outputs:
            assert_close(outs[name], ref, rtol, atol)
    return refs


def check_gradient(model, feeds, wrt, output=0, seed=0, eps=1e-6, rtol=1e-4):
    """The interpreter's autograd derivative of Σ r·y (r random) along a random direction of the inputs
    ``wrt`` equals the central finite difference of the same float64 graph, and is not zero: gradients flow."""
    g = TorchGraph(model, dtype=torch.float64)
    rng = np.random.default_rng(seed)
    base = {k: torch.tensor(np.asarray(v, dtype=np.float64) if k in wrt else v) for k, v in feeds.items()}
    dirs = {k: torch.tensor(rng.standard_normal(np.shape(feeds[k]))) for k in wrt}
    name = g.output_names[output]
    y0, _ = g.run({k: v for k, v in base.items()})
    r = torch.tensor(rng.standard_normal(tuple(y0[name].shape)))
    leaves = {k: base[k].clone().requires_grad_(True) for k in wrt}
    y, _ = g.run({**base, **leaves})
    (y[name] * r).sum().backward()
    analytic = sum(float((leaves[k].grad * dirs[k]).sum()) for k in wrt)

    def f(t):
        out, _ = g.run({**base, **{k: base[k] + t * dirs[k] for k in wrt}})
        return float((out[name] * r).sum())

    numeric = (f(eps) - f(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-8, "no gradient flows"
    assert abs(analytic - numeric) <= rtol * max(abs(numeric), 1e-3), (analytic, numeric)
