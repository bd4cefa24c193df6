"""The one-pass CET curvature (calib.fisher, solvers.cet.fisher_curvature) against autograd and closed forms.

A small model with every weight layout the per-sample trick handles — a grouped, strided, padded Conv, two
depthwise Convs (one strided and dilated with channel multiplier 2), a MatMul over tokens ([B, T, K] rows),
Gemm with transB=1 and alpha, Gemm with transB=0 — checked sample by sample against autograd on that sample
alone, then the sampled labels against the closed-form Gauss-Newton matrix of a softmax layer, then the
eigenpairs against a dense eigendecomposition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.calib.fisher import sample_gradients
from llc_onnx.calib.losses import make_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import prepare_model
from llc_onnx.solvers.cet import _fisher_node, cet_predict, fisher_curvature


def _model():
    rng = np.random.default_rng(0)
    w = {"Wa": rng.normal(0, 0.5, (4, 1, 3, 3)), "Wb": rng.normal(0, 0.5, (4, 1, 3, 3)),
         "Wm": rng.normal(0, 0.4, (9, 5)), "Wg": rng.normal(0, 0.5, (3, 5)), "Wh": rng.normal(0, 0.6, (3, 2)),
         "Wd": rng.normal(0, 0.5, (8, 1, 3, 3)), "ba": rng.normal(0, 0.1, 4), "shape": np.array([0, 4, 9])}
    inits = [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in w.items()]
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "ba"], ["a"], group=2, strides=[2, 2], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Tanh", ["a"], ["at"]),
        helper.make_node("Conv", ["at", "Wb"], ["b"], group=4, pads=[1, 1, 1, 1], name="depthwise"),
        helper.make_node("Tanh", ["b"], ["bt"]),
        helper.make_node("Reshape", ["bt", "shape"], ["tok"]),                 # [B, 4 tokens, 9]
        helper.make_node("MatMul", ["tok", "Wm"], ["m"], name="matmul"),
        helper.make_node("Tanh", ["m"], ["mt"]),
        helper.make_node("ReduceMean", ["mt"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "Wg"], ["g"], transB=1, alpha=0.7, name="gemm_t"),
        helper.make_node("Tanh", ["g"], ["gt"]),
        helper.make_node("Gemm", ["gt", "Wh"], ["yg"], name="gemm"),
        # depthwise with channel multiplier 2, stride 2, dilation 2 (the grouped-convolution path)
        helper.make_node("Conv", ["at", "Wd"], ["d"], group=4, strides=[2, 2], dilations=[2, 2], pads=[2, 2, 2, 2],
                         name="depthwise_m2"),
        helper.make_node("Flatten", ["d"], ["df"]),
        helper.make_node("Tanh", ["df"], ["dt"]),
        helper.make_node("ReduceMean", ["dt"], ["dm"], axes=[1], keepdims=1),
        helper.make_node("Add", ["yg", "dm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "fisher", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return prepare_model(model, opset=21)


def _data(labels: str, sizes=(3, 4), seed=1) -> Dataset:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.normal(size=(n, 2, 6, 6)).astype(np.float32)
        y = rng.normal(size=(n, 2)).astype(np.float32) if labels == "mse" else rng.integers(0, 2, n)
        out.append(Batch({"x": x}, y))
    return Dataset(out, "synthetic")


def _one_sample_grad(graph, loss, node, x, y) -> np.ndarray:
    leaf = {}

    def own(w):
        leaf["w"] = w.detach().clone().requires_grad_(True)
        return leaf["w"]

    with torch.enable_grad():
        outs, _ = graph.run({"x": torch.as_tensor(x, dtype=graph.dtype)}, weight_fns={node: own},
                            outputs=[loss.output])
        s, _ = loss.terms(outs[loss.output], torch.as_tensor(y))
        (g,) = torch.autograd.grad(s, [leaf["w"]])
    return g.detach().numpy().reshape(-1)


def test_per_sample_gradients_equal_autograd_on_each_sample_for_every_layout():
    model = _model()
    nodes, _ = find_compressible(model)
    assert [n.name for n in nodes] == ["conv", "depthwise", "matmul", "gemm_t", "gemm", "depthwise_m2"]
    graph = TorchGraph(model, dtype=torch.float64)
    loss = make_loss("mse", "y")           # no fisher_terms: the data's labels (empirical Fisher)
    ds = _data("mse")
    got = sample_gradients(model, graph, ds, loss, nodes)
    samples = [(b.inputs["x"][i:i + 1], b.labels[i:i + 1]) for b in ds.batches for i in range(b.size)]
    for n in nodes:
        sg = got[n.name]
        assert sg.rows.shape == (7, int(np.prod(n.weight_shape))) and sg.rows.dtype == np.float32
        assert sg.sampled is False and sg.count == sum(loss.terms(torch.zeros(b.size, 2), torch.as_tensor(b.labels))[1]
                                                       for b in ds.batches)
        for s, (x, y) in enumerate(samples):
            ref = _one_sample_grad(graph, loss, n.name, x, y)
            np.testing.assert_allclose(sg.rows[s], ref, rtol=2e-5, atol=1e-6 * np.abs(ref).max())


def test_sampled_labels_give_the_gauss_newton_matrix_of_the_softmax_layer():
    """For the last layer z = h·W (W [3, 2]) under cross-entropy, E_ŷ[g gᵀ] = (1/N) Σ_s (h hᵀ) ⊗ (diag p − p pᵀ)."""
    model = _model()
    nodes, _ = find_compressible(model)
    last = [n for n in nodes if n.name == "gemm"]
    graph = TorchGraph(model, dtype=torch.float64)
    loss = make_loss("ce", "y")
    rng = np.random.default_rng(5)
    base = rng.normal(size=(4, 2, 6, 6)).astype(np.float32)
    x = np.repeat(base, 1500, axis=0)        # 6,000 draws over four inputs
    ds = Dataset([Batch({"x": x[i:i + 1000]}, np.zeros(1000, np.int64)) for i in range(0, len(x), 1000)], "rep")
    sg = sample_gradients(model, graph, ds, loss, last, seed=3)["gemm"]
    assert sg.sampled is True and sg.count == 6000
    F = sg.rows.astype(np.float64).T @ sg.rows.astype(np.float64) / sg.count
    outs, cap = graph.run({"x": torch.as_tensor(base, dtype=torch.float64)}, capture=["gemm"])
    h = cap["gemm"][1].detach().numpy()
    p = torch.softmax(outs["y"].detach(), dim=1).numpy()
    ggn = sum(np.kron(np.outer(h[i], h[i]), np.diag(p[i]) - np.outer(p[i], p[i])) for i in range(4)) / 4
    assert np.linalg.norm(F - ggn) <= 0.1 * np.linalg.norm(ggn)
    # the data's labels (all class 0 here) give another matrix, the empirical Fisher: the check can tell
    y = np.zeros(len(x), np.int64)
    emp = np.concatenate([_one_sample_grad(graph, loss, "gemm", x[i:i + 1], y[i:i + 1])[None] for i in range(4)])
    femp = sum(np.outer(emp[i], emp[i]) for i in range(4)) / 4
    assert np.linalg.norm(femp - ggn) > 0.3 * np.linalg.norm(ggn)


@pytest.mark.parametrize("s, n", [(6, 20), (30, 12)])
def test_fisher_eigenpairs_and_trace_are_exact_for_the_sampled_block(s, n):
    from llc_onnx.calib.fisher import SampleGradients

    rng = np.random.default_rng(s)
    G = rng.normal(size=(s, n)).astype(np.float32)
    c = _fisher_node(SampleGradients("w", (n,), G, count=40, sampled=True), k=50)
    F = G.astype(np.float64).T @ G.astype(np.float64) / 40
    lam = np.linalg.eigvalsh(F)[::-1]
    r = min(s, n)
    np.testing.assert_allclose(c.eigenvalues, lam[:r], rtol=1e-6)
    V = c.eigenvectors.astype(np.float64)
    np.testing.assert_allclose(V @ V.T, np.eye(r), atol=1e-5)
    assert c.trace == pytest.approx(np.trace(F), rel=1e-9) and c.trace_se == 0.0 and c.source == "fisher"
    # every nonzero eigenpair kept: the CET model is ½ δᵀFδ exactly (nothing left for the remainder)
    d = rng.normal(size=(3, n))
    got = cet_predict(c, d)
    np.testing.assert_allclose(got.second_order, 0.5 * np.einsum("ln,nm,lm->l", d, F, d), rtol=1e-5)
    top = _fisher_node(SampleGradients("w", (n,), G, count=40, sampled=True), k=2)
    assert top.k == 2 and top.remainder == pytest.approx((np.trace(F) - lam[:2].sum()) / (n - 2), rel=1e-6)


def _setup(sizes):
    """The model, its nodes, a float64 interpreter, cross-entropy, and a labelled dataset of batches ``sizes``."""
    model = _model()
    nodes, _ = find_compressible(model)
    return model, nodes, TorchGraph(model, dtype=torch.float64), make_loss("ce", "y"), _data("ce", sizes=sizes)


def test_fisher_curvature_groups_and_seed_do_not_change_the_numbers():
    model, nodes, graph, loss, ds = _setup((5, 5, 5))
    one = fisher_curvature(model, graph, ds, loss, nodes, k=4, seed=2)
    split = fisher_curvature(model, graph, ds, loss, nodes, k=4, seed=2, max_bytes=1)  # one group per node
    other = fisher_curvature(model, graph, ds, loss, nodes, k=4, seed=3)
    for n in nodes:
        a, b = one[n.name], split[n.name]
        assert a.eigenvalues.tobytes() == b.eigenvalues.tobytes() and a.eigenvectors.tobytes() == b.eigenvectors.tobytes()
        assert a.k == 4 and a.source == "fisher" and a.shape == tuple(n.weight_shape)
    assert any(one[n.name].trace != other[n.name].trace for n in nodes)


def test_language_model_and_fidelity_losses_draw_labels_over_their_own_positions():
    gen = torch.Generator().manual_seed(0)
    lm = make_loss("lm", "logits")
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, -100, 4], [0, 6, 5, 4, 3]])
    s, c = lm.fisher_terms(logits, ids, gen)
    assert c == lm.terms(logits, ids)[1] == 7   # ignored position skipped, last position predicts nothing
    (g,) = torch.autograd.grad(s, [logits])
    assert torch.all(g[:, -1] == 0) and torch.all(g[0, 2] == 0) and torch.any(g[0, 3] != 0)
    from llc_onnx.calib.losses import fidelity_loss_for

    fid = fidelity_loss_for("ce", "y", 2)
    out = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s, c = fid.fisher_terms(out, out.detach(), gen)
    assert c == fid.terms(out, out.detach())[1] == 4
    (g,) = torch.autograd.grad(s, [out])
    np.testing.assert_allclose(g.sum(dim=1).numpy(), 0, atol=1e-12)  # softmax − one-hot rows sum to 0


# ------------------------------------------------------------------------- traces only (the HAWQ-V2 baseline's GN)
def test_fisher_traces_are_the_row_norms_of_sample_gradients_with_their_standard_error():
    from llc_onnx.calib.fisher import fisher_traces

    model, nodes, graph, loss, ds = _setup((5, 4, 6))
    rows = sample_gradients(model, graph, ds, loss, nodes, seed=4)
    got = fisher_traces(model, graph, ds, loss, nodes, seed=4)
    for n in nodes:
        a = (rows[n.name].rows.astype(np.float64) ** 2).sum(1)
        t = got[n.name]
        assert t.samples == 15 and t.count == 15 and t.sampled
        assert t.trace == pytest.approx(a.sum() / 15, rel=1e-5) and t.trace >= 0
        assert t.se == pytest.approx(np.sqrt(15) * a.std(ddof=1) / 15, rel=1e-4)
    # clustered data: a cluster's sum is the unit of the standard error (three clusters of five)
    grouped = Dataset([Batch(b.inputs, b.labels, np.arange(i, i + b.size) // 5)
                       for b, i in zip(ds.batches, (0, 5, 9))], "grouped")
    cl = fisher_traces(model, graph, grouped, loss, nodes, seed=4)
    for n in nodes:
        a = (rows[n.name].rows.astype(np.float64) ** 2).sum(1)
        c = np.array([a[:5].sum(), a[5:10].sum(), a[10:].sum()])
        assert cl[n.name].samples == 3 and cl[n.name].trace == pytest.approx(got[n.name].trace, rel=1e-12)
        assert cl[n.name].se == pytest.approx(np.sqrt(3) * c.std(ddof=1) / 15, rel=1e-4)
    # the data's labels (mse: no model-drawn labels) are the same every draw: one backward, the same numbers
    mse, mds = make_loss("mse", "y"), _data("mse", sizes=(5, 4))
    one = fisher_traces(model, graph, mds, mse, nodes, draws=1)
    three = fisher_traces(model, graph, mds, mse, nodes, draws=3)
    assert all(three[k].draws == 1 and not three[k].sampled and three[k].trace == one[k].trace for k in one)


def _weight(graph, node, x) -> torch.Tensor:
    """The weight tensor ``node`` runs with (read through its weight hook)."""
    seen = {}

    def keep(w):
        seen["w"] = w.detach().clone()
        return w
    graph.run({"x": x}, weight_fns={node: keep}, outputs=["y"])
    return seen["w"]


def test_fisher_traces_estimate_the_gauss_newton_trace_of_every_node():
    """tr(GGN_ii) = (1/N) Σ_s tr(J_sᵀ (diag p_s − p_s p_sᵀ) J_s), J_s = ∂logits_s/∂W_i (autograd Jacobian): the
    sampled-label estimate lands within 4 standard errors of it for every layout, and the errors are small."""
    from llc_onnx.calib.fisher import fisher_traces

    model = _model()
    nodes, _ = find_compressible(model)
    graph = TorchGraph(model, dtype=torch.float64)
    loss = make_loss("ce", "y")
    rng = np.random.default_rng(11)
    base = rng.normal(size=(4, 2, 6, 6))
    x = np.repeat(base, 400, axis=0)
    ds = Dataset([Batch({"x": x[i:i + 400]}, np.zeros(400, np.int64)) for i in range(0, len(x), 400)], "rep")
    got = fisher_traces(model, graph, ds, loss, nodes, seed=7)
    got4 = fisher_traces(model, graph, ds, loss, nodes, seed=7, draws=4)
    xt = torch.as_tensor(base)
    p = torch.softmax(graph.run({"x": xt}, outputs=["y"])[0]["y"], dim=1).numpy()
    for n in nodes:
        exact = 0.0
        w = _weight(graph, n.name, xt[:1])
        assert w.shape == tuple(n.weight_shape)
        for s in range(4):
            def f(w, s=s):
                return graph.run({"x": xt[s:s + 1]}, weight_fns={n.name: lambda _w: w}, outputs=["y"])[0]["y"][0]
            J = torch.autograd.functional.jacobian(f, w).reshape(2, -1).numpy()
            A = np.diag(p[s]) - np.outer(p[s], p[s])
            exact += float(np.trace(J.T @ A @ J)) / 4
        t = got[n.name]
        if n.name == "depthwise_m2":   # adds the same value to both logits: softmax ignores it, no curvature
            assert exact < 1e-15 and t.trace < 1e-15
            continue
        assert abs(t.trace - exact) <= 4 * t.se, (n.name, t, exact)
        assert t.se <= 0.1 * exact, (n.name, t, exact)
        t4 = got4[n.name]                      # four label draws per sample: the same trace
        assert t4.draws == 4 and abs(t4.trace - exact) <= 4 * t4.se, (n.name, t4, exact)
    # one input repeated: the whole spread is the drawn labels', so four draws per sample halve the SE
    one = Dataset([Batch({"x": np.repeat(base[:1], 400, axis=0)}, np.zeros(400, np.int64))], "one")
    s1 = fisher_traces(model, graph, one, loss, nodes, seed=7)
    s4 = fisher_traces(model, graph, one, loss, nodes, seed=7, draws=4)
    for n in nodes[:-1]:
        assert 0.35 < s4[n.name].se / s1[n.name].se < 0.65, (n.name, s1[n.name], s4[n.name])
        assert abs(s4[n.name].trace - s1[n.name].trace) <= 4 * s1[n.name].se
