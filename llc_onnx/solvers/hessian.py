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
* :func:`block_hvp` / :func:`node_lanczos` — the diagonal blocks H_ii alone, every node at once: one forward
  per batch (first-derivative graph kept), then one second backward per node restricted to w_i, so one pass
  over the data advances the Lanczos iteration of every node (``solvers.cet`` builds its eigenpairs on it).
* :func:`deflated_trace` — tr(H_ii) per node with a far lower variance than Hutchinson's estimator: the
  Krylov part exactly (Lanczos), the rest by deflated probes, in rounds until a target standard error.

Bad input raises :class:`HessianError` (an :class:`LLCError` and a ``ValueError``): one line.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..calib.data import Dataset
from ..calib.gradients import _feeds, _labels
from ..calib.losses import TaskLoss
from ..errors import LLCError
from ..interpreter import TorchGraph

__all__ = ["FirstDerivatives", "HessianError", "LanczosResult", "TraceEstimate", "block_hvp", "deflated_probes",
           "deflated_trace", "hvp", "hutchinson_trace", "lanczos_top", "node_lanczos", "quadratic_term",
           "spans_all"]


class HessianError(LLCError, ValueError):
    """Bad input to the curvature routines (an LLCError and a ValueError: the CLI prints one line)."""


def _names(nodes) -> list[str]:
    """Node names from CompressibleNode objects or plain strings (order kept, duplicates dropped)."""
    if isinstance(nodes, str) or hasattr(nodes, "name"):
        nodes = [nodes]
    return list(dict.fromkeys(n if isinstance(n, str) else n.name for n in nodes))


def _batches(dataset: Dataset, max_batches: int | None):
    batches = dataset.batches if max_batches is None else dataset.batches[:max_batches]
    if not batches:
        raise HessianError(f"{dataset.source}: no batches for the curvature pass; give calibration data "
                           "(and max_batches >= 1)")
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
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v), device="cpu")
    if tuple(t.shape) != tuple(like.shape):
        raise HessianError(f"hessian: vector of shape {tuple(t.shape)} for a weight of shape {tuple(like.shape)}; "
                           "pass one array of the weight's shape (ONNX layout) per node")
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
        raise HessianError(f"hessian: vectors given for {sorted(unknown)} which are not among the nodes {names}; "
                           "pass vectors only for the chosen nodes")
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
        raise HessianError("hessian: the data produced no loss terms (all labels ignored?); "
                           "the curvature pass needs labelled samples")
    return {n: (a / total).cpu() for n, a in zip(names, acc)}


def _rademacher(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    # drawn on the CPU so that the probes do not depend on the device
    r = torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8, device="cpu")
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
        raise HessianError(f"hutchinson_trace: n_samples={n_samples} must be >= 1; use at least one probe")
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
        raise HessianError("hessian: the data produced no loss terms (all labels ignored?); "
                           "the curvature pass needs labelled samples")
    est /= total
    out = {}
    for i, n in enumerate(names):
        se = float(est[i].std(ddof=1) / math.sqrt(n_samples)) if n_samples > 1 else float("nan")
        out[n] = (float(est[i].mean()), se)
    return out


@dataclass
class LanczosResult:
    """Ritz pairs of one symmetric operator after ``steps`` Lanczos steps.

    ``values`` ascending (float64); ``vectors[j]`` the unit Ritz vector of ``values[j]`` (float64, flat);
    ``residuals[j]`` = |β_m s_mj| = ‖A y_j − θ_j y_j‖ for the operator the recurrence saw (full
    reorthogonalisation; the rounding of the operator itself — a float32 HVP — is not included); ``exhausted`` when the Krylov space became invariant (β ≈ 0, or m = dim): the Ritz values are
    then exact eigenvalues of A restricted to it (all of A's eigenvalues when m = dim)."""

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    steps: int
    exhausted: bool


