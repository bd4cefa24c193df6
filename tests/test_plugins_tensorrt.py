"""TensorRT: the ONNX conversion to plugin nodes (structure, bytes, native INT4 checked in ORT), and the clear
error where TensorRT is absent. Building and running an engine needs TensorRT and a GPU: those tests skip."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.errors import LLCError
from llc_onnx.plugins.tensorrt import PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, to_tensorrt

from _plugins_util import MS, nbits_model, packed, random_terms, run_ort

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _mixed_model(rng):
    """x -> INT4 MatMulNBits -> Relu -> INT2 (bias) -> Concat×2 -> INT8 series; plus an INT8 per-channel head."""
    K, H, C = 64, 48, 16
    t4 = random_terms(rng, K, H, 4, 32)
    t2 = random_terms(rng, H, H, 2, 16)
    ts = random_terms(rng, H, C, 8, 16, terms=2)
    t8 = random_terms(rng, H, C, 8, 16, per_channel=True)
    B4, S4 = packed(t4, 4, 32)
    B2, S2 = packed(t2, 2, 16)
    Bs, Ss = packed(ts, 8, 16)
    B8, S8 = packed(t8, 8, 16)
    inits = [numpy_helper.from_array(a, n) for a, n in [(B4, "B4"), (S4, "S4"), (B2, "B2"), (S2, "S2"), (Bs, "Bs"),
                                                         (Ss, "Ss"), (B8, "B8"), (S8, "S8"),
                                                         (rng.standard_normal(H).astype(np.float32), "bias2")]]
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B4", "S4"], ["h4"], domain=MS, name="int4", K=K, N=H, bits=4, block_size=32),
        helper.make_node("Relu", ["h4"], ["r4"], name="relu"),
        helper.make_node("MatMulNBits", ["r4", "B2", "S2", "", "", "bias2"], ["h2"], domain=MS, name="int2", K=H, N=H,
                         bits=2, block_size=16),
        helper.make_node("Concat", ["h2", "h2"], ["h2x2"], axis=-1, name="tile"),
        helper.make_node("MatMulNBits", ["h2x2", "Bs", "Ss"], ["ys"], domain=MS, name="series", K=2 * H, N=C, bits=8,
                         block_size=16),
        helper.make_node("MatMulNBits", ["h2", "B8", "S8"], ["y8"], domain=MS, name="int8", K=H, N=C, bits=8,
                         block_size=16),
        helper.make_node("Add", ["ys", "y8"], ["y"], name="sum"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", C])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m, dict(B2=B2, S2=S2, Bs=Bs, B8=B8, t8=t8)


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_plugin_nodes_carry_what_tensorrts_parser_looks_up():
    model, arrays = _mixed_model(np.random.default_rng(0))
    before = model.SerializeToString()
    conv = to_tensorrt(model)
    assert model.SerializeToString() == before  # the input model is not modified
    out = conv.model
    onnx.checker.check_model(out, full_check=True)
    assert conv.plugins == {"matmul_int2": 1, "series_matmul": 1, "matmul_int8": 1} and conv.native_int4 == 1
    assert {o.domain: o.version for o in out.opset_import} == {"": 21, PLUGIN_DOMAIN: 1}
    by_name = {n.name: n for n in out.graph.node}
    assert "tile" not in by_name  # the series reads the untiled input
    for name, op in [("int2", "matmul_int2"), ("series", "series_matmul"), ("int8", "matmul_int8")]:
        n = by_name[name]
        a = _attrs(n)
        assert (n.op_type, n.domain) == (op, PLUGIN_DOMAIN)
        assert a["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and a["plugin_version"] == PLUGIN_VERSION.encode()
        assert a["aot"] == 1
    assert {k: _attrs(by_name["int2"])[k] for k in ("K", "N", "block_size")} == {"K": 48, "N": 48, "block_size": 16}
    assert {k: _attrs(by_name["series"])[k] for k in ("K", "N", "bits", "block_size", "terms")} == \
        {"K": 48, "N": 16, "bits": 8, "block_size": 16, "terms": 2}
    assert by_name["series"].input[0] == "h2"
    # the int2 bias became an Add after the plugin
    add = by_name["int2.bias"]
    assert add.op_type == "Add" and add.input[0] == by_name["int2"].output[0] and add.output[0] == "h2"
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    # words are the very same bytes, read as little-endian int32
    w2 = inits[by_name["int2"].input[1]]
    assert w2.dtype == np.int32 and w2.shape == (48, 48 * 2 // 32)
    assert w2.tobytes() == arrays["B2"].tobytes()
    assert inits[by_name["series"].input[1]].tobytes() == arrays["Bs"].tobytes()
    # per-channel INT8 scales collapse to one per output channel; blocked ones stay
    np.testing.assert_array_equal(inits[by_name["int8"].input[2]], arrays["t8"][0][1])
    np.testing.assert_array_equal(inits[by_name["int2"].input[2]], arrays["S2"])
    assert not any(i.name in ("B2", "Bs", "B8") for i in out.graph.initializer)  # unused originals are dropped


def test_native_int4_is_dequantize_plus_matmul_that_computes_the_same():
    rng = np.random.default_rng(1)
    K, N, bs = 96, 40, 32
    B, S = packed(random_terms(rng, K, N, 4, bs), 4, bs)
    bias = rng.standard_normal(N).astype(np.float32)
    model = nbits_model(B, S, K=K, N=N, bits=4, bs=bs, bias=bias)
    conv = to_tensorrt(model)
    assert conv.native_int4 == 1 and not conv.plugins
    ops = [n.op_type for n in conv.model.graph.node]
    assert ops == ["DequantizeLinear", "MatMul", "Add"]
    dq = conv.model.graph.node[0]
    assert _attrs(dq) == {"axis": 0, "block_size": bs}
    w = next(i for i in conv.model.graph.initializer if i.name == dq.input[0])
    assert w.data_type == TensorProto.INT4 and tuple(w.dims) == (K, N)
    x = rng.standard_normal((4, K)).astype(np.float32)
    np.testing.assert_allclose(run_ort(conv.model, {"x": x})["y"], run_ort(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    plug = to_tensorrt(model, int4="plugin")
    assert plug.plugins == {"matmul_int4": 1} and plug.native_int4 == 0


def test_what_has_no_conversion_is_a_one_line_error():
    rng = np.random.default_rng(2)
    B, S = packed(random_terms(rng, 64, 8, 4, 32), 4, 32)
    zp = np.full(8, 0x88, np.uint8)
    with pytest.raises(LLCError, match="node 'mm' \\(MatMulNBits\\): zero points"):
        to_tensorrt(nbits_model(B, S, K=64, N=8, bits=4, bs=32, zero_points=zp))
    with pytest.raises(LLCError, match="int4="):
        to_tensorrt(nbits_model(B, S, K=64, N=8, bits=4, bs=32), int4="fp16")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; this checks the error where it is not")
def test_without_tensorrt_the_engine_build_says_what_to_install(tmp_path):
    from llc_onnx.model_io import save_model
    from llc_onnx.plugins.tensorrt.engine import build_engine
    from llc_onnx.plugins.tensorrt.plugins import register_plugins

    rng = np.random.default_rng(3)
    B, S = packed(random_terms(rng, 64, 8, 2, 32), 2, 32)
    path = tmp_path / "m.onnx"
    save_model(nbits_model(B, S, K=64, N=8, bits=2, bs=32), path)
    for call in (register_plugins, lambda: build_engine(str(path), str(tmp_path / "m.plan"))):
        with pytest.raises(LLCError, match="'tensorrt' cannot be imported.*install TensorRT ≥ 10.8") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installable on these machines (PyPI has only a stub that "
                                        "downloads from NVIDIA's index); needs tensorrt ≥ 10.8 and a GPU")
def test_engine_matches_onnx_runtime(tmp_path):  # pragma: no cover - runs only where TensorRT and a GPU exist
    import torch

    from llc_onnx.calib.data import Batch, Dataset
    from llc_onnx.calib.losses import make_loss
    from llc_onnx.model_io import save_model
    from llc_onnx.plugins.tensorrt.engine import build_engine, compare_engine

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(4)
    model, _ = _mixed_model(rng)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    info = build_engine(str(path), str(tmp_path / "m.plan"), input_shapes={"x": ((1, 64), (8, 64), (32, 64))})
    assert info["plugins"] == {"matmul_int2": 1, "series_matmul": 1, "matmul_int8": 1}
    x = rng.standard_normal((32, 64)).astype(np.float32)
    ds = Dataset([Batch({"x": x[:16]}, rng.integers(0, 16, 16)), Batch({"x": x[16:]}, rng.integers(0, 16, 16))], "mem")
    cmp = compare_engine(str(path), str(tmp_path / "m.plan"), ds, make_loss("ce", "y"))
    assert abs(cmp.engine.loss - cmp.reference.loss) < 1e-3 and cmp.max_abs_diff < 1e-2


class _Dim(int):
    """A build-time constant dimension, as TensorRT's ShapeExpr reports one (is_constant / constant_value)."""

    is_constant = True

    def constant_value(self):
        return int(self)

    def __mul__(self, other):
        return _Dim(int(self) * int(other))


