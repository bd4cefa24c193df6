"""calib.gram.collect_grams: Gram matrices against independent numpy recomputations and ONNX Runtime.

The defining property of a node's input Gram G over its reduction view is that for any weight change Δ the
node's output change on the calibration inputs has energy  Σ_out Δ_out G Δ_outᵀ  — checked here against ONNX
Runtime running the node with weight Δ, which covers the unfold order, padding, strides, dilations, auto_pad
and groups of a Conv without re-implementing them.
"""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from _models import make, ort_logits, torch_threads
from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.calib.gram import collect_grams, input_rows, reduction_view
from llc_onnx.compressible import find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph

F = TensorProto.FLOAT


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _dataset(x: np.ndarray, bs: int, name: str = "x") -> Dataset:
    return Dataset([Batch({name: x[i:i + bs]}, None) for i in range(0, len(x), bs)], "test")


def _vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


CONVS = {  # name -> (weight shape, attributes): the Conv geometries checked against ONNX Runtime
    "c_group": ((6, 2, 3, 2), dict(group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 0, 1])),
    "c_same": ((3, 4, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "c_lower": ((2, 4, 2, 2), dict(auto_pad="SAME_LOWER")),
    "c_dw": ((4, 1, 3, 3), dict(group=4, pads=[1, 1, 1, 1])),
}


def _conv_model(seed=0):
    rng = np.random.default_rng(seed)
    inits, nodes, outs = {}, [], []
    for name, (shape, attrs) in CONVS.items():
        inits["W_" + name] = rng.normal(size=shape).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["x", "W_" + name], ["y_" + name], name=name, **attrs))
        outs.append(_vi("y_" + name, ["N", shape[0], "H", "W"]))
    return make(nodes, [_vi("x", ["N", 4, 7, 9])], outs, inits)


def _single_conv(shape, attrs, delta):
    m = make([helper.make_node("Conv", ["x", "D"], ["y"], **attrs)], [_vi("x", ["N", shape[1] * attrs.get("group", 1), 7, 9])],
             [_vi("y", ["N", shape[0], "H", "W"])], {"D": delta.astype(np.float32)})
    return m


def test_conv_gram_gives_the_output_energy_of_any_weight_change():
    x = np.random.default_rng(1).normal(size=(11, 4, 7, 9)).astype(np.float32)
    model = _conv_model()
    nodes, _ = find_compressible(model)
    grams = collect_grams(model, TorchGraph(model), _dataset(x, 4), nodes)
    rng = np.random.default_rng(2)
    for name, (shape, attrs) in CONVS.items():
        g = grams[name]
        group = attrs.get("group", 1)
        k = int(np.prod(shape[1:]))
        assert g.gram.shape == ((group, k, k) if group > 1 else (k, k))
        assert g.nodes == (name,)
        delta = rng.normal(size=shape)
        y = ort_logits(_single_conv(shape, attrs, delta), x=x).astype(np.float64)
        assert g.n == x.shape[0] * y.shape[2] * y.shape[3]
        d = delta.astype(np.float32).astype(np.float64).reshape(shape[0], k)
        gg = g.gram.reshape(group, k, k)
        per = shape[0] // group
        energy = sum(float(np.einsum("ok,kl,ol->", d[p * per:(p + 1) * per], gg[p], d[p * per:(p + 1) * per]))
                     for p in range(group))
        assert energy == pytest.approx(float((y ** 2).sum()), rel=1e-4), name


def test_conv_rows_match_torch_unfold():
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64)
    model = _conv_model()
    nodes, _ = find_compressible(model)
    node = next(n for n in nodes if n.name == "c_dw")
    rows = input_rows(x, reduction_view(model, node))                   # [B·L, 4, 9]
    ref = torch.nn.functional.unfold(x, (3, 3), padding=1)             # [B, 4·9, L] in (c, kh, kw) order
    ref = ref.transpose(1, 2).reshape(-1, 4, 9)
    assert torch.equal(rows, ref)