class _Lanczos:
    """One Lanczos run on a symmetric operator A of dimension ``dim``, driven from outside so that several
    runs (one per node) can share each pass over the data: :meth:`current` is the vector to multiply,
    :meth:`advance` takes A·current.

    It builds an orthonormal basis Q_t of the Krylov space span{q_1, A q_1, ..., A^{t-1} q_1} and the
    tridiagonal T_t = Q_tᵀ A Q_t (α on the diagonal, β off it). Full reorthogonalisation (each new vector
    made orthogonal to all previous ones, twice — Kahan/Parlett — in float64) keeps Q orthonormal, so there
    are no spurious copies; when β vanishes the Krylov space is invariant and the values are exact.
    At most min(iters, dim) steps; the basis is preallocated (steps × dim float64)."""

    def __init__(self, dim: int, iters: int, start: torch.Tensor):
        self.steps = max(1, min(int(iters), int(dim)))
        self.Q = torch.empty((self.steps, dim), dtype=torch.float64, device="cpu")   # the basis lives on the CPU
        self.Q[0] = start / start.norm()
        self.m = 1
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.last_beta = 0.0
        self.done = False
        self.exhausted = False

    def current(self) -> torch.Tensor:
        return self.Q[self.m - 1]

    def advance(self, w: torch.Tensor) -> None:
        t = self.m - 1
        w = w.to(torch.float64).reshape(-1)
        self.alphas.append(float(w @ self.Q[t]))
        basis = self.Q[: self.m]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = float(w.norm())
        scale = max(abs(a) for a in self.alphas) or 1.0
        if beta <= 1e-12 * scale:  # invariant subspace: T is exact on it
            self.done = self.exhausted = True
            self.last_beta = 0.0
            return
        self.last_beta = beta
        if self.m == self.steps:
            self.done = True
            self.exhausted = self.m == self.Q.shape[1]
            return
        self.betas.append(beta)
        self.Q[self.m] = w / beta
        self.m += 1

    def result(self) -> LanczosResult:
        m = len(self.alphas)
        T = np.diag(self.alphas)
        for i, b in enumerate(self.betas[: m - 1]):
            T[i, i + 1] = T[i + 1, i] = b
        theta, S = np.linalg.eigh(T)
        vecs = torch.from_numpy(np.ascontiguousarray(S.T)) @ self.Q[:m]
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
        res = np.abs(self.last_beta * S[-1, :])
        return LanczosResult(theta, vecs, res, m, self.exhausted)


