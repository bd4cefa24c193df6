"""Second-order (curvature) analysis of the calibration loss on the ONNX graph.

All quantities are for the mean calibration loss used everywhere else in llc-onnx,

    L(W) = (Σ_b S_b(W)) / (Σ_b n_b),

with S_b the summed loss of batch b and n_b its number of loss terms (:meth:`TaskLoss.terms`). The variables
are the weights of the chosen nodes *as used by each node*: the interpreter's node-local aliases (``capture``
in :meth:`TorchGraph.run`), exactly as :func:`llc_onnx.calib.gradients.collect_gradients` takes first
derivatives. A shared initializer therefore counts as one independent variable per node that uses it.

Write w = (w_1, ..., w_m) for the flattened weights of the chosen nodes and H = ∇²L(w) for the full
Hessian over them, with blocks H_ij = ∂²L / ∂w_i ∂w_j. Every routine here only needs Hessian-vector
products, computed by double back-propagation one batch at a time:

    g_b = ∂S_b/∂w  (create_graph=True),   (H v) = Σ_b ∂(g_b · v)/∂w  /  Σ_b n_b,

so memory is one batch of activations (plus its double-backward graph) and one accumulator per weight, and
the result is exact (no finite differences). Accumulation is in float64 whatever the graph dtype.

Uses in the compression flows
* :func:`hutchinson_trace` — tr(H_ii) per node, the HAWQ-V2 sensitivity: for weight noise δ_i on node i with
  n_i weights, isotropic in expectation, E[½ δ_iᵀ H_ii δ_i] = ½ · tr(H_ii)/n_i · ‖δ_i‖².
* :func:`quadratic_term` — ½ δᵀ H_ii δ, the second-order correction to the first-order LLC prediction
  ΔL ≈ g·δ (+ ½ δᵀHδ) for a candidate that leaves the first-order neighbourhood.
* :func:`lanczos_top` — the top of the spectrum of H (sharpness; how far the quadratic model can be trusted).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from ..calib.data import Dataset
from ..calib.gradients import _feeds, _labels
from ..calib.losses import TaskLoss
from ..interpreter import TorchGraph

__all__ = ["hvp", "hutchinson_trace", "lanczos_top", "quadratic_term"]


def _names(nodes) -> list[str]:
    """Node names from CompressibleNode objects or plain strings (order kept, duplicates dropped)."""
    if isinstance(nodes, str) or hasattr(nodes, "name"):
        nodes = [nodes]
    return list(dict.fromkeys(n if isinstance(n, str) else n.name for n in nodes))


def _batches(dataset: Dataset, max_batches: int | None):
    batches = dataset.batches if max_batches is None else dataset.batches[:max_batches]
    if not batches:
        raise ValueError("hessian: the dataset has no batches")
    return batches


def _forward_grads(graph: TorchGraph, batch, loss: TaskLoss, names: Sequence[str]):
    """Forward one batch, first derivatives of the batch loss sum w.r.t. the node-local weights with the
    graph kept for a second differentiation. Returns (Ws, gs, count): gs[i] is None where S_b does not depend
    on w_i, and a tensor that does not require grad where ∂S_b/∂w_i is constant in w (zero curvature)."""
    with torch.enable_grad():
        outs, cap = graph.run(_feeds(graph, batch, False), capture=names, outputs=[loss.output])
        s, count = loss.terms(outs[loss.output], _labels(batch, loss, graph.device))
        ws = [cap[n][0] for n in names]
        if not s.requires_grad:
            return ws, [None] * len(ws), int(count)
        gs = torch.autograd.grad(s, ws, create_graph=True, allow_unused=True)
    return ws, list(gs), int(count)


def _second(ws, gs, vs, wrt: Sequence[int] | None = None, retain: bool = True):
    """Σ_i ∂(g_i · v_i)/∂w_j for j in ``wrt`` (all by default); vs[i] None = zero. Zeros where unused."""
    idx = range(len(ws)) if wrt is None else wrt
    with torch.enable_grad():
        terms = [(g * v.to(g.dtype)).sum() for g, v in zip(gs, vs)
                 if g is not None and v is not None and g.requires_grad]
        if not terms:
            return [torch.zeros_like(ws[j]) for j in idx]
        dot = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        targets = [ws[j] for j in idx]
        hv = torch.autograd.grad(dot, targets, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(t) if h is None else h.detach() for h, t in zip(hv, targets)]


def _as_vector(v, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"hessian: vector of shape {tuple(t.shape)} for a weight of shape {tuple(like.shape)}")
    return t.to(device=like.device, dtype=like.dtype)


def hvp(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, vectors: Mapping[str, object], *,
        max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Hessian-vector product of the mean calibration loss over the chosen nodes' weights.

    With v = (v_i) stacked from ``vectors`` (node name -> array of that node's weight shape, ONNX layout;
    a node of ``nodes`` missing from ``vectors`` has v_i = 0) this returns, for every node i of ``nodes``,

        (H v)_i = Σ_j H_ij v_j = (Σ_b ∂/∂w_i [ (∂S_b/∂w) · v ]) / Σ_b n_b,

    i.e. the full Hessian over the chosen nodes' weights applied to v — *cross terms included*. To get one
    diagonal block H_ii v_i alone, pass ``nodes=[i]`` (or a v that is zero outside node i and read part i:
    that still contains H_ji v_i in the other parts). Result: float64 tensors on the CPU, ONNX layout.
    Only the first ``max_batches`` batches are used when given (and the mean is over their terms).
    """
    names = _names(nodes)
    unknown = set(vectors) - set(names)
    if unknown:
        raise ValueError(f"hessian: vectors given for {sorted(unknown)} which are not among the nodes {names}")
    acc: list[torch.Tensor | None] = [None] * len(names)
    total = 0
    for batch in _batches(dataset, max_batches):
        ws, gs, count = _forward_grads(graph, batch, loss, names)
        vs = [None if n not in vectors else _as_vector(vectors[n], w) for n, w in zip(names, ws)]
        hv = _second(ws, gs, vs, retain=False)
        for i, h in enumerate(hv):
            h = h.to(torch.float64)
            acc[i] = h if acc[i] is None else acc[i] + h
        total += count
        del ws, gs, hv
    if total == 0:
        raise ValueError("hessian: the data produced no loss terms (all labels ignored?)")
    return {n: (a / total).cpu() for n, a in zip(names, acc)}


