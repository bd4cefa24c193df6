"""The gradient pass out of core: checkpointed pieces (``segments``) and accumulators in files (``spill``).

Both exist for memory only (a large model's gradient pass held a whole forward's activations and a second copy of
every weight), so the contract is that every number stays the same, bit for bit, and that the memory really goes:
the backward keeps fewer saved tensors, and the accumulators are file maps whose pages leave the process.
"""

import numpy as np
import pytest
import torch
from onnx import helper

from _models import F, make, ort_logits, save_npz, teacher_labels, torch_threads
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.gradients import collect_gradients
from llc_onnx.calib.losses import make_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.memory import Spill
from llc_onnx.quant import ActivationQuant, fake_quant_activation


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _gated_residual(layers: int = 5, d: int = 12, classes: int = 5, seed: int = 0, wide: int = 1):
    """x → per layer: a = x·A_l, b = x·B_l (one input read by two nodes; ``wide``·d wide),
    h = (a ⊙ sigmoid(b))·C_l, x ← x + h (the residual reads a value across many nodes) → x·W_out → logits. Values cross the pieces'
    boundaries in every way a piece can be cut: a graph input read at the end, a residual, a shared input."""
    rng = np.random.default_rng(seed)
    w, nodes, x = {}, [], "x"
    for i in range(layers):
        for n, shape in (("A", (d, wide * d)), ("B", (d, wide * d)), ("C", (wide * d, d))):
            w[f"{n}{i}"] = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
        nodes += [helper.make_node("MatMul", [x, f"A{i}"], [f"a{i}"], name=f"a{i}"),
                  helper.make_node("MatMul", [x, f"B{i}"], [f"b{i}"], name=f"b{i}"),
                  helper.make_node("Sigmoid", [f"b{i}"], [f"s{i}"], name=f"sig{i}"),
                  helper.make_node("Mul", [f"a{i}", f"s{i}"], [f"m{i}"], name=f"mul{i}"),
                  helper.make_node("MatMul", [f"m{i}", f"C{i}"], [f"h{i}"], name=f"c{i}"),
                  helper.make_node("Add", [x, f"h{i}"], [f"x{i}"], name=f"res{i}")]
        x = f"x{i}"
    w["W"] = (rng.normal(size=(d, classes)) / np.sqrt(d)).astype(np.float32)
    nodes += [helper.make_node("MatMul", [x, "W"], ["z"], name="out"),
              helper.make_node("Add", ["z", "x_bias"], ["logits"], name="bias")]
    inputs = [helper.make_tensor_value_info("x", F, ["N", d]),
              helper.make_tensor_value_info("x_bias", F, ["N", classes])]
    return make(nodes, inputs, [helper.make_tensor_value_info("logits", F, ["N", classes])], w)


def _setup(tmp_path):
    model = _gated_residual()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(41, 12)).astype(np.float32)
    xb = (0.1 * rng.normal(size=(41, 5))).astype(np.float32)
    y = teacher_labels(ort_logits(model, x=x, x_bias=xb), flip=0.3)
    ds = load_dataset(save_npz(tmp_path / "d.npz", y, x=x, x_bias=xb), model, batch_size=16)
    nodes, _ = find_compressible(model)
    return model, ds, nodes


def _acts(nodes):
    return {n.name: {b: (lambda t, b=b: fake_quant_activation(t, ActivationQuant(scale=s, bits=b)))
                     for b, s in ((8, 3.0 / 127), (16, 3.0 / 32767))} for n in nodes}


def _same(a, b):
    assert a.loss == b.loss and a.n == b.n
    assert a.nodes.keys() == b.nodes.keys()
    for name, s in a.nodes.items():
        t = b.nodes[name]
        for f in ("grad_w", "grad_w_abs", "grad_w_sq", "channel_gw"):
            u, v = getattr(s, f), getattr(t, f)
            assert (u is None) == (v is None), f
            if u is not None:
                assert u.dtype == v.dtype and np.array_equal(np.asarray(u), np.asarray(v)), (name, f)
        assert (s.grad_x_norm, s.x_absmax, s.x_rms, s.act_pred) == (t.grad_x_norm, t.x_absmax, t.x_rms, t.act_pred)


@pytest.mark.parametrize("segments", [2, 3, 7, 40])
def test_checkpointed_pieces_give_the_same_gradients_bit_for_bit(tmp_path, segments):
    model, ds, nodes = _setup(tmp_path)
    loss = make_loss("ce", "logits")
    plain = collect_gradients(TorchGraph(model), ds, loss, nodes, _acts(nodes), magnitudes=True)
    cut = collect_gradients(TorchGraph(model), ds, loss, nodes, _acts(nodes), magnitudes=True, segments=segments)
    _same(plain, cut)


def test_accumulators_in_files_give_the_same_gradients_and_leave_memory(tmp_path):
    model, ds, nodes = _setup(tmp_path)
    loss = make_loss("ce", "logits")
    plain = collect_gradients(TorchGraph(model), ds, loss, nodes, _acts(nodes))
    spill = Spill()
    dropped = []
    import llc_onnx.memory as memory
    real = memory.drop

    def spy(arr):
        dropped.append(id(arr))
        real(arr)

    memory.drop = spy
    try:
        out = collect_gradients(TorchGraph(model), ds, loss, nodes, _acts(nodes), spill=spill, segments=4)
    finally:
        memory.drop = real
    _same(plain, out)
    for s in out.nodes.values():
        assert isinstance(s.grad_w, np.memmap) and s.grad_w.filename.startswith(spill.dir)
    # every accumulator was dropped after each of the 3 batches' updates, and once more after the final division
    assert len(dropped) == len(nodes) * (len(ds.batches) + 1)


def test_pieces_keep_fewer_saved_tensors_for_the_backward(tmp_path):
    """What the backward holds, counted with an outer saved-tensor hook: without pieces every activation the ops
    save (per layer three 4·d-wide ones); with √(nodes) pieces only the values passed between pieces (d wide)."""
    model = _gated_residual(layers=12, wide=4)
    rng = np.random.default_rng(0)
    graph = TorchGraph(model)
    feeds = {"x": torch.as_tensor(rng.normal(size=(64, 12)).astype(np.float32)).requires_grad_(True),
             "x_bias": torch.zeros(64, 5)}

    def saved_bytes(segments):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs, _ = graph.run(feeds, segments=segments)
        outs["logits"].sum().backward()
        return total[0]

    whole = saved_bytes(0)
    assert saved_bytes(round(len(graph.node_names()) ** 0.5)) < whole / 4


def test_nothing_of_a_batch_outlives_it(tmp_path):
    """Autograd keeps a graph's hooks in C++, where Python's collector cannot follow: a recomputation whose hook
    held its own list of saved tensors (list → tensor → graph → hook → list) kept every batch's pieces alive
    (+0.65 GB per batch on SmolLM2; this test fails with ``got.append`` as the hook). After a pass no piece and no
    tensor of it may be left."""
    import gc

    from llc_onnx.interpreter import recompute

    model, ds, nodes = _setup(tmp_path)
    graph = TorchGraph(model)
    gc.collect()
    before = sum(type(o) is torch.Tensor for o in gc.get_objects())
    collect_gradients(graph, ds, make_loss("ce", "logits"), nodes, _acts(nodes), segments=5, spill=Spill())
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is recompute._Piece] == []
    assert sum(type(o) is torch.Tensor for o in gc.get_objects()) <= before
