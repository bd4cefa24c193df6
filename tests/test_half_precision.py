"""float16 / bfloat16 models: compressed in their own type, sized in their own bytes, verified in ORT in their type.

Real half-precision files: a torch CNN exported with ``.half()`` (float16 inputs, weights and outputs) and the
bundled-style MLP converted by ONNX Runtime's ``float16`` converter (the onnxconverter-common code, float32 I/O
with Cast nodes); a torch ``.bfloat16()`` export, which ONNX Runtime's CPU provider cannot run at all.
"""

from __future__ import annotations

import json
import math
import warnings

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from _models import mlp, save_npz, teacher_labels, torch_threads
from llc_onnx.cli import main
from llc_onnx.compressible import find_compressible, inspect_model
from llc_onnx.config import OptimizeConfig, with_values
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import initializer_bytes, prepare_model, tensor_nbytes
from llc_onnx.quant import WeightQuantSpec, quantize_weight
from llc_onnx.targets import get_target

H, BF = TensorProto.FLOAT16, TensorProto.BFLOAT16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 8 * 8, 64)
        self.fc2 = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _torch_export(path, dtype) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = _Net().to(dtype).eval()
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=20, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx.load(str(path))


def _ort(model, **feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def torch_fp16(tmp_path_factory):
    """(model path, data path): a torch float16 export, float16 data, labels from the model's own logits."""
    d = tmp_path_factory.mktemp("fp16")
    m = _torch_export(d / "net16.onnx", torch.float16)
    x = np.random.default_rng(0).normal(size=(384, 1, 8, 8)).astype(np.float16)
    y = teacher_labels(_ort(m, x=x).astype(np.float32), flip=0.05)
    return str(d / "net16.onnx"), save_npz(d / "net16.npz", y, x=x)


@pytest.fixture(scope="module")
def converted_fp16(tmp_path_factory):
    """(model path, data path): the MLP converted by ORT's float16 converter (float32 I/O, float16 inside)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    d = tmp_path_factory.mktemp("conv16")
    m32, _ = mlp(0, d_in=32, hidden=64, classes=4)
    m = convert_float_to_float16(m32, keep_io_types=True)
    onnx.save(m, d / "mlp16.onnx")
    x = np.random.default_rng(1).normal(size=(384, 32)).astype(np.float32)
    y = teacher_labels(_ort(m, x=x), flip=0.05)
    return str(d / "mlp16.onnx"), save_npz(d / "mlp16.npz", y, x=x)


def _optimize(capsys, model, data, out, *extra):
    rc = main(["optimize", model, "--data", data, "-o", str(out), "--json", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _float_tensors(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer
            if t.data_type in (TensorProto.FLOAT, H, BF, TensorProto.DOUBLE)}


@pytest.mark.parametrize("which", ["torch_fp16", "converted_fp16"])
@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_float16_model_end_to_end(which, target, request, tmp_path, capsys):
    model, data = request.getfixturevalue(which)
    src = onnx.load(model)
    out = tmp_path / "o.onnx"
    rc, stdout, err = _optimize(capsys, model, data, out, "--target", target, "--budget", "0.45",
                                "--allow-loss-increase")
    assert rc == 0, err
    r = json.loads(stdout)
    stage = r["stages"][0]
    params = sum(math.prod(n.weight_shape) for n in find_compressible(prepare_model(src))[0])
    assert stage["bytes"]["reference"] == 2 * params          # the model's own bytes: 2 per float16 parameter
    levels = {n["node"]: n["level"] for n in stage["nodes"]}
    assert any(lv != "float" for lv in levels.values())
    refused = {(x["node"], x["level"]): x["reason"] for x in stage["settings"]["refused"]}
    assert all("int16" not in f for fs in stage["settings"]["formats"].values() for f in fs)
    if target == "qdq":
        assert any("as many bytes as the float16 weight" in why for (n, lv), why in refused.items() if lv == "int16")
    else:
        assert any("not float32" in why for why in refused.values())  # W8A8 takes float32 activations only
    # the written model keeps its float type: no float32 tensor appears, I/O types unchanged
    written = onnx.load(str(out))
    assert _float_tensors(written) == {H}
    assert [(i.name, i.type.tensor_type.elem_type) for i in written.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in src.graph.input]
    # the reported size is what the file stores for those weights (int64 reshape shapes aside)
    others = initializer_bytes(src) - stage["bytes"]["reference"]
    stored = sum(tensor_nbytes(t) for t in written.graph.initializer if t.data_type != TensorProto.INT64)
    assert stored - others == stage["bytes"]["compressed"]
    # the verdict's numbers are ORT's on the written file, in float16
    x = dict(np.load(data))
    feeds = {k: v for k, v in x.items() if k != "labels"}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, feeds)[0].dtype == _ort(src, **feeds).dtype
    rc2 = main(["compare", model, str(out), "--data", data, "--json"])
    cmp = json.loads(capsys.readouterr().out)
    assert rc2 in (0, 1) and cmp["candidate"]["weight_bytes"] < cmp["reference"]["weight_bytes"]


def test_float16_scales_are_stored_exactly_and_codes_follow_them():
    """Scales are rounded to float16 before the codes are chosen: the stored scale is the one rounded against,
    and nearest rounding of w / scale gives the codes."""
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(96, 40)) * 0.02).astype(np.float16).astype(np.float64)
    for bits, block in ((8, None), (4, 32), (2, 32)):
        qw = quantize_weight(w, WeightQuantSpec(bits, block, "mse", "nearest", float_type="float16"), 1, 0)
        assert np.array_equal(qw.scale.astype(np.float16).astype(np.float32), qw.scale)
        full = qw.scale if block is None else np.repeat(qw.scale, block, axis=0)[:96]
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert np.array_equal(qw.q, np.clip(np.rint(w / full.astype(np.float64)), lo, hi))
        assert np.array_equal(qw.dequant, (qw.q.astype(np.float32) * full).astype(np.float32))
        f32 = quantize_weight(w, WeightQuantSpec(bits, block, "mse", "nearest"), 1, 0)
        assert qw.nbytes == f32.nbytes - 2 * qw.scale.size  # 2-byte scales
    bf = quantize_weight(w, WeightQuantSpec(8, None, float_type="bfloat16"), 1, 0)
    assert np.array_equal(bf.scale.astype(ml_dtypes.bfloat16).astype(np.float32), bf.scale)
    tiny = quantize_weight(np.full((4, 2), 1e-7), WeightQuantSpec(8, None, float_type="float16"), 1, 0)
    assert np.all(tiny.scale > 0)  # below float16's smallest subnormal: clamped, never 0


def test_candidate_hook_is_the_written_float16_node(torch_fp16):
    """What a candidate measures (the float model with the node's weight replaced by the dequantized codes) is
    what the written float16 graph computes: the interpreter gives the same outputs on both."""
    from llc_onnx.calib.noise import constant
    from llc_onnx.targets.base import NodePlan

    m = prepare_model(onnx.load(torch_fp16[0]))
    nodes = {n.name: n for n in find_compressible(m)[0]}
    x = np.load(torch_fp16[1])["x"][:32]
    for target in ("qdq", "ort-cpu"):
        t = get_target(target)
        offers = t.offers(m, nodes.values(), levels=[4, 8])
        plans, hooks = {}, {}
        for name, offer in offers.items():
            fmt = next((f for f in offer.formats if f.kind in ("qdq", "matmulnbits")), None)
            if fmt is None:
                continue
            assert fmt.float_type == "float16"
            w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == nodes[name].weight))
            qw = quantize_weight(w.astype(np.float64), fmt.weight_spec(), nodes[name].out_axis,
                                 nodes[name].reduce_axis)
            plans[name] = NodePlan(fmt, qw)
            hooks[name] = constant(torch.as_tensor(qw.dequant, dtype=torch.float32))
        assert plans
        written = t.rewrite(m, plans).model
        assert all(i.data_type == H for i in written.graph.initializer if i.name.endswith("scale"))
        ref = TorchGraph(m).run({"x": x}, weight_fns=hooks)[0]["logits"]
        got = TorchGraph(written).run({"x": x})[0]["logits"]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_bfloat16_model_is_refused_on_cpu_targets_with_one_line(tmp_path, capsys):
    m = _torch_export(tmp_path / "net_bf16.onnx", torch.bfloat16)
    assert inspect_model(m)["totals"]["compressible_nodes"] == 3  # compressible: the weights are bfloat16
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(ml_dtypes.bfloat16)
    data = save_npz(tmp_path / "bf.npz", np.zeros(64, np.int64), x=x)
    for target in ("qdq", "ort-cpu"):
        out = tmp_path / f"o_{target}.onnx"
        rc, _, err = _optimize(capsys, str(tmp_path / "net_bf16.onnx"), data, out, "--target", target)
        assert rc == 2 and err.count("\n") == 1 and not out.exists(), err
        assert "BFLOAT16 weight" in err and "CPU provider" in err and "--target ort-cuda" in err


def test_bfloat16_offer_and_rewrite_keep_bfloat16(tmp_path):
    """Where a bfloat16 model can run (a GPU provider), the formats and the rewrite keep bfloat16; ORT CPU's
    offer refuses every level with the reason."""
    m = prepare_model(_torch_export(tmp_path / "bf.onnx", torch.bfloat16))
    nodes = find_compressible(m)[0]
    cpu = get_target("ort-cpu").offers(m, nodes, levels=[4, 8])
    assert all(o.names() == ["float"] and all("bfloat16" in why for _, why in o.refused) for o in cpu.values())
    cuda = get_target("ort-cuda")
    offers = cuda.offers(m, nodes, levels=[4])
    from llc_onnx.targets.base import NodePlan

    plans = {}
    for n in nodes:
        fmts = [f for f in offers[n.name].formats if f.kind == "matmulnbits"]
        if fmts:
            w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == n.weight)).astype(np.float64)
            plans[n.name] = NodePlan(fmts[0], quantize_weight(w, fmts[0].weight_spec(), n.out_axis, n.reduce_axis))
            assert fmts[0].float_type == "bfloat16" and fmts[0].nbytes(n) < 2 * math.prod(n.weight_shape)
    assert plans
    written = cuda.rewrite(m, plans).model
    assert _float_tensors(written) == {BF}


def test_double_weights_are_skipped_by_inspect_and_optimize_alike(tmp_path, capsys):
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 3])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(m, tmp_path / "d.onnx")
    info = inspect_model(m)
    assert info["compressible"] == [] and "DOUBLE" in info["skipped"][0]["reason"]
    data = save_npz(tmp_path / "d.npz", np.zeros(16, np.int64), x=rng.normal(size=(16, 4)))
    rc, _, err = _optimize(capsys, str(tmp_path / "d.onnx"), data, tmp_path / "o.onnx")
    assert rc == 2 and "no compressible node" in err and err.count("\n") == 1


def test_float16_sizes_in_formats():
    from llc_onnx.compressible import CompressibleNode
    from llc_onnx.targets.base import Format

    node = CompressibleNode("n", "MatMul", "W", "x", (64, 32), 1, 0, None, 1, ())
    for fmt, f32, f16 in [(Format("float"), 4 * 2048, 2 * 2048),
                          (Format("qdq", 8), 2048 + 4 * 32, 2048 + 2 * 32),
                          (Format("qdq", 4, 32), 1024 + 4 * 64, 1024 + 2 * 64),
                          (Format("matmulnbits", 4, 32), 1024 + 4 * 64, 1024 + 2 * 64)]:
        import dataclasses

        assert fmt.nbytes(node) == f32 and dataclasses.replace(fmt, float_type="float16").nbytes(node) == f16
    cfg = with_values(OptimizeConfig(), {})
    assert cfg.quant.block_size == 32