def _rademacher(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    # drawn on the CPU so that the probes do not depend on the device
    r = torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8)
    return (r.to(torch.float64) * 2 - 1).to(device=device, dtype=dtype)


def hutchinson_trace(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, n_samples: int = 16,
                     seed: int = 0, max_batches: int | None = None, per_node: bool = False
                     ) -> dict[str, tuple[float, float]]:
    """Per-node Hessian trace tr(H_ii) by Hutchinson's estimator, with its standard error.

    For Rademacher probes v (entries ±1, independent), E[vᵀ A v] = tr(A). Two variants:

    * ``per_node=False`` (default, HAWQ-V2): one probe v = (v_1, ..., v_m) over all nodes per sample k, one
      HVP, and node i reads t_ik = v_iᵀ (H v)_i = v_iᵀ H_ii v_i + Σ_{j≠i} v_iᵀ H_ij v_j. The cross terms have
      zero mean (v_i, v_j independent), so E[t_ik] = tr(H_ii): only the diagonal block enters in expectation,
      the off-diagonal blocks only add variance.
    * ``per_node=True``: a separate probe per node (v zero outside node i), t_ik = v_iᵀ H_ii v_i exactly —
      lower variance, m second backward passes per probe instead of one.

    Returns node -> (mean_k t_ik, stderr = std_k(t_ik) / sqrt(K)), K = ``n_samples``. Probe k is drawn from a
    ``torch.Generator`` seeded with (seed, k) on the CPU and regenerated for each batch (the same v for every
    batch, never more than one probe in memory), so the result is deterministic for a fixed seed. Every batch
    is forwarded once; the K probes reuse its first-derivative graph.
    """
    names = _names(nodes)
    if n_samples < 1:
        raise ValueError("hutchinson_trace: n_samples must be >= 1")
    est = np.zeros((len(names), n_samples), dtype=np.float64)
    total = 0
    for batch in _batches(dataset, max_batches):
        ws, gs, count = _forward_grads(graph, batch, loss, names)
        for k in range(n_samples):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
            vs = [_rademacher(gen, w.shape, w.dtype, w.device) for w in ws]
            if per_node:
                for i in range(len(names)):
                    only = [v if j == i else None for j, v in enumerate(vs)]
                    (h,) = _second(ws, gs, only, wrt=[i])
                    est[i, k] += float((h.to(torch.float64) * vs[i].to(torch.float64)).sum())
            else:
                hv = _second(ws, gs, vs)
                for i, (h, v) in enumerate(zip(hv, vs)):
                    est[i, k] += float((h.to(torch.float64) * v.to(torch.float64)).sum())
        total += count
        del ws, gs
    if total == 0:
        raise ValueError("hessian: the data produced no loss terms (all labels ignored?)")
    est /= total
    out = {}
    for i, n in enumerate(names):
        se = float(est[i].std(ddof=1) / math.sqrt(n_samples)) if n_samples > 1 else float("nan")
        out[n] = (float(est[i].mean()), se)
    return out


