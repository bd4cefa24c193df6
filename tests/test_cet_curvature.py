"""Per-node CET curvature (llc_onnx.solvers.cet, hessian.node_lanczos / block_hvp) against explicit Hessians.

The tiny tanh models of test_hessian (an MLP and a CNN with random, untrained weights: away from a minimum,
so the first layer's block H_11 is indefinite — a saddle) and their explicit Hessians from
torch.autograd.functional.hessian on a pure-torch copy of the model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llc_onnx.errors import LLCError
from llc_onnx.solvers.cet import NodeCurvature, cet_predict, load_curvature, node_curvature, save_curvature
from llc_onnx.solvers.hessian import (FirstDerivatives, HessianError, block_hvp, deflated_trace, hutchinson_trace, hvp,
                                      lanczos_top, node_lanczos)
from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.interpreter import TorchGraph
from onnx import helper
from test_hessian import _model, reference, setup


def _block(t, ds, node):
    _, _, H, shapes, _ = reference(t, ds, [node])
    return H, shapes[0]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_block_hvp_is_the_diagonal_block_for_every_node_in_one_pass(kind):
    t, ds, g, loss = setup(kind)
    rng = np.random.default_rng(0)
    vecs = {}
    for n in t.nodes:
        H, shape = _block(t, ds, n)
        vecs[n] = (H, [rng.normal(size=shape) for _ in range(2)])
    got = block_hvp(g, ds, loss, {n: v for n, (_, v) in vecs.items()})
    kept = FirstDerivatives(g, ds, loss, t.nodes)
    again = block_hvp(g, ds, loss, {n: v for n, (_, v) in vecs.items()}, kept=kept)
    for n, (H, vs) in vecs.items():
        for h, h2, v in zip(got[n], again[n], vs):
            ref = H @ v.reshape(-1)
            assert np.linalg.norm(h.numpy().reshape(-1) - ref) <= 1e-9 * np.linalg.norm(ref)
            assert torch.equal(h, h2)  # kept first derivatives: the same numbers
    # one node's block product alone equals hvp(nodes=[that node]) (no cross block)
    n = t.nodes[0]
    alone = hvp(g, ds, loss, [n], {n: vecs[n][1][0]})[n]
    np.testing.assert_allclose(got[n][0].numpy(), alone.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_node_eigenpairs_match_eigh_of_the_block_including_negative_ones(kind):
    t, ds, g, loss = setup(kind)
    curv = node_curvature(g, ds, loss, t.nodes, k=4, k_negative=3, iters=60)  # iters ≥ n: Krylov space exhausted
    saddles = 0
    for n in t.nodes:
        H, shape = _block(t, ds, n)
        lam, U = np.linalg.eigh(H)
        c = curv[n]
        assert c.shape == shape and c.n == H.shape[0]
        assert c.eigenvectors.dtype == np.float32 and c.eigenvectors.shape == (c.k, c.n)
        top = lam[::-1][:4]
        np.testing.assert_allclose(c.eigenvalues[:4], top, rtol=1e-8, atol=1e-10)
        neg = lam[lam < -1e-8 * abs(lam).max()][:3]
        np.testing.assert_allclose(c.eigenvalues[4:], neg[::-1], rtol=1e-8)  # most negative last
        assert np.all(np.diff(c.eigenvalues) <= 0)
        saddles += len(neg) > 0
        V = c.eigenvectors.astype(np.float64)
        np.testing.assert_allclose(V @ V.T, np.eye(c.k), atol=1e-6)
        for val, v in zip(c.eigenvalues, V):  # true eigenvectors (up to float32 storage)
            assert np.linalg.norm(H @ v - val * v) <= 1e-5 * abs(lam).max()
        assert c.trace == pytest.approx(np.trace(H), rel=1e-9, abs=1e-12)
        if c.steps == c.n:  # the basis spans everything: tr T = tr H exactly, no probes
            assert c.trace_se == 0.0 and c.probes == 0
        else:  # an invariant Krylov space of a rank-deficient block: probes confirm the rest is 0
            assert c.probes == 8 and c.trace_se <= 1e-12 * abs(np.trace(H))
        assert c.remainder == pytest.approx((np.trace(H) - c.eigenvalues.sum()) / (c.n - c.k), rel=1e-7, abs=1e-12)
    assert saddles >= 1  # the first (tanh) layer of an untrained net is indefinite


def test_lock_step_equals_per_node_lanczos():
    t, ds, g, loss = setup("cnn")
    together = node_curvature(g, ds, loss, t.nodes, k=3, k_negative=2, iters=12, probes=4, seed=3)
    kept = node_curvature(g, ds, loss, t.nodes, k=3, k_negative=2, iters=12, probes=4, seed=3, keep_graphs=True)
    grouped = node_curvature(g, ds, loss, t.nodes, k=3, k_negative=2, iters=12, probes=4, seed=3, max_basis_bytes=1)
    for n in t.nodes:
        alone = node_curvature(g, ds, loss, [n], k=3, k_negative=2, iters=12, probes=4, seed=3)[n]
        for other in (together[n], kept[n], grouped[n]):
            np.testing.assert_allclose(other.eigenvalues, alone.eigenvalues, rtol=1e-10)
            np.testing.assert_allclose(other.eigenvectors, alone.eigenvectors, atol=1e-6)
            assert other.trace == pytest.approx(alone.trace, rel=1e-10)
            assert other.steps == alone.steps == 12
    # the lock-step Lanczos of a node is Lanczos on its own block: the same top eigenvalues as lanczos_top
    # run on that node alone (its H is then H_ii), from another start vector; both converged at 30 steps
    runs = node_lanczos(g, ds, loss, t.nodes, iters=30, seed=0)
    for n in t.nodes:
        H, _ = _block(t, ds, n)
        ref = np.linalg.eigvalsh(H)[::-1][:2]
        single = [v for v, _ in lanczos_top(g, ds, loss, [n], k=2, iters=30, seed=5)]
        mine = np.sort(runs[n].values)[::-1][:2]
        np.testing.assert_allclose(mine, single, rtol=1e-7)
        np.testing.assert_allclose(mine, ref, rtol=1e-7)


def test_unconverged_run_trace_by_deflated_probes():
    """iters < n: the top values converge first; the trace is tr(T) + a deflated Hutchinson estimate whose
    error is within its SE and whose SE is below plain per-node Hutchinson's with the same probes."""
    t, ds, g, loss = setup("mlp")
    n = "fc1"  # 24 weights, full rank, indefinite
    H, _ = _block(t, ds, n)
    lam = np.linalg.eigvalsh(H)[::-1]
    c = node_curvature(g, ds, loss, [n], k=2, k_negative=0, iters=14, probes=64, seed=1)[n]
    assert c.steps == 14 and c.probes == 64
    np.testing.assert_allclose(c.eigenvalues, lam[:2], rtol=1e-5)
    assert np.all(c.residuals < 1e-3 * lam[0])
    exact = float(np.trace(H))
    assert 0 < c.trace_se and abs(c.trace - exact) <= 4 * c.trace_se
    plain = hutchinson_trace(g, ds, loss, [n], n_samples=64, seed=1, per_node=True)[n]
    assert c.trace_se < 0.5 * plain[1]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_deflated_trace_is_unbiased_and_beats_plain_hutchinson(kind):
    """tr(T) + deflated probes: within its SE of the exact tr(H_ii), an SE below plain per-node Hutchinson's at
    the same number of Hessian-vector products, deterministic and independent of the other nodes."""
    t, ds, g, loss = setup(kind)
    est = deflated_trace(g, ds, loss, t.nodes, steps=6, probes=8, max_probes=64, rel_se=1e-9, seed=3)
    for n in t.nodes:
        H, _ = _block(t, ds, n)
        e = est[n]
        exact = float(np.trace(H))
        assert e.steps == 6 and e.probes == 64 and not e.exact  # rel_se unreachable: every round used
        assert 0 < e.se and abs(e.trace - exact) <= 4 * e.se, (n, e, exact)
        # the Krylov part is tr(QᵀHQ) for an orthonormal Q: between the sums of the 6 smallest and largest λ
        lam = np.sort(np.linalg.eigvalsh(H))
        assert lam[:6].sum() - 1e-9 <= e.krylov <= lam[-6:].sum() + 1e-9
        # plain per-node Hutchinson with the same 70 products: SE = sqrt(2(‖H‖_F² − Σ H_jj²) / 70)
        plain = np.sqrt(2 * (float((H ** 2).sum()) - float((np.diag(H) ** 2).sum())) / 70)
        assert e.se < 0.7 * plain, (n, e.se, plain)
    again = deflated_trace(g, ds, loss, t.nodes, steps=6, probes=8, max_probes=64, rel_se=1e-9, seed=3)
    assert again == est
    alone = deflated_trace(g, ds, loss, t.nodes[1:], steps=6, probes=8, max_probes=64, rel_se=1e-9, seed=3)
    assert alone[t.nodes[1]] == est[t.nodes[1]]
    other = deflated_trace(g, ds, loss, t.nodes, steps=6, probes=8, max_probes=64, rel_se=1e-9, seed=4)
    assert other != est
    # a reachable target stops after the first round; a basis spanning all n weights is exact (no probes);
    # a rank-deficient block's Krylov space turns invariant earlier and one round of probes finds the rest 0
    loose = deflated_trace(g, ds, loss, t.nodes, steps=6, probes=8, max_probes=64, rel_se=1e9, seed=3)
    assert all(e.probes == 8 for e in loose.values())
    whole = deflated_trace(g, ds, loss, t.nodes, steps=60, probes=8, rel_se=0.1)
    for n in t.nodes:
        H, _ = _block(t, ds, n)
        e = whole[n]
        assert e.trace == pytest.approx(float(np.trace(H)), rel=1e-9)
        if e.steps == H.shape[0]:
            assert e.exact and e.probes == 0 and e.se == 0
        else:
            assert not e.exact and e.probes == 8 and e.se <= 1e-12 * abs(e.trace)
    assert any(whole[n].exact for n in t.nodes)


