"""The device runner: series fusion, the weight-only interpreter ops, and loss equal to ONNX Runtime's (CPU here;
the CUDA path runs the Triton kernels and is skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llc_onnx import ort_eval
from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph, lookup
from llc_onnx.plugins import runner, series
from llc_onnx.plugins.interpreter_ops import register_interpreter_ops

from _plugins_util import MS, packed, random_terms


def _classifier(rng, share_concat=False):
    """x[b, 64] -> INT4 MatMulNBits -> Relu -> series (2 × INT2, Concat-tiled, bias) -> logits[b, 10]."""
    K, H, C = 64, 48, 10
    B1, S1 = packed(random_terms(rng, K, H, 4, 32), 4, 32)
    B2, S2 = packed(random_terms(rng, H, C, 2, 16, terms=2), 2, 16)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(B1, "B1"), (S1, "S1"), (B2, "B2"), (S2, "S2"), (rng.standard_normal(C).astype(np.float32), "bias")]]
    nodes = [helper.make_node("MatMulNBits", ["x", "B1", "S1"], ["h"], domain=MS, name="mm1", K=K, N=H, bits=4,
                              block_size=32),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Concat", ["r", "r"], ["rr"], axis=-1, name="cat"),
             helper.make_node("MatMulNBits", ["rr", "B2", "S2", "", "", "bias"], ["y"], domain=MS, name="mm2",
                              K=2 * H, N=C, bits=2, block_size=16)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", C])]
    if share_concat:  # a second consumer keeps the Concat alive
        nodes.append(helper.make_node("ReduceSum", ["rr"], ["tot"], name="tot", keepdims=0))
        outputs.append(helper.make_tensor_value_info("tot", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])], outputs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def _data(rng, n=40, bs=16):
    x = rng.standard_normal((n, 64)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return Dataset([Batch({"x": x[i:i + bs]}, y[i:i + bs]) for i in range(0, n, bs)], "memory")


def test_series_pattern_is_fused_into_one_node_reading_the_untiled_input():
    model = _classifier(np.random.default_rng(0))
    assert series.find_series(model) == [series.SeriesMatch(node="mm2", concat="cat", input="r", terms=2, K=48)]
    fused = series.fuse_series(model)
    onnx.checker.check_model(fused)
    ops = [(n.op_type, n.domain) for n in fused.graph.node]
    assert ops == [("MatMulNBits", MS), ("Relu", ""), (series.SERIES_OP, series.SERIES_DOMAIN)]
    node = fused.graph.node[2]
    assert list(node.input) == ["r", "B2", "S2", "bias"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == \
        {"K": 48, "N": 10, "bits": 2, "block_size": 16, "terms": 2}
    kept = series.fuse_series(_classifier(np.random.default_rng(0), share_concat=True))
    assert "Concat" in [n.op_type for n in kept.graph.node]


def test_concat_that_is_not_a_tiling_is_not_a_series():
    model = _classifier(np.random.default_rng(0))
    model.graph.node[2].input[1] = "h"  # Concat(r, h): two different tensors
    assert series.find_series(model) == []


def test_runner_on_cpu_gives_onnx_runtimes_loss():
    rng = np.random.default_rng(1)
    model = _classifier(rng)
    data = _data(rng)
    loss = make_loss("ce", "y")
    ref = ort_eval.evaluate(model, data, loss)
    run = runner.run_model(model, data, loss, device="cpu")
    assert run.n == ref.n == 40
    assert abs(run.loss - ref.loss) <= 1e-6 * abs(ref.loss)
    assert run.metrics.keys() == ref.metrics.keys()
    assert run.nodes == {"MatMulNBits": 1, series.SERIES_OP: 1}
    assert run.kernels[series.SERIES_OP] == "torch reference"
    assert run.latency_ms > 0 and run.throughput > 0


def test_interpreter_ops_are_registered_only_where_missing():
    register_interpreter_ops()
    assert register_interpreter_ops() == []  # idempotent
    assert lookup("MatMulNBits", MS, 1) is not None and lookup(series.SERIES_OP, series.SERIES_DOMAIN, 1) is not None
    # gradients reach the activations through the weight-only nodes
    model = series.fuse_series(_classifier(np.random.default_rng(2)))
    g = TorchGraph(model)
    x = torch.randn(3, 64, requires_grad=True)
    out, _ = g.run({"x": x})
    out["y"].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(LLCError, match="device 'cuda': torch sees no CUDA device"):
        runner.run_model(_classifier(np.random.default_rng(3)), _data(np.random.default_rng(3)),
                         make_loss("ce", "y"), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; the Triton path runs on a GPU")
def test_runner_on_cuda_runs_the_triton_kernels():  # pragma: no cover - GPU only
    rng = np.random.default_rng(4)
    model, data, loss = _classifier(rng), _data(rng), make_loss("ce", "y")
    ref = ort_eval.evaluate(model, data, loss)
    run = runner.run_model(model, data, loss, device="cuda")
    assert run.kernels[series.SERIES_OP] == "triton"
    assert abs(run.loss - ref.loss) <= 2e-3 * abs(ref.loss)  # tf32 dot on fp32 activations
