"""Data-free series compression of whole models: runs in ORT and the interpreter, a progressive family, basis models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import prepare_model
from llc_onnx.ort_eval import EXACT, make_session
from llc_onnx.series import data_free, expand_model, write_series
import _models


def _run(model, x):
    return make_session(model, EXACT).run(None, {"x": x})[0]


@pytest.mark.parametrize("form", ["standard", "custom"])
@pytest.mark.parametrize("builder", ["cnn", "mlp"])
def test_whole_model_in_ort_and_interpreter(builder, form):
    model, w = getattr(_models, builder)(seed=1)
    before = model.SerializeToString()
    shape = (16, 1, 6, 6) if builder == "cnn" else (16, 8)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ref = _run(model, x)
    errs = []
    for terms in (1, 2, 3):
        res = data_free(model, bits=4, terms=terms, form=form)
        assert set(res.series.weights) == ({"conv", "fc"} if builder == "cnn" else {"fc1", "fc2"})
        assert res.skipped == ()
        assert res.nbytes == res.series.nbytes() and res.nbytes < sum(a.nbytes for a in w.values())
        y = _run(res.model, x)
        y_int = TorchGraph(res.model).run({"x": x})[0]["logits"].numpy()
        np.testing.assert_allclose(y, y_int, rtol=0, atol=1e-4 * np.abs(y).max())
        errs.append(np.abs(y - ref).max())
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[2] < 1e-3 * np.abs(ref).max()
    assert model.SerializeToString() == before


def test_truncated_expansion_is_the_shorter_expansion():
    """One 3-term expansion written at order τ is, byte for byte, the τ-term data-free model."""
    model, _ = _models.mlp(seed=2)
    prepared = prepare_model(model)
    series = expand_model(prepared, bits=2, terms=3)
    for tau in (1, 2):
        a = write_series(prepared, series, order=tau)
        b = data_free(model, bits=2, terms=tau).model
        assert a.SerializeToString() == b.SerializeToString()
    again = data_free(model, bits=2, terms=3)
    assert again.model.SerializeToString() == data_free(model, bits=2, terms=3).model.SerializeToString()


@pytest.mark.parametrize("form", ["standard", "custom"])
def test_a_linear_model_is_the_sum_of_its_basis_models(form):
    """Basis model t holds term t of every node; for a model linear in its weights (one MatMul) the outputs add up."""
    rng = np.random.default_rng(3)
    wt = rng.normal(size=(48, 5)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"], name="fc")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 48])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                          [numpy_helper.from_array(wt, "W")])
    model = prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    series = expand_model(model, bits=4, terms=3)
    x = rng.normal(size=(4, 48)).astype(np.float32)
    full = _run(write_series(model, series, form=form), x)
    parts = [_run(write_series(model, series.basis(t), form=form), x) for t in range(3)]
    np.testing.assert_allclose(sum(p.astype(np.float64) for p in parts), full, atol=1e-5 * np.abs(full).max())
    neg = _run(write_series(model, -series, form=form), x)
    np.testing.assert_allclose(neg, -full, atol=1e-5 * np.abs(full).max())


def test_per_node_terms_and_errors():
    model, _ = _models.cnn(seed=4)
    prepared = prepare_model(model)
    s = expand_model(prepared, bits=4, terms={"conv": 3, "fc": 1})
    assert (s.weights["conv"].order, s.weights["fc"].order) == (3, 1)
    only = expand_model(prepared, bits=8, terms=2, nodes=["fc"])
    assert set(only.weights) == {"fc"} and only.weights["fc"].block_size is None
    out = write_series(prepared, only)
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 1
    with pytest.raises(LLCError, match="node 'nope'"):
        expand_model(prepared, nodes=["nope"])
    with pytest.raises(LLCError, match="node 'conv': series expansion: bits=3"):
        expand_model(prepared, bits=3)


def test_interpreter_runs_the_bare_custom_ops_like_ort_runs_the_functions():
    model, _ = _models.cnn(seed=5)
    x = np.random.default_rng(1).normal(size=(8, 1, 6, 6)).astype(np.float32)
    prepared = prepare_model(model)
    series = expand_model(prepared, bits=2, terms=3)
    with_fn = write_series(prepared, series, form="custom")
    bare = write_series(prepared, series, form="custom", function=False)
    assert {f.name for f in with_fn.functions} == {"SeriesConv", "SeriesMatMul"} and not bare.functions
    y = _run(with_fn, x)
    y_bare = TorchGraph(bare, dtype=torch.float64).run({"x": x})[0]["logits"].numpy()
    np.testing.assert_allclose(y, y_bare, rtol=0, atol=1e-5 * np.abs(y).max())
    onnx.checker.check_model(with_fn, full_check=True)