def _linear_mse():
    """x[B,4] MatMul W[4,3] -> out under MSE: H = (2/M)·(XᵀX ⊗ I_3), M = 3·N — each eigenvalue three times;
    returns (graph, data, loss, tr H = 2‖X‖_F² / N)."""
    rng = np.random.default_rng(5)
    W = rng.normal(0, 0.5, (4, 3))
    model = _model([helper.make_node("MatMul", ["x", "W"], ["out"], name="fc")], {"W": W}, (4,), 3)
    batches = [Batch(inputs={"x": rng.normal(0, 1, (b, 4)).astype(np.float32)},
                     labels=rng.normal(0, 1, (b, 3)).astype(np.float32)) for b in (5, 6)]
    ds = Dataset(batches, source="test")
    X = np.concatenate([b.inputs["x"] for b in batches]).astype(np.float64)
    return TorchGraph(model, dtype=torch.float64), ds, make_loss("mse", "out"), 2 * float((X * X).sum()) / len(X)


def test_an_invariant_krylov_space_is_not_the_whole_trace():
    """A repeated eigenvalue makes the Krylov space invariant after as many steps as there are distinct
    eigenvalues (4 of 12 here), where tr(T) is a third of tr(H): the rest comes from the probes, in both
    deflated_trace and node_curvature (which used to call that trace exact)."""
    g, ds, loss, exact = _linear_mse()
    e = deflated_trace(g, ds, loss, ["fc"], steps=12, probes=16, max_probes=16, rel_se=1e-9)["fc"]
    assert e.steps == 4 and not e.exact and e.probes == 16
    assert e.krylov == pytest.approx(exact / 3, rel=1e-9)
    assert abs(e.trace - exact) <= 4 * e.se + 1e-9 * exact and e.trace > 0.8 * exact
    c = node_curvature(g, ds, loss, ["fc"], k=2, k_negative=0, iters=12, probes=16)["fc"]
    assert c.steps == 4 and c.probes == 16
    assert abs(c.trace - exact) <= 4 * c.trace_se + 1e-9 * exact and c.trace > 0.8 * exact


