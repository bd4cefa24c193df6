"""The op registry: versioned lookup, duplicate registration, plugins through the entry-point group,
and the list of unsupported nodes that ``inspect`` shows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph, lookup, register_op, registry, supported_ops, unsupported_nodes


def _softmax_model(opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Softmax", ["x"], ["y"], axis=1)
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", opset)])


def test_versions_follow_the_models_opset():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    t = torch.from_numpy(x)
    old = TorchGraph(_softmax_model(11)).run({"x": x})[0]["y"]
    new = TorchGraph(_softmax_model(13)).run({"x": x})[0]["y"]
    # opset < 13 normalises over the flattened trailing dims, 13+ over axis 1 alone
    assert torch.allclose(old, torch.softmax(t.reshape(2, 12), 1).reshape(2, 3, 4), atol=1e-6)
    assert torch.allclose(new, torch.softmax(t, 1), atol=1e-6)
    assert lookup("Softmax", "", 12) is not lookup("Softmax", "ai.onnx", 13)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_op("Relu")(lambda ctx, xs: xs[0])


def test_unsupported_nodes_are_listed_with_their_domain():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("Frobnicate", ["a"], ["y"], name="odd", domain="example.ops")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("example.ops", 1)])
    assert unsupported_nodes(model) == [("odd", "Frobnicate", "example.ops")]
    with pytest.raises(LLCError, match="node 'odd' \\(op Frobnicate domain example.ops\\)"):
        TorchGraph(model)


def test_a_plugin_op_runs_once_registered():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    node = helper.make_node("TimesThree", ["x"], ["y"], domain="test.llc_plugin")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("test.llc_plugin", 1)])
    assert unsupported_nodes(model)
    register_op("TimesThree", domain="test.llc_plugin")(lambda ctx, xs: xs[0] * 3)
    try:
        out = TorchGraph(model).run({"x": np.array([1, 2, 3], np.float32)})[0]["y"]
        assert out.tolist() == [3.0, 6.0, 9.0]
        assert "TimesThree" in supported_ops()["test.llc_plugin"]
    finally:
        del registry._REGISTRY[("test.llc_plugin", "TimesThree")]


def test_entry_point_plugins_are_loaded(monkeypatch):
    from importlib import metadata

    loaded = []
    ep = metadata.EntryPoint(name="demo", value="builtins:print", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(ep.__class__, "load", lambda self: (lambda: loaded.append(self.name)))
    assert registry.load_plugins() == ["demo"] and loaded == ["demo"]
    assert registry.load_plugins() == []  # once


def test_a_broken_plugin_is_a_one_line_error(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="broken", value="no_such_module_xyz:register", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [ep])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(LLCError, match="interpreter plugin 'broken'"):
        registry.load_plugins()