def lanczos_top(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, k: int = 4, iters: int = 20,
                seed: int = 0, max_batches: int | None = None) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Top-``k`` (algebraically largest) eigenpairs of H over the chosen nodes' weights, by Lanczos.

    The Ritz values θ (eigenvalues of T_t, see :class:`_Lanczos`; q_1 a seeded Gaussian unit vector)
    approximate the extreme eigenvalues of H, the largest converging first; Ritz vectors are Q_t s. Each step
    costs one :func:`hvp` (a full pass over the data). Returns [(θ, {node: eigenvector part (float64, CPU,
    ONNX layout)})], θ descending; the eigenvector has unit norm over all nodes together. Memory: the basis,
    min(iters, dim) float64 vectors of all chosen weights (20 x 11.7 M weights of ResNet-18 = 1.9 GB), on the
    CPU. Per node block H_ii instead (and every node in one pass per step): :func:`node_lanczos`.
    """
    names = _names(nodes)
    shapes = _shapes(graph, dataset, loss, names, max_batches)
    sizes = [int(np.prod(s)) for s in shapes]

    def split(x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(x, sizes)
        return {n: p.reshape(s).clone() for n, p, s in zip(names, parts, shapes)}

    gen = torch.Generator().manual_seed(int(seed))
    run = _Lanczos(sum(sizes), iters, torch.randn(sum(sizes), generator=gen, dtype=torch.float64, device="cpu"))
    while not run.done:
        hv = hvp(graph, dataset, loss, names, split(run.current()), max_batches=max_batches)
        run.advance(torch.cat([hv[n].reshape(-1) for n in names]))
    res = run.result()
    order = np.argsort(res.values)[::-1][: max(0, int(k))]
    return [(float(res.values[j]), split(res.vectors[j])) for j in order]


def _shapes(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, names: Sequence[str],
            max_batches: int | None) -> list[tuple[int, ...]]:
    """The node-local weight shapes (one forward of the first batch, no gradients)."""
    with torch.no_grad():
        batch = _batches(dataset, max_batches)[0]
        _, cap = graph.run(_feeds(graph, batch, False), capture=names, outputs=[loss.output])
        return [tuple(cap[n][0].shape) for n in names]


class FirstDerivatives:
    """Every batch's forward and first-derivative graph (g_b = ∂S_b/∂w for ``names``), computed once and kept,
    so that repeated :func:`block_hvp` passes (Lanczos steps) only run the second backwards. Memory: the
    activations and backward graph of all used batches at once — for small models or sub-sampled data."""

    def __init__(self, graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, max_batches: int | None = None):
        self.names = _names(nodes)
        self.items = [_forward_grads(graph, b, loss, self.names) for b in _batches(dataset, max_batches)]


def block_hvp(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, vectors: Mapping[str, Sequence[object]], *,
              max_batches: int | None = None, kept: FirstDerivatives | None = None) -> dict[str, list[torch.Tensor]]:
    """Diagonal-block Hessian-vector products H_ii v for every node i of ``vectors`` and each of its vectors.

    ``vectors``: node name -> list of arrays of that node's weight shape (ONNX layout). Per batch there is one
    forward and one first backward with the graph kept (g_b = ∂S_b/∂w for all nodes), then one second backward
    per (node, vector), restricted to w_i:

        (H_ii v)_b = ∂(g_b,i · v)/∂w_i,      H_ii v = Σ_b (H_ii v)_b / Σ_b n_b,

    so no cross block H_ij enters and one pass over the data serves every node. A second backward from g_i
    only visits the graph between node i and the loss. With ``kept`` (:class:`FirstDerivatives` of these
    nodes) the forwards and first backwards are not redone. Result: node -> list of float64 CPU tensors,
    same order as given. Empty vector lists are allowed (the node is skipped).
    """
    names = [n for n in _names(list(vectors)) if len(vectors[n])]
    if not names:
        return {n: [] for n in vectors}
    if kept is not None and set(names) - set(kept.names):
        raise HessianError(f"hessian: vectors for {sorted(set(names) - set(kept.names))} but the kept first "
                           "derivatives cover other nodes; keep them for every node that gets vectors")
    acc: dict[str, list[torch.Tensor | None]] = {n: [None] * len(vectors[n]) for n in names}
    total = 0
    source = kept.items if kept is not None else _batches(dataset, max_batches)
    for item in source:
        if kept is not None:
            ws, gs, count = item
            pos = [kept.names.index(n) for n in names]
        else:
            ws, gs, count = _forward_grads(graph, item, loss, names)
            pos = list(range(len(names)))
        for name, i in zip(names, pos):
            for j, v in enumerate(vectors[name]):
                only = [None] * len(ws)
                only[i] = _as_vector(v, ws[i])
                (h,) = _second(ws, gs, only, wrt=[i])
                h = h.to(torch.float64)
                acc[name][j] = h if acc[name][j] is None else acc[name][j] + h
        total += count
        del ws, gs
    if total == 0:
        raise HessianError("hessian: the data produced no loss terms (all labels ignored?); "
                           "the curvature pass needs labelled samples")
    out = {n: [(a / total).cpu() for a in acc[n]] for n in names}
    for n in vectors:
        out.setdefault(n, [])
    return out


def node_seed(seed: int, name: str) -> int:
    """The seed of node ``name``'s random start / probe vectors: independent of which other nodes run with
    it, so a node's result does not depend on the node list."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def node_lanczos(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, *, iters: int = 40, seed: int = 0,
                 max_batches: int | None = None, kept: FirstDerivatives | None = None,
                 progress=None) -> dict[str, LanczosResult]:
    """Lanczos on every node's own block H_ii, all nodes in lock-step: step t of every node is one
    :func:`block_hvp` pass over the data (one forward per batch for all nodes).

    Node i runs min(iters, n_i) steps from a Gaussian start seeded by :func:`node_seed`; a node whose Krylov
    space is exhausted stops early (later passes skip it). Ritz values approximate both ends of the spectrum
    of H_ii: the largest and the most negative converge first. The Rayleigh–Ritz property holds whatever the
    convergence: for the Ritz vectors Y (orthonormal), Yᵀ H_ii Y = diag(θ) up to rounding. Memory: one
    min(iters, n_i) × n_i float64 basis per node, all at once (``solvers.cet.node_curvature`` runs nodes in
    groups under a byte cap). ``kept``: reuse every batch's first derivatives (:class:`FirstDerivatives`)
    instead of a forward and first backward per pass. ``progress(1)`` is called after every pass. Returns node ->
    :class:`LanczosResult` (flat ONNX-layout vectors, all min(iters, n_i) Ritz pairs).
    """
    names = _names(nodes)
    if int(iters) < 1:
        raise HessianError(f"node_lanczos: iters={iters} must be >= 1; use e.g. 40")
    shapes = dict(zip(names, _shapes(graph, dataset, loss, names, max_batches)))
    runs = {}
    for n in names:
        size = int(np.prod(shapes[n]))
        gen = torch.Generator().manual_seed(node_seed(seed, n))
        runs[n] = _Lanczos(size, iters, torch.randn(size, generator=gen, dtype=torch.float64, device="cpu"))
    while any(not r.done for r in runs.values()):
        active = [n for n in names if not runs[n].done]
        hv = block_hvp(graph, dataset, loss, {n: [runs[n].current().reshape(shapes[n])] for n in active},
                       max_batches=max_batches, kept=kept)
        for n in active:
            runs[n].advance(hv[n][0])
        if progress:
            progress(1)
    return {n: runs[n].result() for n in names}


