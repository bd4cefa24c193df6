"""CET second-order error model per node: the axes of H_ii and a cheap loss prediction for any weight error.

Near the trained weights the loss change of an error δ on node i (n weights) is, to second order,

    ΔL ≈ g·δ + ½ δᵀ H_ii δ.

With the eigen-decomposition H_ii = Σ_j λ_j v_j v_jᵀ the quadratic term is a quadric whose *short axes*
(largest λ) are where error costs most and whose *long axes* (smallest or negative λ) cost least or lower the
loss. CET keeps the k algebraically largest eigenpairs and the (up to) k_neg most negative ones, V = [v_j]
(rows orthonormal), and models the rest of the spectrum as isotropic with the mean remaining curvature

    ρ = (tr(H_ii) − Σ_j λ_j) / (n − k'),            k' = number of kept eigenpairs,
    ΔL ≈ g·δ + ½ Σ_j λ_j (v_j·δ)² + ½ ρ ‖δ⊥‖²,     δ⊥ = δ − Vᵀ V δ,  ‖δ⊥‖² = ‖δ‖² − ‖Vδ‖².

With k' = n this is exactly ½ δᵀH_iiδ; in general it is exact on span(V) (Rayleigh–Ritz: VᵀHV = diag(λ)),
misses the cross terms 2 (Vδ)ᵀ V H δ⊥ (of the size of the Lanczos residuals), and replaces δ⊥ᵀHδ⊥ by its
isotropic average — right in expectation for an error δ⊥ with no preferred direction in the complement.

How it is computed (:func:`node_curvature`)
* eigenpairs: Lanczos on each H_ii alone, all nodes in lock-step — one pass over the (sub-sampled) fit data
  per step for all nodes (``hessian.node_lanczos``);
* trace: tr(H_ii) = tr(T) + tr(P H_ii P) exactly for the Lanczos basis Q (T = QᵀHQ, P = I − QQᵀ); the second
  part by Hutchinson with deflated Rademacher probes y = P z, E[yᵀHy] = tr(PHP) (Hutch++'s idea: the top
  of the spectrum, which dominates the variance of plain Hutchinson, is counted exactly). One more pass for
  all probes of all nodes; none when the Krylov basis spans all of the node's weights (then the trace is exact).

One pass instead (:func:`fisher_curvature`, ``optimize``'s default ``--cet-curvature fisher``): the sampled
Gauss-Newton block F_ii = GᵀG/N from per-sample gradients with model-drawn labels (``calib.fisher``) — PSD, its
top eigenpairs and trace exact for the sample. ``optimize`` runs either on a seeded sub-sample of
``--cet-samples`` (128) samples (``calib.data.sample_subset``); Lanczos with k + 8 steps (:func:`default_steps`).
Measured on the Fashion-MNIST CNN (``bench.exp_cet``): both rank the candidates' test-split ΔL alike
(Spearman 0.97–0.98 over nearest-rounded candidates), the Fisher pass in under 1 s against 14 s.

:func:`cet_predict` evaluates the model for many errors at once (one matrix product per node, no backward
pass): the cheap ``--cost cet``. :class:`NodeCurvature` is serialisable (:func:`save_curvature`, or
``to_arrays`` / ``from_arrays`` inside another npz) so it can be cached next to the gradient statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..atomic import write_atomic
from ..calib.data import Dataset
from ..calib.losses import TaskLoss
from ..errors import LLCError
from ..interpreter import TorchGraph
from .hessian import (FirstDerivatives, HessianError, _names, _shapes, block_hvp, deflated_probes, node_lanczos,
                      node_seed, spans_all)

__all__ = ["NodeCurvature", "CETPrediction", "node_curvature", "fisher_curvature", "default_steps", "cet_predict",
           "save_curvature", "load_curvature"]

FORMAT = 1


@dataclass(frozen=True)
class NodeCurvature:
    """The CET model of one node's Hessian block H_ii (see module doc).

    ``eigenvalues`` [k'] float64, descending (the k largest first, then the kept negative ones);
    ``eigenvectors`` [k', n] float32, orthonormal rows over the flattened weight (C order, ONNX layout);
    ``residuals`` [k'] the Lanczos recurrence's ‖H v − λ v‖ (it does not see the HVP's own rounding: with a
    float32 graph and float32 storage the true residual is ~1e-7..1e-6·λ when this is ~0); ``trace`` tr(H_ii) and its standard error ``trace_se``
    (0 when exact); ``steps`` Lanczos steps (passes over the data) and ``probes`` Hutchinson probes used;
    ``n_terms`` loss terms of the data it was computed on."""

    node: str
    shape: tuple[int, ...]
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    trace: float
    trace_se: float
    steps: int
    probes: int
    source: str = "lanczos"  # "lanczos": H_ii itself; "fisher": the sampled Gauss-Newton block (fisher_curvature);
    #                          "empirical fisher": the same from the data's labels (a loss without fisher_terms)

    @property
    def n(self) -> int:
        return int(math.prod(self.shape))

    @property
    def k(self) -> int:
        return int(self.eigenvalues.size)

    @property
    def remainder(self) -> float:
        """ρ = (tr(H_ii) − Σ λ_j) / (n − k'): the mean curvature outside the kept axes (0 when k' = n)."""
        rest = self.n - self.k
        return float((self.trace - float(self.eigenvalues.sum())) / rest) if rest > 0 else 0.0

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Plain arrays (no pickling) that :meth:`from_arrays` reads back, keys prefixed by ``prefix``."""
        meta = {"format": FORMAT, "node": self.node, "shape": list(self.shape), "trace": self.trace,
                "trace_se": self.trace_se, "steps": self.steps, "probes": self.probes, "source": self.source}
        return {prefix + "meta": np.array(json.dumps(meta)),
                prefix + "eigenvalues": np.asarray(self.eigenvalues, dtype=np.float64),
                prefix + "eigenvectors": np.asarray(self.eigenvectors, dtype=np.float32),
                prefix + "residuals": np.asarray(self.residuals, dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> "NodeCurvature":
        meta = json.loads(str(arrays[prefix + "meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"curvature format {meta.get('format')} (expected {FORMAT})")
        vals = np.asarray(arrays[prefix + "eigenvalues"], dtype=np.float64)
        vecs = np.asarray(arrays[prefix + "eigenvectors"], dtype=np.float32)
        shape = tuple(int(d) for d in meta["shape"])
        if vecs.shape != (vals.size, math.prod(shape)):
            raise ValueError(f"eigenvectors of shape {vecs.shape} for {vals.size} values and {shape}")
        return cls(meta["node"], shape, vals, vecs, np.asarray(arrays[prefix + "residuals"], dtype=np.float64),
                   float(meta["trace"]), float(meta["trace_se"]), int(meta["steps"]), int(meta["probes"]),
                   str(meta.get("source", "lanczos")))


def _byte_groups(items: list, nbytes, cap: int | None) -> list[list]:
    """``items`` in order, cut into consecutive groups whose ``nbytes(item)`` sum stays within ``cap`` (an item
    larger than the cap forms a group of its own; no cap: one group)."""
    groups: list[list] = [[]]
    used = 0
    for item in items:
        need = nbytes(item)
        if groups[-1] and cap is not None and used + need > cap:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += need
    return groups


def _default_iters(k: int, k_negative: int) -> int:
    return max(2 * (k + k_negative), k + k_negative + 16)


def default_steps(k: int) -> int:
    """Lanczos steps of ``optimize``'s curvature pass (``--cet-steps``' default): k + 8. Measured on the
    Fashion-MNIST CNN (``bench.exp_cet``, 128 samples): 16 steps for k = 8 rank the candidates' measured ΔL
    as well as 28 (Spearman 0.84 vs 0.83) and CET rounding beats nearest on the same nodes, at 0.7× the time."""
    return int(k) + 8


def node_curvature(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, *, k: int = 8,
                   k_negative: int = 4, iters: int | None = None, probes: int = 8, seed: int = 0,
                   max_batches: int | None = None, max_basis_bytes: int | None = 1 << 30,
                   keep_graphs: bool = False, progress=None) -> dict[str, NodeCurvature]:
    """The CET model (top-``k`` eigenpairs, up to ``k_negative`` negative ones, the trace) of every node's
    H_ii on ``dataset`` (the calibration *fit* part; the first ``max_batches`` batches when given).

    Cost: ``iters`` passes for Lanczos (default max(2(k + k_negative), k + k_negative + 16); a node with
    n ≤ iters needs only n) plus one pass for the ``probes`` trace probes, whose second backwards cost about as
    much as ``probes`` Lanczos steps (``probes=0``: the trace outside the Krylov space is taken as 0 and
    ``trace_se`` is NaN). A pass is one forward and one first backward per batch plus one second backward per
    node and vector. Nodes run in consecutive groups whose
    float64 Lanczos bases (steps · n · 8 bytes) fit ``max_basis_bytes`` (each group its own passes); a node
    larger than the cap runs alone. ``keep_graphs`` keeps every batch's forward and first-derivative graph
    for all passes of a group (``hessian.FirstDerivatives``: memory for the activations and backward graphs of
    all used batches; same numbers, fewer forwards). Deterministic for a fixed ``seed`` (per node,
    :func:`hessian.node_seed`), whatever the other nodes. ``nodes``: CompressibleNode objects or names.
    """
    names = _names(nodes)
    if not 1 <= int(k) or int(k_negative) < 0 or int(probes) < 0:
        raise HessianError(f"node_curvature: k={k}, k_negative={k_negative}, probes={probes}; "
                           "use k >= 1 (e.g. 4..32), k_negative >= 0 and probes >= 0")
    k, k_negative, probes = int(k), int(k_negative), int(probes)
    iters = _default_iters(k, k_negative) if iters is None else int(iters)
    if iters < k:
        raise HessianError(f"node_curvature: iters={iters} < k={k}; Lanczos needs at least k steps "
                           "(use about 2(k + k_negative))")
    shapes = dict(zip(names, _shapes(graph, dataset, loss, names, max_batches)))
    groups = _byte_groups(names, lambda n: min(iters, math.prod(shapes[n])) * math.prod(shapes[n]) * 8,
                          max_basis_bytes)
    out: dict[str, NodeCurvature] = {}
    for group in groups:
        kept = FirstDerivatives(graph, dataset, loss, group, max_batches) if keep_graphs else None
        runs = node_lanczos(graph, dataset, loss, group, iters=iters, seed=seed, max_batches=max_batches,
                            kept=kept, progress=progress)
        probe_vecs = {n: _deflated_probes(runs[n], shapes[n], probes, seed, n) for n in group}
        need = {n: ys for n, ys in probe_vecs.items() if ys}
        hv = block_hvp(graph, dataset, loss, need, max_batches=max_batches, kept=kept) if need else {}
        if need and progress:
            progress(1)
        for n in group:
            res = runs[n]
            ys = probe_vecs[n]
            est = np.array([float((h.reshape(-1) * y.reshape(-1)).sum()) for h, y in zip(hv.get(n, []), ys)])
            full = spans_all(res, shapes[n])
            if full or not len(est):
                tr_rest, se = 0.0, (0.0 if full else float("nan"))
            else:
                tr_rest = float(est.mean())
                se = float(est.std(ddof=1) / math.sqrt(len(est))) if len(est) > 1 else float("nan")
            trace = float(res.values.sum()) + tr_rest
            keep = _select(res.values, res.residuals, k, k_negative)
            out[n] = NodeCurvature(n, tuple(shapes[n]), res.values[keep].astype(np.float64),
                                   res.vectors[keep].numpy().astype(np.float32), res.residuals[keep].copy(),
                                   trace, se, res.steps, 0 if full else len(est))
        del runs, probe_vecs, hv, kept
    return {n: out[n] for n in names}


def fisher_curvature(model, graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes, *, k: int = 8,
                     seed: int = 0, max_bytes: int | None = 1 << 30, progress=None) -> dict[str, NodeCurvature]:
    """The CET model of every node from its sampled Gauss-Newton block F_ii = GᵀG / N (``calib.fisher``: G the
    [S, n] per-sample gradients with model-drawn labels, one forward and backward per batch for a group of nodes)
    instead of Lanczos on H_ii: the top-``k`` eigenpairs are exact for F_ii (from the S×S matrix GGᵀ, or GᵀG when
    n ≤ S; residuals 0), the trace ‖G‖²_F / N is exact (``trace_se`` 0), so ρ spreads the rest of F_ii's trace.
    F_ii is positive semi-definite: no negative axes. Cost: one pass over ``dataset`` per group of nodes whose
    S·n float32 gradients fit ``max_bytes`` (a node larger than that runs alone), against ``steps`` passes of
    one second backward per node for :func:`node_curvature`.

    Measured on the Fashion-MNIST CNN (128 samples; ``bench.exp_cet --curvature fisher``): it ranks the
    candidates' measured ΔL as well as Lanczos on H_ii (module doc) at a small fraction of the time."""
    from ..calib.fisher import sample_gradients

    node_list = list(nodes)
    if not 1 <= int(k):
        raise HessianError(f"fisher_curvature: k={k}; use k >= 1 (e.g. 4..32)")
    samples = dataset.n_samples
    groups = _byte_groups(node_list, lambda n: samples * math.prod(n.weight_shape) * 4, max_bytes)
    out: dict[str, NodeCurvature] = {}
    for group in groups:
        grads = sample_gradients(model, graph, dataset, loss, group, seed=seed)
        for n in group:
            sg = grads.pop(n.name)
            out[n.name] = _fisher_node(sg, int(k))
            del sg
        if progress:
            progress(1)
    return {n.name: out[n.name] for n in node_list}


def _fisher_node(sg, k: int) -> NodeCurvature:
    """The top-``k`` eigenpairs and trace of GᵀG/N for one node (torch linear algebra: it keeps to the thread
    count the caller set, where numpy's BLAS threads spin against a busy core)."""
    G = torch.from_numpy(np.ascontiguousarray(sg.rows)).to(torch.float64)
    s, n = G.shape
    N = float(sg.count)
    if n <= s:
        lam, vecs = torch.linalg.eigh(G.T @ G)              # ascending; vectors in columns [n, n]
        lam, V = lam.flip(0)[:k], vecs.flip(1)[:, :k].T
    else:
        mu, U = torch.linalg.eigh(G @ G.T)                  # S×S: σ² and left singular vectors
        mu, U = mu.flip(0)[:k], U.flip(1)[:, :k]
        keep = mu > (mu.max() if mu.numel() else 0.0) * 1e-12
        mu, U = mu[keep], U[:, keep]
        V = (U.T @ G) / mu.sqrt()[:, None]                  # right singular vectors, orthonormal rows
        lam = mu
    lam = lam.clamp_min(0.0).numpy() / N
    trace = float((G * G).sum()) / N
    return NodeCurvature(sg.node, tuple(sg.shape), lam.astype(np.float64), V.numpy().astype(np.float32),
                         np.zeros(lam.size), trace, 0.0, 0, 0, "fisher" if sg.sampled else "empirical fisher")


def _deflated_probes(res, shape, probes: int, seed: int, name: str) -> list[torch.Tensor]:
    """Deflated Rademacher probes y = (I − QQᵀ) z for the trace outside the Krylov space (none when it spans
    everything: the trace is then exact); Q = the Ritz vectors, which span the Krylov space."""
    if spans_all(res, shape) or probes == 0:
        return []
    return deflated_probes(res.vectors, shape, probes, torch.Generator().manual_seed(node_seed(seed + 7919, name)))


def _select(theta: np.ndarray, residuals: np.ndarray, k: int, k_negative: int) -> np.ndarray:
    """Indices of the kept Ritz values: the k largest (descending), then up to k_negative of the most
    negative ones not already kept, most negative last so the whole list is descending. A value counts as
    negative only when θ < −max(residual, 1e-6·max|θ|): nearer 0 its sign is rounding noise (a Ritz value
    lies within its residual of an eigenvalue)."""
    order = np.argsort(theta, kind="stable")[::-1]
    top = list(order[:k])
    tol = 1e-6 * float(np.abs(theta).max(initial=0.0))
    rest = [j for j in order[k:][::-1] if theta[j] < -max(float(residuals[j]), tol)][:k_negative]
    return np.array(top + sorted(rest, key=lambda j: -theta[j]), dtype=np.int64)


@dataclass
class CETPrediction:
    """The CET model's parts for L errors (arrays of length L): ``first_order`` g·δ (0 without a gradient),
    ``top`` ½ Σ_j λ_j (v_j·δ)², ``remainder`` ½ ρ ‖δ⊥‖²; ``projection`` ‖V₊δ‖ on the kept positive axes
    (the short axes CET rounding removes)."""

    first_order: np.ndarray
    top: np.ndarray
    remainder: np.ndarray
    projection: np.ndarray

    @property
    def second_order(self) -> np.ndarray:
        return self.top + self.remainder

    @property
    def total(self) -> np.ndarray:
        return self.first_order + self.top + self.remainder


def cet_predict(curvature: NodeCurvature, deltas, *, grad: np.ndarray | None = None) -> CETPrediction:
    """ΔL ≈ g·δ + ½ Σ_j λ_j (v_j·δ)² + ½ ρ ‖δ⊥‖² (module doc) for every error in ``deltas``: an array
    [L, *shape] (or a sequence of L weight-shaped arrays, e.g. one per quantization level), or one array of
    the weight's shape (then L = 1). One [L, n] × [n, k'] product; no pass over data."""
    shape = curvature.shape
    d = np.asarray(deltas if not isinstance(deltas, (list, tuple)) else np.stack([np.asarray(x) for x in deltas]),
                   dtype=np.float64)
    if d.shape == shape:
        d = d[None]
    if d.shape[1:] != shape:
        raise HessianError(f"node '{curvature.node}': errors of shape {d.shape} for a weight of shape {shape}; "
                           "pass [levels, *weight shape] or one weight-shaped array")
    D = d.reshape(d.shape[0], -1)
    V = curvature.eigenvectors.astype(np.float64)
    lam = curvature.eigenvalues
    P = D @ V.T
    sq = np.einsum("ln,ln->l", D, D)
    perp = np.maximum(sq - np.einsum("lk,lk->l", P, P), 0.0)
    top = 0.5 * (P * P) @ lam
    rem = 0.5 * curvature.remainder * perp
    if grad is None:
        first = np.zeros(D.shape[0])
    else:
        g = np.asarray(grad, dtype=np.float64)
        if g.shape != shape:
            raise HessianError(f"node '{curvature.node}': gradient of shape {g.shape} for a weight of shape "
                               f"{shape}; pass the node's ∂L/∂W")
        first = D @ g.reshape(-1)
    pos = lam > 0
    proj = np.sqrt((P[:, pos] ** 2).sum(axis=1))
    return CETPrediction(first, top, rem, proj)


def save_curvature(path: str, curvatures: Mapping[str, NodeCurvature]) -> None:
    """Write ``curvatures`` (node -> model) to one ``.npz`` (atomically; no pickled objects)."""
    arrays: dict[str, np.ndarray] = {"nodes": np.array(json.dumps(list(curvatures)))}
    for i, c in enumerate(curvatures.values()):
        arrays.update(c.to_arrays(f"c{i}_"))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(path, write)


def load_curvature(path: str) -> dict[str, NodeCurvature]:
    """Read what :func:`save_curvature` wrote; a damaged file raises a one-line LLCError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = json.loads(str(z["nodes"]))
            out = {n: NodeCurvature.from_arrays(z, f"c{i}_") for i, n in enumerate(names)}
            if [c.node for c in out.values()] != names:
                raise ValueError("node names differ")
    except FileNotFoundError:
        raise LLCError(f"{path}: no such curvature file; compute it with node_curvature first") from None
    except Exception as exc:  # noqa: BLE001 - any damage means: do not trust it
        raise LLCError(f"{path}: unreadable curvature file ({type(exc).__name__}: {exc}); "
                       "delete it and compute it again") from None
    return out

