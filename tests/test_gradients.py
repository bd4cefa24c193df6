"""calib.gradients.collect_gradients against independent pure-torch / numpy recomputations (float64)."""

import numpy as np
import pytest
import torch

from _models import torch_threads, cnn, mlp, save_npz, shared, teacher_labels
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.gradients import collect_gradients, collect_ranges
from llc_onnx.calib.losses import make_loss
from llc_onnx.calib.noise import measure_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.ort_eval import evaluate
from llc_onnx.quant import ActivationQuant, fake_quant_activation


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield

N, BS = 37, 16  # batches of 16, 16, 5: a mean over batches would differ from the mean over samples


def _setup(tmp_path, builder, x, bs=BS):
    model, w = builder()
    from _models import ort_logits
    y = teacher_labels(ort_logits(model, x=x), flip=0.3)
    path = save_npz(tmp_path / "d.npz", y, x=x)
    ds = load_dataset(path, model, batch_size=bs)
    nodes, _ = find_compressible(model)
    return model, w, ds, nodes, y


def _t(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def _mlp_torch(tw, x):
    h = torch.relu(x @ tw["W1"].T + tw["b1"])
    return h @ tw["W2"] + tw["b2"], h


def test_mlp_grad_w_is_gradient_of_sample_mean_loss(tmp_path):
    x = np.random.default_rng(5).normal(size=(N, 8)).astype(np.float32)
    model, w, ds, nodes, y = _setup(tmp_path, mlp, x)
    assert [b.size for b in ds.batches] == [16, 16, 5]
    loss = make_loss("ce", "logits")
    gp = collect_gradients(TorchGraph(model, dtype=torch.float64), ds, loss, nodes, magnitudes=True)

    tw = {k: _t(v) for k, v in w.items()}
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    logits, _ = _mlp_torch(tw, xt)
    ref = torch.nn.functional.cross_entropy(logits, yt)  # mean over the 37 samples
    ref.backward()
    assert gp.n == N
    assert gp.loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(gp.nodes["fc1"].grad_w, tw["W1"].grad.numpy(), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(gp.nodes["fc2"].grad_w, tw["W2"].grad.numpy(), rtol=1e-9, atol=1e-13)
    assert gp.nodes["fc1"].grad_w.shape == w["W1"].shape  # ONNX layout (Gemm transB=1: [out, in])

    # the mean of per-batch mean gradients is a different quantity: make sure the test can tell them apart
    per_batch = []
    for b in ds.batches:
        for v in tw.values():
            v.grad = None
        lg, _ = _mlp_torch(tw, torch.tensor(b.inputs["x"], dtype=torch.float64))
        torch.nn.functional.cross_entropy(lg, torch.tensor(b.labels)).backward()
        per_batch.append(tw["W2"].grad.numpy().copy())
    batch_mean = np.mean(per_batch, axis=0)
    assert np.abs(batch_mean - gp.nodes["fc2"].grad_w).max() > 1e-3 * np.abs(batch_mean).max()
    # grad_w_abs / grad_w_sq are documented as means over batches of the per-batch-mean gradient
    np.testing.assert_allclose(gp.nodes["fc2"].grad_w_abs, np.mean(np.abs(per_batch), axis=0), rtol=1e-9)
    np.testing.assert_allclose(gp.nodes["fc2"].grad_w_sq, np.mean(np.square(per_batch), axis=0), rtol=1e-9)

    # the interpreter's mean loss equals ONNX Runtime's on the same data
    assert gp.loss == pytest.approx(evaluate(model, ds, loss).loss, rel=1e-5)

    # channel_gw: Σ over non-output axes of g·W per output channel (fc1: out_axis 0, fc2: out_axis 1)
    np.testing.assert_allclose(gp.nodes["fc1"].channel_gw, (gp.nodes["fc1"].grad_w * w["W1"]).sum(1), rtol=1e-9)
    np.testing.assert_allclose(gp.nodes["fc2"].channel_gw, (gp.nodes["fc2"].grad_w * w["W2"]).sum(0), rtol=1e-9)


def test_float32_pass_keeps_float32_means_and_collects_magnitudes_only_when_asked(tmp_path):
    x = np.random.default_rng(8).normal(size=(N, 8)).astype(np.float32)
    model, _, ds, nodes, _ = _setup(tmp_path, mlp, x)
    loss = make_loss("ce", "logits")
    g32 = collect_gradients(TorchGraph(model), ds, loss, nodes)
    g64 = collect_gradients(TorchGraph(model, dtype=torch.float64), ds, loss, nodes, magnitudes=True)
    for name in ("fc1", "fc2"):
        s32, s64 = g32.nodes[name], g64.nodes[name]
        assert s32.grad_w.dtype == np.float32 and s64.grad_w.dtype == np.float64
        assert s32.grad_w_abs is None and s32.grad_w_sq is None          # not asked: not accumulated
        assert s64.grad_w_abs is not None and s64.grad_w_sq is not None
        np.testing.assert_allclose(s32.grad_w, s64.grad_w, rtol=1e-4, atol=1e-7 * np.abs(s64.grad_w).max())
        assert s32.channel_gw.dtype == np.float64


def test_mlp_grad_matches_finite_difference_of_measure_loss(tmp_path):
    x = np.random.default_rng(6).normal(size=(N, 8)).astype(np.float32)
    model, w, ds, nodes, _ = _setup(tmp_path, mlp, x)
    loss = make_loss("ce", "logits")
    graph = TorchGraph(model, dtype=torch.float64)
    gp = collect_gradients(graph, ds, loss, nodes)
    eps = 1e-6
    for (i, j) in [(0, 0), (3, 5), (15, 7)]:
        e = torch.zeros(w["W1"].shape, dtype=torch.float64)
        e[i, j] = eps
        up = measure_loss(graph, ds, loss, weight_fns={"fc1": lambda W, e=e: W + e})
        dn = measure_loss(graph, ds, loss, weight_fns={"fc1": lambda W, e=e: W - e})
        assert (up - dn) / (2 * eps) == pytest.approx(gp.nodes["fc1"].grad_w[i, j], rel=1e-5, abs=1e-9)


def test_cnn_grads_and_activation_stats(tmp_path):
    x = np.random.default_rng(7).normal(size=(N, 1, 6, 6)).astype(np.float32)
    model, w, ds, nodes, y = _setup(tmp_path, cnn, x)
    loss = make_loss("ce", "logits")
    gp = collect_gradients(TorchGraph(model, dtype=torch.float64), ds, loss, nodes)

    tw = {k: _t(v) for k, v in w.items()}
    xt = torch.tensor(x, dtype=torch.float64)
    c = torch.nn.functional.conv2d(xt, tw["Wc"], tw["bc"], padding=1)
    f = torch.relu(c).reshape(N, -1)
    f.retain_grad()
    ref = torch.nn.functional.cross_entropy(f @ tw["Wf"], torch.tensor(y))
    ref.backward()
    assert gp.loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(gp.nodes["conv"].grad_w, tw["Wc"].grad.numpy(), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(gp.nodes["fc"].grad_w, tw["Wf"].grad.numpy(), rtol=1e-9, atol=1e-13)

    fn = f.detach().numpy()
    assert gp.nodes["conv"].x_absmax == pytest.approx(np.abs(x).max(), rel=1e-12)
    assert gp.nodes["fc"].x_absmax == pytest.approx(fn.max(), rel=1e-12)
    assert gp.nodes["fc"].x_rms == pytest.approx(np.sqrt(np.mean(fn ** 2)), rel=1e-9)
    # grad_x_norm: mean over samples of ‖∂(Σ loss)/∂x_i‖  (f.grad is of the mean loss -> scale by N)
    gx = f.grad.numpy() * N
    assert gp.nodes["fc"].grad_x_norm == pytest.approx(np.linalg.norm(gx, axis=1).mean(), rel=1e-9)
    # the forward-only range pass agrees
    ranges = collect_ranges(TorchGraph(model, dtype=torch.float64), ds, nodes)
    assert ranges["fc"] == pytest.approx(fn.max(), rel=1e-12)
    assert ranges["conv"] == pytest.approx(np.abs(x).max(), rel=1e-12)


def test_shared_weight_gets_one_gradient_per_node(tmp_path):
    x = np.random.default_rng(8).normal(size=(N, 6)).astype(np.float32)
    model, w, ds, nodes, y = _setup(tmp_path, shared, x)
    names = {n.name: n for n in nodes}
    assert names["mm1"].weight == names["mm2"].weight == "W"
    loss = make_loss("ce", "logits")
    gp = collect_gradients(TorchGraph(model, dtype=torch.float64), ds, loss, nodes)

    W1, W2, Wo = _t(w["W"]), _t(w["W"]), _t(w["Wo"])  # two independent copies: one per use
    xt = torch.tensor(x, dtype=torch.float64)
    ref = torch.nn.functional.cross_entropy(torch.tanh(xt @ W1) @ W2 @ Wo, torch.tensor(y))
    ref.backward()
    g1, g2 = gp.nodes["mm1"].grad_w, gp.nodes["mm2"].grad_w
    np.testing.assert_allclose(g1, W1.grad.numpy(), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(g2, W2.grad.numpy(), rtol=1e-9, atol=1e-13)
    assert np.abs(g1 - g2).max() > 1e-3 * np.abs(g1).max()

    Wt = _t(w["W"])  # the gradient of the shared initializer is the sum of both
    torch.nn.functional.cross_entropy(torch.tanh(xt @ Wt) @ Wt @ _t(w["Wo"]), torch.tensor(y)).backward()
    np.testing.assert_allclose(g1 + g2, Wt.grad.numpy(), rtol=1e-9, atol=1e-13)


def test_act_pred_is_mean_of_gx_dot_quant_noise(tmp_path):
    x = np.random.default_rng(9).normal(size=(N, 8)).astype(np.float32)
    model, w, ds, nodes, y = _setup(tmp_path, mlp, x)
    loss = make_loss("ce", "logits")
    graph = TorchGraph(model, dtype=torch.float64)
    ranges = collect_ranges(graph, ds, nodes)
    fqs = {}
    for bits in (8, 16):
        # a coarse scale so the 8-bit noise is large enough to matter
        aq = ActivationQuant(scale=ranges["fc2"] / (7 if bits == 8 else 2000), bits=bits)
        fqs[bits] = (lambda t, aq=aq: fake_quant_activation(t, aq))
    gp = collect_gradients(graph, ds, loss, nodes, act_candidates={"fc2": fqs})

    tw = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}
    xt = torch.tensor(x, dtype=torch.float64)
    h = torch.relu(xt @ tw["W1"].T + tw["b1"]).requires_grad_(True)
    s = torch.nn.functional.cross_entropy(h @ tw["W2"] + tw["b2"], torch.tensor(y), reduction="sum")
    (gh,) = torch.autograd.grad(s, [h])
    for bits, fq in fqs.items():
        want = float((gh * (fq(h.detach()) - h.detach())).sum()) / N
        assert want != 0.0
        assert gp.nodes["fc2"].act_pred[bits] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert gp.nodes["fc1"].act_pred == {}
    # the 16-bit prediction is first-order accurate against the measured change in the interpreter
    base = measure_loss(graph, ds, loss)
    meas = measure_loss(graph, ds, loss, input_fns={"fc2": fqs[16]}) - base
    assert meas == pytest.approx(gp.nodes["fc2"].act_pred[16], rel=0.05, abs=1e-9)