def spans_all(res: LanczosResult, shape) -> bool:
    """The Lanczos basis spans the node's whole weight space, so tr(T) is its exact trace. An invariant Krylov
    space of fewer dimensions does not: it holds each distinct eigenvalue once (H = c·I: tr(T) = c after one
    step), so a repeated eigenvalue — e.g. a linear layer under MSE, H = XᵀX ⊗ I — needs the probes."""
    return res.steps == math.prod(shape)


def deflated_probes(basis: torch.Tensor, shape, count: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``count`` deflated Rademacher probes y = (I − QQᵀ) z, z ∈ {±1}ⁿ drawn from ``gen`` (float64, CPU),
    Q = ``basis`` (orthonormal rows, [k, n]); each reshaped to ``shape``. E[yᵀAy] = tr(PAP), P = I − QQᵀ."""
    Q = basis.to(torch.float64)
    ys = []
    for _ in range(int(count)):
        z = _rademacher(gen, (Q.shape[1],), torch.float64, "cpu")
        ys.append((z - Q.T @ (Q @ z)).reshape(shape))
    return ys


@dataclass(frozen=True)
class TraceEstimate:
    """tr(H_ii) of one node from :func:`deflated_trace`: ``trace`` and its standard error ``se`` (0 when exact),
    ``krylov`` = tr(QᵀH_iiQ) (the exact part), ``steps`` Lanczos steps and ``probes`` deflated probes used;
    :attr:`exact` when the basis spans all of the node's weights (no probes needed)."""

    trace: float
    se: float
    krylov: float
    steps: int
    probes: int

    @property
    def exact(self) -> bool:
        return self.probes == 0


def deflated_trace(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, *, steps: int = 8, probes: int = 8,
                   max_probes: int = 64, rel_se: float = 0.1, seed: int = 0, max_batches: int | None = None,
                   keep_graphs: bool = False, progress=None) -> dict[str, TraceEstimate]:
    """tr(H_ii) of every node by Lanczos deflation plus Hutchinson on the rest (Hutch++'s idea, Meyer et al.
    2021, with a Krylov basis), in rounds until a target standard error.

    For the Krylov basis Q (``steps`` Lanczos steps on H_ii from a seeded Gaussian start, :func:`node_lanczos`;
    orthonormal rows) and P = I − QQᵀ,

        tr(H_ii) = tr(QᵀH_iiQ) + tr(P H_ii P) = Σ_t α_t + E_z[yᵀH_ii y],   y = P z,  z Rademacher,

    the first part exact (T = QᵀH_iiQ is the Lanczos tridiagonal), the second estimated by deflated probes
    drawn independently of Q, so the estimate is unbiased. Its variance is 2(‖PH_iiP‖_F² − Σ diag²)/K: the
    large eigenvalues, which dominate plain Hutchinson's variance 2(‖H_ii‖_F² − Σ diag²)/K, are counted
    exactly. Rounds of ``probes`` probes per node go on (one :func:`block_hvp` pass each, only for the nodes
    still running) until the node's SE ≤ ``rel_se`` × |trace| or ``max_probes`` probes were used; a node with
    n ≤ ``steps`` weights is exact (Q spans everything; an invariant Krylov space of fewer dimensions is not:
    it holds a repeated eigenvalue once). Cost: ``steps`` + rounds passes; a pass is one forward
    and first backward per batch (none with ``keep_graphs``, :class:`FirstDerivatives`) and one second backward
    per running node and vector. Deterministic for a fixed ``seed``: node i's start and probes come from
    :func:`node_seed`, whatever the other nodes. ``progress(1)`` after every pass.
    """
    names = _names(nodes)
    if int(steps) < 1 or int(probes) < 2 or int(max_probes) < int(probes) or not rel_se > 0:
        raise HessianError(f"deflated_trace: steps={steps}, probes={probes}, max_probes={max_probes}, "
                           f"rel_se={rel_se}; use steps >= 1, 2 <= probes <= max_probes and rel_se > 0")
    kept = FirstDerivatives(graph, dataset, loss, names, max_batches) if keep_graphs else None
    runs = node_lanczos(graph, dataset, loss, names, iters=int(steps), seed=seed, max_batches=max_batches,
                        kept=kept, progress=progress)
    shapes = dict(zip(names, _shapes(graph, dataset, loss, names, max_batches)))
    krylov = {n: float(np.sum(runs[n].values)) for n in names}
    full = {n: spans_all(runs[n], shapes[n]) for n in names}
    gens = {n: torch.Generator().manual_seed(node_seed(seed + 7919, n)) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    active = [n for n in names if not full[n]]

    def se_of(n: str) -> float:
        xs = np.asarray(samples[n])
        return float(xs.std(ddof=1) / math.sqrt(xs.size)) if xs.size > 1 else float("nan")

    while active:
        ys = {n: deflated_probes(runs[n].vectors, shapes[n], int(probes), gens[n]) for n in active}
        hv = block_hvp(graph, dataset, loss, ys, max_batches=max_batches, kept=kept)
        if progress:
            progress(1)
        for n in active:
            samples[n] += [float((h.reshape(-1) * y.reshape(-1).to(h.dtype)).sum()) for h, y in zip(hv[n], ys[n])]
        active = [n for n in active if len(samples[n]) + int(probes) <= int(max_probes)
                  and not se_of(n) <= float(rel_se) * abs(krylov[n] + float(np.mean(samples[n])))]
    out = {}
    for n in names:
        rest = 0.0 if full[n] else float(np.mean(samples[n]))
        out[n] = TraceEstimate(krylov[n] + rest, 0.0 if full[n] else se_of(n), krylov[n], runs[n].steps,
                               len(samples[n]))
    return out


def quadratic_term(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, node, delta, *,
                   max_batches: int | None = None) -> float:
    """½ δᵀ H_ii δ for weight noise δ (weight shape, ONNX layout) on one node i (one HVP pass).

    Together with the first-order term, L(W + δ) − L(W) = g_i·δ + ½ δᵀ H_ii δ + O(‖δ‖³) — the second-order
    correction to the LLC prediction for a candidate outside the first-order neighbourhood.
    """
    (name,) = _names(node)
    hv = hvp(graph, dataset, loss, [name], {name: delta}, max_batches=max_batches)[name]
    d = delta if isinstance(delta, torch.Tensor) else torch.as_tensor(np.asarray(delta), device="cpu")
    return 0.5 * float((d.detach().cpu().to(torch.float64) * hv).sum())