def test_cet_prediction_exact_with_all_eigenpairs_and_a_trace_model_otherwise():
    t, ds, g, loss = setup("mlp")
    n = "fc2"  # 18 weights, Gauss-Newton-like PSD block (CE on logits linear in W2)
    H, shape = _block(t, ds, n)
    rng = np.random.default_rng(2)
    deltas = rng.normal(size=(5, *shape)) * 0.05
    grad = rng.normal(size=shape)
    exact = np.array([0.5 * d.reshape(-1) @ H @ d.reshape(-1) for d in deltas])
    # k = n: every eigenpair kept, the model is ½δᵀHδ itself (float32 eigenvectors)
    lam, U = np.linalg.eigh(H)
    full = NodeCurvature(n, shape, lam[::-1].copy(), U[:, ::-1].T.astype(np.float32), np.zeros(18),
                         float(np.trace(H)), 0.0, 18, 0)
    p = cet_predict(full, deltas, grad=grad)
    np.testing.assert_allclose(p.second_order, exact, rtol=2e-6)
    np.testing.assert_allclose(p.first_order, deltas.reshape(5, -1) @ grad.reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(p.total, p.first_order + exact, rtol=2e-6)
    assert np.all(p.remainder == 0)
    # from the graph with k < n: exact on span(V), and the trace-based remainder sums to ½ tr(H) over any
    # orthonormal basis of errors (here the unit vectors, one per weight, vectorised in one call)
    c = node_curvature(g, ds, loss, [n], k=3, k_negative=0, iters=40)[n]
    V = c.eigenvectors.astype(np.float64)
    inside = (np.array([1.0, -2.0, 0.5]) @ V).reshape(shape) * 0.1
    assert cet_predict(c, inside).second_order[0] == pytest.approx(0.5 * inside.reshape(-1) @ H @ inside.reshape(-1),
                                                                    rel=1e-5)
    units = np.eye(18).reshape(18, *shape)
    assert cet_predict(c, units).second_order.sum() == pytest.approx(0.5 * np.trace(H), rel=1e-6)
    # a list of weight-shaped errors and one error alone give the same numbers
    as_list = cet_predict(c, list(deltas))
    one = cet_predict(c, deltas[1])
    assert one.total.shape == (1,) and one.total[0] == pytest.approx(as_list.total[1], rel=1e-12)
    # and for generic errors the model is close to the exact quadratic form
    np.testing.assert_allclose(as_list.second_order, exact, rtol=0.5)


def test_curvature_round_trips_through_npz_and_rejects_damage(tmp_path):
    t, ds, g, loss = setup("mlp")
    curv = node_curvature(g, ds, loss, t.nodes, k=3, k_negative=2, iters=10, probes=3)
    path = str(tmp_path / "curv.npz")
    save_curvature(path, curv)
    back = load_curvature(path)
    assert list(back) == list(curv)
    for n in curv:
        a, b = curv[n], back[n]
        assert (a.node, a.shape, a.trace, a.trace_se, a.steps, a.probes) == (b.node, b.shape, b.trace, b.trace_se,
                                                                              b.steps, b.probes)
        for f in ("eigenvalues", "eigenvectors", "residuals"):
            assert np.array_equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype
    again = str(tmp_path / "again.npz")
    save_curvature(again, node_curvature(g, ds, loss, t.nodes, k=3, k_negative=2, iters=10, probes=3))
    assert open(path, "rb").read() == open(again, "rb").read()  # same inputs and seed: same bytes
    # embedded in another npz under a prefix
    arrays = {"other": np.arange(3), **curv["fc1"].to_arrays("cet_fc1_")}
    np.savez(tmp_path / "mixed.npz", **arrays)
    with np.load(tmp_path / "mixed.npz", allow_pickle=False) as z:
        assert np.array_equal(NodeCurvature.from_arrays(z, "cet_fc1_").eigenvectors, curv["fc1"].eigenvectors)
    (tmp_path / "bad.npz").write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(LLCError, match="bad.npz: unreadable curvature file") as exc:
        load_curvature(str(tmp_path / "bad.npz"))
    assert "\n" not in str(exc.value)
    with pytest.raises(LLCError, match="no such curvature file"):
        load_curvature(str(tmp_path / "missing.npz"))


def test_bad_input_is_one_line_llc_error():
    t, ds, g, loss = setup("mlp")
    for call, match in [
        (lambda: node_curvature(g, ds, loss, t.nodes, k=0), "use k >= 1"),
        (lambda: node_curvature(g, ds, loss, t.nodes, k=8, iters=4), "iters=4 < k=8"),
        (lambda: node_lanczos(g, ds, loss, t.nodes, iters=0), "iters=0"),
        (lambda: block_hvp(g, ds, loss, {"fc1": [np.zeros((6, 4))]}), "shape"),
        (lambda: block_hvp(g, ds, loss, {"fc1": [np.zeros((4, 6))]}, kept=FirstDerivatives(g, ds, loss, ["fc2"])),
         "kept first derivatives"),
        (lambda: node_curvature(g, ds, loss, t.nodes, max_batches=0), "no batches"),
    ]:
        with pytest.raises(HessianError, match=match) as exc:
            call()
        assert isinstance(exc.value, LLCError) and isinstance(exc.value, ValueError)
        assert "\n" not in str(exc.value) and ";" in str(exc.value)
    c = node_curvature(g, ds, loss, ["fc1"], k=2, iters=6)["fc1"]
    with pytest.raises(LLCError, match="errors of shape"):
        cet_predict(c, np.zeros((2, 6, 4)))
    with pytest.raises(LLCError, match="gradient of shape"):
        cet_predict(c, np.zeros((4, 6)), grad=np.zeros(3))