class _Shape(list):
    def numel(self):
        return _Dim(int(np.prod([int(d) for d in self])))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or bool(os.environ.get("TRITON_INTERPRET")),
                    reason="needs triton (compiled mode) to build the PTX")
def test_plugin_launch_is_the_kernel_and_grid_the_torch_path_uses(monkeypatch):
    """The aot_impl computation with TensorRT's symbolic types stood in by integers (TensorRT itself cannot be
    installed here): the PTX is the kernel compiled for LLC_ONNX_TRT_ARCH, the grid is ``launch.grid``'s,
    (M, N, K) are the int32 extra arguments, per-channel scales are recognised."""
    from types import SimpleNamespace

    from llc_onnx.plugins.tensorrt.plugins import aot_launch, choose_config
    from llc_onnx.plugins.triton.launch import grid

    monkeypatch.setenv("LLC_ONNX_TRT_ARCH", "90")
    trt = SimpleNamespace(float16="fp16", float32="fp32", bfloat16="bf16")
    trtp = SimpleNamespace(KernelLaunchParams=SimpleNamespace, SymInt32=int,
                           SymIntExprs=SimpleNamespace(from_tuple=tuple), cdiv=lambda a, b: -(-int(a) // b))
    for (batch, seq), kind in [((1, 1), "gemv"), ((2, 16), "gemm"), ((4, 100), "gemm")]:
        x = SimpleNamespace(shape_expr=_Shape([_Dim(batch), _Dim(seq), _Dim(4096)]), ndim=3, dtype="fp16")
        s = SimpleNamespace(shape_expr=_Shape([_Dim(14336 * 32)]), dtype="fp16")
        name, ptx, launch, extra = aot_launch(trt, trtp, x, s, K=4096, N=14336, bits=2, block_size=128, terms=1)
        cfg = choose_config(batch * seq)
        assert cfg.kind == kind and cfg.split_k == 1
        assert name.startswith(f"wo_{kind}") and f".entry {name}(" in ptx and ".target sm_90a" in ptx
        assert (launch.grid_x, launch.grid_y, launch.grid_z) == grid(cfg, batch * seq, 14336)
        assert launch.block_x == cfg.num_warps * 32 and launch.shared_mem <= 48 * 1024
        assert extra == (batch * seq, 14336, 4096)
    # 8-bit scales collapsed to one per channel select the per-channel kernel
    s = SimpleNamespace(shape_expr=_Shape([_Dim(14336)]), dtype="fp32")
    _, ptx_pc, _, _ = aot_launch(trt, trtp, x, s, K=4096, N=14336, bits=8, block_size=128, terms=1)
    _, ptx_bl, _, _ = aot_launch(trt, trtp, x, SimpleNamespace(shape_expr=_Shape([_Dim(14336 * 32)]), dtype="fp32"),
                                 K=4096, N=14336, bits=8, block_size=128, terms=1)
    assert ptx_pc != ptx_bl
