"""calib.noise: per-sample measurement, paired ΔL / SE, and interpreter fake-quant vs the real QDQ graph."""

import numpy as np
import pytest
import torch

from _models import torch_threads, cnn, mlp, ort_logits, save_npz, teacher_labels
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.calib.noise import LossSamples, constant, measure, measure_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.ort_eval import EXACT, evaluate
from llc_onnx.passes.qdq import apply_qdq
from llc_onnx.quant import ActivationQuant, WeightQuantSpec, fake_quant_activation, quantize_weight


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _data(tmp_path, builder, x, bs=16):
    model, w = builder()
    y = teacher_labels(ort_logits(model, x=x), flip=0.3)
    ds = load_dataset(save_npz(tmp_path / "d.npz", y, x=x), model, batch_size=bs)
    return model, w, ds


def test_per_sample_sums_add_up_to_batch_sums(tmp_path):
    x = np.random.default_rng(1).normal(size=(37, 8)).astype(np.float32)
    model, _, ds = _data(tmp_path, mlp, x)
    loss = make_loss("ce", "logits")
    graph = TorchGraph(model, dtype=torch.float64)
    s = measure(graph, ds, loss)
    assert s.sums.shape == s.counts.shape == (37,)
    assert np.all(s.counts == 1) and np.all(s.sums > 0)
    start = 0
    for b in ds.batches:
        outs, _ = graph.run({"x": b.inputs["x"]}, outputs=["logits"])
        bs, bc = loss.terms(outs["logits"], torch.as_tensor(b.labels))
        assert s.sums[start:start + b.size].sum() == pytest.approx(float(bs), rel=1e-12)
        assert s.counts[start:start + b.size].sum() == bc
        start += b.size
    assert s.mean == pytest.approx(evaluate(model, ds, loss).loss, rel=1e-5)
    assert measure_loss(graph, ds, loss) == s.mean


def test_delta_and_standard_error_by_hand():
    base = LossSamples(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    new = LossSamples(np.array([1.5, 2.0, 2.5, 5.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    # e = [0.5, 0, -0.5, 1]: Σe = 1, var(ddof=1) = 1.25/3
    dl, se = new.delta(base)
    assert dl == pytest.approx(0.25)
    assert se == pytest.approx(np.sqrt(4 * 1.25 / 3) / 4)
    # token counts (LM-style): N = Σ counts, not the number of samples
    base_t = LossSamples(base.sums, np.array([2.0, 3.0, 1.0, 4.0]))
    new_t = LossSamples(new.sums, base_t.counts)
    dl, se = new_t.delta(base_t)
    assert dl == pytest.approx(1.0 / 10)
    assert se == pytest.approx(np.sqrt(4 * 1.25 / 3) / 10)
    assert base_t.mean == pytest.approx(10.0 / 10)
    # identical runs: zero change, zero error; one sample: no error estimate
    assert base.delta(base) == (0.0, 0.0)
    one = LossSamples(np.array([2.0]), np.array([1.0]))
    assert LossSamples(np.array([3.0]), np.array([1.0])).delta(one) == (1.0, 0.0)
    # a constant shift has zero paired SE even though the samples themselves vary a lot
    shifted = LossSamples(base.sums + 0.1, base.counts)
    assert shifted.delta(base)[0] == pytest.approx(0.1)
    assert shifted.delta(base)[1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("builder,shape,bits", [(mlp, (40, 8), (4, 8)), (cnn, (40, 1, 6, 6), (8, 4))])
def test_fake_quant_in_interpreter_matches_ort_qdq_graph(tmp_path, builder, shape, bits):
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    model, _, ds = _data(tmp_path, builder, x)
    loss = make_loss("ce", "logits")
    nodes, _ = find_compressible(model)
    graph = TorchGraph(model)  # float32, like ORT
    plans, fns = {}, {}
    for node, b in zip(nodes, bits):
        w = graph.params[node.weight].detach().numpy()
        spec = WeightQuantSpec(bits=b, block_size=4 if b == 4 else None, rounding="nearest")
        qw = quantize_weight(w, spec, node.out_axis, node.reduce_axis)
        plans[node.name] = qw
        fns[node.name] = constant(torch.as_tensor(qw.dequant))
    float_loss = measure_loss(graph, ds, loss)
    interp = measure_loss(graph, ds, loss, weight_fns=fns)
    qmodel = apply_qdq(model, plans)
    assert any(n.op_type == "DequantizeLinear" for n in qmodel.graph.node)
    ort_loss = evaluate(qmodel, ds, loss, session=EXACT).loss  # MatMulNBits at full precision: the graph's maths
    assert abs(interp - float_loss) > 1e-4  # the quantization noise is visible ...
    assert interp == pytest.approx(ort_loss, abs=1e-5)  # ... and the interpreter predicts ORT's graph

    # with an 8-bit activation Q/DQ pair on the last node as well
    last = nodes[-1].name
    _, cap = graph.run({"x": x}, capture=[last])
    aq = ActivationQuant(scale=float(np.float32(cap[last][1].abs().max().item() / 127)), bits=8)
    interp_a = measure_loss(graph, ds, loss, weight_fns=fns,
                            input_fns={last: lambda t: fake_quant_activation(t, aq)})
    ort_a = evaluate(apply_qdq(model, plans, {last: aq}), ds, loss, session=EXACT).loss
    assert interp_a != interp
    assert interp_a == pytest.approx(ort_a, abs=1e-5)