def _mm_model(seed=0):
    """x[B, T, 8] -> MatMul Wq 'q', MatMul Wk 'k' (same input), Relu(q) -> MatMul W2 'mm2'; and
    a[8, N] -> Gemm(transA=1, B=Wg[8, 3]) 'gemm'."""
    rng = np.random.default_rng(seed)
    inits = {"Wq": rng.normal(size=(8, 5)).astype(np.float32), "Wk": rng.normal(size=(8, 4)).astype(np.float32),
             "W2": rng.normal(size=(5, 6)).astype(np.float32), "Wg": rng.normal(size=(8, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k"),
             helper.make_node("Relu", ["q"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
             helper.make_node("Gemm", ["a", "Wg"], ["z"], name="gemm", transA=1)]
    return make(nodes, [_vi("x", ["B", "T", 8]), _vi("a", [8, "N"])],
                [_vi("y", ["B", "T", 6]), _vi("k", ["B", "T", 4]), _vi("z", ["N", 3])], inits), inits


def test_matmul_and_gemm_grams_stream_batch_by_batch():
    rng = np.random.default_rng(3)
    model, w = _mm_model()
    x = rng.normal(size=(10, 3, 8)).astype(np.float32)
    a = rng.normal(size=(8, 5)).astype(np.float32)
    batches = [Batch({"x": x[i:i + 4], "a": a}, None) for i in range(0, 10, 4)]   # 4, 4, 2 sequences
    nodes, _ = find_compressible(model)
    grams = collect_grams(model, TorchGraph(model), Dataset(batches, "t"), nodes)
    x2 = x.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(grams["q"].gram, x2.T @ x2, rtol=1e-10)
    assert grams["q"].n == 30
    assert grams["q"] is grams["k"] and grams["q"].nodes == ("q", "k")    # same input, one accumulator
    r = np.maximum(x2 @ w["Wq"].astype(np.float64), 0)
    np.testing.assert_allclose(grams["mm2"].gram, r.T @ r, rtol=1e-5)
    a64 = a.astype(np.float64).T                                          # transA: rows of Aᵀ
    np.testing.assert_allclose(grams["gemm"].gram, 3 * (a64.T @ a64), rtol=1e-10)   # fed with 3 batches
    assert grams["gemm"].n == 15
    np.testing.assert_allclose(grams["mm2"].mean, grams["mm2"].gram / 30)


def test_subset_of_nodes_and_bad_names():
    model, _ = _mm_model()
    nodes, _ = find_compressible(model)
    rng = np.random.default_rng(4)
    ds = Dataset([Batch({"x": rng.normal(size=(2, 3, 8)).astype(np.float32),
                         "a": rng.normal(size=(8, 2)).astype(np.float32)}, None)], "t")
    grams = collect_grams(model, TorchGraph(model), ds, nodes, names=["k"])
    assert list(grams) == ["k"] and grams["k"].nodes == ("k",)
    with pytest.raises(LLCError, match="'nope'"):
        collect_grams(model, TorchGraph(model), ds, nodes, names=["nope"])


def test_input_model_is_not_modified():
    model = _conv_model()
    before = model.SerializeToString()
    nodes, _ = find_compressible(model)
    x = np.random.default_rng(5).normal(size=(2, 4, 7, 9)).astype(np.float32)
    collect_grams(model, TorchGraph(model), _dataset(x, 2), nodes)
    assert model.SerializeToString() == before


def test_grams_accumulated_in_files_are_the_same_and_leave_memory():
    """``spill=``: the accumulators are file maps dropped after every update; the same matrices bit for bit, one
    file per shared accumulator, and each result is that file's map."""
    from llc_onnx import memory

    rng = np.random.default_rng(3)
    model, _ = _mm_model()
    x = rng.normal(size=(10, 3, 8)).astype(np.float32)
    a = rng.normal(size=(8, 5)).astype(np.float32)
    batches = [Batch({"x": x[i:i + 4], "a": a}, None) for i in range(0, 10, 4)]
    nodes, _ = find_compressible(model)
    plain = collect_grams(model, TorchGraph(model), Dataset(batches, "t"), nodes)
    spill = memory.Spill()
    dropped = []
    real = memory.drop
    memory.drop = lambda arr: (dropped.append(arr), real(arr))
    try:
        filed = collect_grams(model, TorchGraph(model), Dataset(batches, "t"), nodes, spill=spill)
    finally:
        memory.drop = real
    for name, g in plain.items():
        assert np.array_equal(filed[name].gram, g.gram) and filed[name].n == g.n
        assert isinstance(filed[name].gram, np.memmap) and filed[name].gram.filename.startswith(spill.dir)
    assert filed["q"] is filed["k"] and len(spill.arrays) == 3                 # q/k share one file
    assert len(dropped) == 3 * len(batches)                                     # each accumulator, every batch