def lanczos_top(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, k: int = 4, iters: int = 20,
                seed: int = 0, max_batches: int | None = None) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Top-``k`` (algebraically largest) eigenpairs of H over the chosen nodes' weights, by Lanczos.

    Lanczos builds an orthonormal basis Q_t of the Krylov space span{q_1, H q_1, ..., H^{t-1} q_1} (q_1 a
    seeded Gaussian unit vector) and the tridiagonal T_t = Q_tᵀ H Q_t (α on the diagonal, β off it). The
    Ritz values θ (eigenvalues of T_t) approximate the extreme eigenvalues of H, the largest converging
    first; Ritz vectors are Q_t s. Each step costs one :func:`hvp` (a full pass over the data). With full
    reorthogonalisation (each new vector made orthogonal to all previous ones, twice, in float64) there are no
    spurious copies; when β vanishes the Krylov space is invariant and the values are exact. At most
    min(iters, dim) steps. Returns [(θ, {node: eigenvector part (float64, CPU, ONNX layout)})], θ descending;
    the eigenvector has unit norm over all nodes together. Memory: the basis, min(iters, dim) float64
    vectors of all chosen weights (20 x 11.7 M weights of ResNet-18 = 1.9 GB), on the CPU.
    """
    names = _names(nodes)
    # shapes from one capture (forward only)
    with torch.no_grad():
        batch = _batches(dataset, max_batches)[0]
        _, cap = graph.run(_feeds(graph, batch, False), capture=names, outputs=[loss.output])
        shapes = [tuple(cap[n][0].shape) for n in names]
        del cap
    sizes = [int(np.prod(s)) for s in shapes]
    dim = sum(sizes)
    steps = max(1, min(int(iters), dim))

    def split(x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(x, sizes)
        return {n: p.reshape(s).clone() for n, p, s in zip(names, parts, shapes)}

    def apply(x: torch.Tensor) -> torch.Tensor:
        hv = hvp(graph, dataset, loss, names, split(x), max_batches=max_batches)
        return torch.cat([hv[n].reshape(-1) for n in names])

    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(dim, generator=gen, dtype=torch.float64)
    q /= q.norm()
    Q = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for t in range(steps):
        w = apply(Q[t])
        alpha = float(w @ Q[t])
        alphas.append(alpha)
        basis = torch.stack(Q)
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan/Parlett)
            w = w - basis.T @ (basis @ w)
        if t == steps - 1:
            break
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) or 1.0
        if beta <= 1e-12 * scale:  # invariant subspace: T is exact on it
            break
        betas.append(beta)
        Q.append(w / beta)
    m = len(alphas)
    T = np.diag(alphas)
    for i, b in enumerate(betas[: m - 1]):
        T[i, i + 1] = T[i + 1, i] = b
    theta, S = np.linalg.eigh(T)
    order = np.argsort(theta)[::-1][: max(0, int(k))]
    basis = torch.stack(Q[:m])
    result = []
    for j in order:
        vec = basis.T @ torch.from_numpy(S[:, j].copy())
        vec = vec / vec.norm()
        result.append((float(theta[j]), split(vec)))
    return result


def quadratic_term(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, node, delta, *,
                   max_batches: int | None = None) -> float:
    """½ δᵀ H_ii δ for weight noise δ (weight shape, ONNX layout) on one node i (one HVP pass).

    Together with the first-order term, L(W + δ) − L(W) = g_i·δ + ½ δᵀ H_ii δ + O(‖δ‖³) — the second-order
    correction to the LLC prediction for a candidate outside the first-order neighbourhood.
    """
    (name,) = _names(node)
    hv = hvp(graph, dataset, loss, [name], {name: delta}, max_batches=max_batches)[name]
    d = torch.as_tensor(np.asarray(delta) if not isinstance(delta, torch.Tensor) else delta)
    return 0.5 * float((d.detach().cpu().to(torch.float64) * hv).sum())

