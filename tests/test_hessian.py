"""Second-order analysis on the ONNX graph (llc_onnx.solvers.hessian) against explicit Hessians.

Tiny models are built with onnx.helper (an MLP with MatMul + Gemm, a CNN with Conv + MatMul); a pure-torch
re-implementation of the same model computes the same mean CE loss over all batches, and
torch.autograd.functional.hessian on it gives the exact Hessian over the flattened weights (float64).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.calib.gradients import collect_gradients
from llc_onnx.calib.losses import make_loss
from llc_onnx.calib.noise import measure_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.errors import LLCError
from llc_onnx.solvers.hessian import HessianError, hutchinson_trace, hvp, lanczos_top, quadratic_term

OPSET = 21


# --------------------------------------------------------------------------------------------------
# tiny models: ONNX graph + the same computation in torch
# --------------------------------------------------------------------------------------------------


def _model(nodes, inits, x_shape, out_dim) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *x_shape])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", out_dim])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


class Tiny:
    """model (ONNX), weights {initializer: float64 array}, node -> initializer, forward(ws, x) in torch."""

    def __init__(self, model, params, node_w, forward, x_shape, classes):
        self.model, self.params, self.node_w, self.forward = model, params, node_w, forward
        self.x_shape, self.classes = x_shape, classes
        self.nodes = list(node_w)


def mlp() -> Tiny:
    """x[B,4] -MatMul W1[4,6]- +b1 - Tanh - Gemm(W2[3,6], transB) + b2 -> [B,3]; 24 + 18 = 42 weights."""
    rng = np.random.default_rng(1)
    p = {"W1": rng.normal(0, 0.8, (4, 6)), "b1": rng.normal(0, 0.3, 6),
         "W2": rng.normal(0, 0.8, (3, 6)), "b2": rng.normal(0, 0.3, 3)}
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Tanh", ["h1"], ["h2"], name="act"),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["out"], name="fc2", transB=1),
    ]

    def forward(w, x):
        h = torch.tanh(x @ w["W1"] + torch.as_tensor(p["b1"]))
        return h @ w["W2"].T + torch.as_tensor(p["b2"])

    return Tiny(_model(nodes, p, (4,), 3), p, {"fc1": "W1", "fc2": "W2"}, forward, (4,), 3)


def cnn() -> Tiny:
    """x[B,1,5,5] -Conv Wc[2,1,3,3]- +bias - Tanh - Flatten - MatMul Wf[18,2] -> [B,2]; 18 + 36 = 54 weights."""
    rng = np.random.default_rng(2)
    p = {"Wc": rng.normal(0, 0.6, (2, 1, 3, 3)), "bc": rng.normal(0, 0.2, 2), "Wf": rng.normal(0, 0.5, (18, 2))}
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Tanh", ["c"], ["a"], name="act"),
        helper.make_node("Flatten", ["a"], ["f"], name="flat", axis=1),
        helper.make_node("MatMul", ["f", "Wf"], ["out"], name="fc"),
    ]

    def forward(w, x):
        c = F.conv2d(x, w["Wc"], torch.as_tensor(p["bc"]))
        return torch.tanh(c).flatten(1) @ w["Wf"]

    return Tiny(_model(nodes, p, (1, 5, 5), 2), p, {"conv": "Wc", "fc": "Wf"}, forward, (1, 5, 5), 2)


def dataset(t: Tiny, sizes=(5, 3, 4), seed=0) -> Dataset:
    """Uneven batches; one ignored label (-100) so that counts differ from batch sizes."""
    rng = np.random.default_rng(seed)
    batches = []
    for i, b in enumerate(sizes):
        x = rng.normal(0, 1, (b, *t.x_shape)).astype(np.float32)
        y = rng.integers(0, t.classes, b).astype(np.int64)
        if i == 1:
            y[0] = -100
        batches.append(Batch(inputs={"x": x}, labels=y))
    return Dataset(batches, source="test")


def reference(t: Tiny, ds: Dataset, nodes):
    """(L(w), flat -> L, explicit Hessian, shapes) over the weights of ``nodes`` (in that order), float64."""
    inits = [t.node_w[n] for n in nodes]
    shapes = [t.params[w].shape for w in inits]
    sizes = [int(np.prod(s)) for s in shapes]
    xs = [torch.as_tensor(b.inputs["x"], dtype=torch.float64) for b in ds.batches]
    ys = [torch.as_tensor(b.labels) for b in ds.batches]

    def loss(flat):
        w = {k: torch.as_tensor(v) for k, v in t.params.items()}
        for name, part, shape in zip(inits, torch.split(flat, sizes), shapes):
            w[name] = part.reshape(shape)
        s = sum(F.cross_entropy(t.forward(w, x), y, reduction="sum", ignore_index=-100) for x, y in zip(xs, ys))
        n = sum(int((y != -100).sum()) for y in ys)
        return s / n

    flat0 = torch.cat([torch.as_tensor(t.params[w]).reshape(-1) for w in inits])
    H = torch.autograd.functional.hessian(loss, flat0, vectorize=True).numpy()
    return loss, flat0, H, shapes, sizes


def flatten(d, nodes):
    return np.concatenate([np.asarray(d[n], dtype=np.float64).reshape(-1) for n in nodes])


def unflatten(x, nodes, shapes, sizes):
    return {n: torch.as_tensor(p.reshape(s)) for n, p, s in zip(nodes, np.split(x, np.cumsum(sizes)[:-1]), shapes)}


def setup(kind):
    t = mlp() if kind == "mlp" else cnn()
    ds = dataset(t)
    g = TorchGraph(t.model, dtype=torch.float64)
    return t, ds, g, make_loss("ce", "out")


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hvp_equals_explicit_hessian_times_v(kind):
    t, ds, g, loss = setup(kind)
    _, _, H, shapes, sizes = reference(t, ds, t.nodes)
    rng = np.random.default_rng(3)
    for _ in range(2):
        v = rng.normal(size=H.shape[0])
        hv = hvp(g, ds, loss, t.nodes, unflatten(v, t.nodes, shapes, sizes))
        assert all(hv[n].dtype == torch.float64 and tuple(hv[n].shape) == s for n, s in zip(t.nodes, shapes))
        ref = H @ v
        got = flatten(hv, t.nodes)
        assert np.linalg.norm(got - ref) <= 1e-8 * np.linalg.norm(ref)
    # v only on the first node: parts of both nodes are the first block column H[:, block 0] v_0
    # (cross terms included); with nodes=[first] only the diagonal block H_00 v_0
    v0 = np.zeros(H.shape[0])
    v0[: sizes[0]] = rng.normal(size=sizes[0])
    hv = hvp(g, ds, loss, t.nodes, {t.nodes[0]: v0[: sizes[0]].reshape(shapes[0])})
    ref = H @ v0
    assert np.linalg.norm(flatten(hv, t.nodes) - ref) <= 1e-8 * np.linalg.norm(ref)
    assert np.linalg.norm(ref[sizes[0]:]) > 1e-3 * np.linalg.norm(ref)  # the cross block is really there
    alone = hvp(g, ds, loss, [t.nodes[0]], {t.nodes[0]: v0[: sizes[0]].reshape(shapes[0])})
    np.testing.assert_allclose(flatten(alone, t.nodes[:1]), ref[: sizes[0]], rtol=1e-8, atol=1e-12)


def test_hvp_float32_graph_and_bad_vectors():
    t, ds, g64, loss = setup("mlp")
    g32 = TorchGraph(t.model)
    rng = np.random.default_rng(4)
    v = {"fc1": rng.normal(size=(4, 6)), "fc2": rng.normal(size=(3, 6))}
    a, b = hvp(g64, ds, loss, t.nodes, v), hvp(g32, ds, loss, t.nodes, v)
    for n in t.nodes:
        assert b[n].dtype == torch.float64
        np.testing.assert_allclose(b[n].numpy(), a[n].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(LLCError, match="not among the nodes") as exc:
        hvp(g64, ds, loss, ["fc1"], v)
    assert "\n" not in str(exc.value) and isinstance(exc.value, HessianError)
    with pytest.raises(LLCError, match="shape"):
        hvp(g64, ds, loss, t.nodes, {"fc1": np.zeros((6, 4))})
    with pytest.raises(LLCError, match="n_samples=0 must be >= 1"):
        hutchinson_trace(g64, ds, loss, t.nodes, n_samples=0)
    with pytest.raises(LLCError, match="no batches"):
        hvp(g64, Dataset([], source="empty.npz"), loss, t.nodes, v)


def test_quadratic_term_and_compressible_nodes():
    t, ds, g, loss = setup("cnn")
    nodes, _ = find_compressible(t.model)
    assert [n.name for n in nodes] == t.nodes
    for i, node in enumerate(nodes):
        _, _, H, shapes, sizes = reference(t, ds, [node.name])
        d = np.random.default_rng(5 + i).normal(size=shapes[0]) * 0.1
        q = quadratic_term(g, ds, loss, node, d)  # a CompressibleNode works as well as a name
        ref = 0.5 * d.reshape(-1) @ H @ d.reshape(-1)
        assert abs(q - ref) <= 1e-8 * abs(ref)
        assert quadratic_term(g, ds, loss, node.name, torch.as_tensor(d)) == pytest.approx(q, rel=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_taylor_second_order_is_third_order_accurate(kind):
    """L(W + εδ) − L(W) − (ε g·δ + ½ε² δᵀHδ) shrinks like ε³ (δ on both nodes: cross terms matter)."""
    t, ds, g, loss = setup(kind)
    nodes, _ = find_compressible(t.model)
    names = [n.name for n in nodes]
    grads = collect_gradients(g, ds, loss, nodes)
    base = measure_loss(g, ds, loss)
    rng = np.random.default_rng(6)
    delta = {n.name: rng.normal(size=n.weight_shape) for n in nodes}
    norm = np.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
    delta = {k: v / norm for k, v in delta.items()}
    hd = hvp(g, ds, loss, names, delta)
    lin = sum(float((grads.nodes[n].grad_w * delta[n]).sum()) for n in names)
    quad = 0.5 * sum(float((hd[n].numpy() * delta[n]).sum()) for n in names)
    errs, errs1 = [], []
    for eps in (0.2, 0.1, 0.05, 0.025):
        fns = {n: (lambda w, d=torch.as_tensor(delta[n]) * eps: w + d.to(w.dtype)) for n in names}
        dl = measure_loss(g, ds, loss, weight_fns=fns) - base
        errs.append(abs(dl - eps * lin - eps ** 2 * quad))
        errs1.append(abs(dl - eps * lin))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(6.0 < r < 10.0 for r in ratios), (errs, ratios)  # ~8 = 2³
    assert all(e2 < 0.2 * e1 for e2, e1 in zip(errs, errs1))  # the quadratic term is what was missing


def test_hutchinson_matches_exact_trace_and_is_deterministic():
    t, ds, g, loss = setup("mlp")
    _, _, H, _, sizes = reference(t, ds, t.nodes)
    blocks = np.split(np.arange(H.shape[0]), np.cumsum(sizes)[:-1])
    K = 200
    for per_node in (False, True):
        est = hutchinson_trace(g, ds, loss, t.nodes, n_samples=K, seed=1, per_node=per_node)
        for n, idx in zip(t.nodes, blocks):
            A = H[np.ix_(idx, idx)]
            exact = float(np.trace(A))
            # Rademacher: Var(vᵀAv) = 2(‖A‖_F² − Σ A_ii²); joint probes add Var(v_iᵀ H_ij v_j) = ‖H_ij‖_F²
            var = 2 * (float((A ** 2).sum()) - float((np.diag(A) ** 2).sum()))
            if not per_node:
                rest = np.setdiff1d(np.arange(H.shape[0]), idx)
                var += float((H[np.ix_(idx, rest)] ** 2).sum())
            tr, se = est[n]
            assert abs(tr - exact) <= 3 * se + 1e-10, (per_node, n, tr, se, exact)
            assert 0.75 < se / np.sqrt(var / K) < 1.25, (per_node, n, se, np.sqrt(var / K))
    a = hutchinson_trace(g, ds, loss, t.nodes, n_samples=5, seed=7)
    b = hutchinson_trace(g, ds, loss, t.nodes, n_samples=5, seed=7)
    c = hutchinson_trace(g, ds, loss, t.nodes, n_samples=5, seed=8)
    assert a == b
    assert a != c
    # max_batches: the estimate over the first batch only equals the estimate on a dataset of that batch
    one = Dataset(ds.batches[:1], source="test")
    assert hutchinson_trace(g, ds, loss, t.nodes, n_samples=3, max_batches=1) == \
        hutchinson_trace(g, one, loss, t.nodes, n_samples=3)


def test_hutchinson_per_node_probe_is_exact_quadratic_form():
    """With one probe, per-node mode gives v_iᵀ H_ii v_i; joint mode adds the cross term v_iᵀ H_ij v_j."""
    t, ds, g, loss = setup("mlp")
    _, _, H, shapes, sizes = reference(t, ds, t.nodes)
    # the probe of seed s, sample 0, regenerated the way the module documents: Rademacher per node in order
    gen = torch.Generator().manual_seed(11 * 1_000_003)
    v = [(torch.randint(0, 2, s, generator=gen, dtype=torch.int8).double() * 2 - 1).numpy().reshape(-1) for s in shapes]
    s0 = sizes[0]
    H00, H01, H11 = H[:s0, :s0], H[:s0, s0:], H[s0:, s0:]
    sep = hutchinson_trace(g, ds, loss, t.nodes, n_samples=1, seed=11, per_node=True)
    joint = hutchinson_trace(g, ds, loss, t.nodes, n_samples=1, seed=11)
    assert sep["fc1"][0] == pytest.approx(v[0] @ H00 @ v[0], rel=1e-9)
    assert sep["fc2"][0] == pytest.approx(v[1] @ H11 @ v[1], rel=1e-9)
    assert joint["fc1"][0] == pytest.approx(v[0] @ H00 @ v[0] + v[0] @ H01 @ v[1], rel=1e-9)
    assert joint["fc2"][0] == pytest.approx(v[1] @ H11 @ v[1] + v[1] @ H01.T @ v[0], rel=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_lanczos_top_eigenpairs(kind):
    t, ds, g, loss = setup(kind)
    nodes = t.nodes
    _, _, H, shapes, sizes = reference(t, ds, nodes)
    dim = H.shape[0]
    ref = np.linalg.eigvalsh(H)[::-1]
    top = lanczos_top(g, ds, loss, nodes, k=4, iters=20, seed=0)
    assert len(top) == 4
    vals = np.array([v for v, _ in top])
    assert np.all(np.diff(vals) <= 0)
    np.testing.assert_allclose(vals, ref[:4], rtol=1e-6)
    for val, vec in top[:2]:
        x = flatten(vec, nodes)
        assert np.linalg.norm(x) == pytest.approx(1.0, rel=1e-10)
        assert np.linalg.norm(H @ x - val * x) <= 1e-4 * abs(val)
    assert lanczos_top(g, ds, loss, nodes, k=2, iters=20, seed=0)[0][0] == top[0][0]  # deterministic
    assert dim <= 60
