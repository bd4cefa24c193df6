"""Per-sample weight gradients of compressible nodes in one pass: the sampled Fisher of each node's block.

For a node computing y = W·x at P positions per sample (tokens, or output pixels of a Conv), the gradient of
sample s's summed loss ℓ_s w.r.t. W is a sum of outer products of the node's output gradient and its input
rows (the "per-example gradient trick"):

    ∇_W ℓ_s = Σ_p (∂ℓ_s/∂y_{s,p}) x_{s,p}ᵀ            ([outputs, reduction] of the node's weight),

so one forward and one backward of a batch give every sample's gradient for every node at once — no pass per
node. The node's output gradient is read through a zero tensor added to the output (``output_fns``), its input
rows through ``input_fns`` in the node's reduction view (``calib.gram.input_rows``).

With labels drawn from the model's own predictive distribution (``TaskLoss.fisher_terms``: ŷ ~ softmax of the
output, per position), E_ŷ[∇ℓ_s ∇ℓ_sᵀ] is the generalised Gauss-Newton matrix of the loss, so

    F_ii = (1/N) Σ_s g_s g_sᵀ,       g_s = ∇_{W_i} ℓ_s(ŷ_s),   N = the loss's term count,

is an unbiased estimate of the Gauss-Newton approximation of the block H_ii of the mean loss (PSD: no
negative curvature). A loss without ``fisher_terms`` (mse, user losses) uses the data's labels: the empirical
Fisher, which is said in the result. :func:`fisher_traces` keeps only each sample's ‖g_s‖² (tr F_ii without the
rows: every node in one pass, a standard error over samples, optionally averaged over several label draws).
Contract: a sample's loss depends only on that sample (no batch
statistics), and the node's activation rows are sample-major (leading axis the batch); a node whose rows do
not split evenly over the batch is an LLCError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import math

import numpy as np
import onnx
import torch

from ..compressible import CompressibleNode
from ..errors import LLCError
from ..interpreter import TorchGraph
from ..model_io import node_names
from .data import Dataset
from .gradients import _feeds, _labels
from .gram import ReductionView, input_rows, reduction_view
from .losses import TaskLoss

__all__ = ["FisherTrace", "SampleGradients", "fisher_traces", "sample_gradients"]


@dataclass
class SampleGradients:
    """Per-sample gradients of one node: ``rows`` [S, n] float32 (sample s's ∇_W ℓ_s, flattened in the weight's
    ONNX layout), ``count`` N the loss terms they came from (F = rowsᵀ rows / N), ``sampled`` whether the labels
    were drawn from the model (Gauss-Newton) or are the data's (empirical Fisher)."""

    node: str
    shape: tuple[int, ...]
    rows: np.ndarray
    count: int
    sampled: bool


def _gemm_alpha(model: onnx.ModelProto, node: CompressibleNode) -> float:
    proto = dict(zip(node_names(model.graph), model.graph.node))[node.name]
    for a in proto.attribute:
        if a.name == "alpha":
            return float(onnx.helper.get_attribute_value(a))
    return 1.0


def _per_sample(node: CompressibleNode, view: ReductionView, x: torch.Tensor, dy: torch.Tensor, batch: int,
                alpha: float) -> torch.Tensor:
    """[B, n] per-sample weight gradients in the weight's ONNX layout from the input ``x`` and output gradient
    ``dy`` of one batch (in the graph's float type: the unfolded rows of a large Conv are the memory peak)."""
    if view.op == "Conv" and view.k == math.prod(view.kernel):  # one input channel per group: depthwise
        return _per_sample_depthwise(view, x, dy)
    rows = input_rows(x, view)
    if view.op == "Conv":
        g = view.group
        spatial = list(range(2, dy.dim()))
        d = dy.permute(0, *spatial, 1).to(rows.dtype)             # [B, L..., O]
        if rows.shape[0] % batch or d.numel() % (batch * g):
            raise LLCError(f"node '{node.name}': {rows.shape[0]} input rows do not split over a batch of {batch}")
        xr = rows.reshape(batch, -1, g, view.k)                    # [B, P, g, K]
        dr = d.reshape(batch, -1, g, d.shape[-1] // g)             # [B, P, g, O/g]
        pg = torch.einsum("bpgo,bpgk->bgok", dr, xr)               # [B, g, O/g, K] = [B, O, K] group-major
        return pg.reshape(batch, -1)
    if rows.dim() != 2 or rows.shape[0] % batch:
        raise LLCError(f"node '{node.name}': {rows.shape[0]} input rows do not split over a batch of {batch}; "
                       "the Fisher curvature needs sample-major rows (use --cet-curvature lanczos)")
    d = dy.reshape(-1, dy.shape[-1]).to(rows.dtype)
    if d.shape[0] != rows.shape[0]:
        raise LLCError(f"node '{node.name}': output rows {d.shape[0]} differ from input rows {rows.shape[0]}; "
                       "use --cet-curvature lanczos")
    xr = rows.reshape(batch, -1, rows.shape[-1])                   # [B, P, K]
    dr = d.reshape(batch, -1, d.shape[-1])                         # [B, P, O]
    if node.out_axis == 0:                                         # weight [O, K] (Gemm transB=1)
        pg = torch.einsum("bpo,bpk->bok", dr, xr)
    else:                                                          # weight [K, O]
        pg = torch.einsum("bpk,bpo->bko", xr, dr)
    return (alpha * pg).reshape(batch, -1)


def _per_sample_depthwise(view: ReductionView, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """[B, O·Πk] per-sample gradients of a Conv whose groups each read one input channel (depthwise, channel
    multiplier m = O/C) as one grouped convolution instead of unfolded rows: with x padded,
    G[b, o, i] = Σ_p dy[b, o, p] · x[b, o // m, p·s + i·d] is a convolution of x (stride d, dilation s) with dy as
    the kernel, one group per (sample, output channel). The same values as the row products, without the
    Πk-times larger unfold copy or B·C tiny matrix products."""
    import torch.nn.functional as F

    from .gram import _conv_pads

    nsp = len(view.kernel)
    flat = [p for b, e in reversed(_conv_pads(view, list(x.shape[2:]))) for p in (b, e)]
    if any(flat):
        x = F.pad(x, flat)
    b, c = x.shape[:2]
    o = dy.shape[1]
    if o != c:
        x = x.repeat_interleave(o // c, dim=1)                    # output channel o reads input channel o // m
    conv = (F.conv1d, F.conv2d, F.conv3d)[nsp - 1]
    g = conv(x.reshape(1, b * o, *x.shape[2:]), dy.reshape(b * o, 1, *dy.shape[2:]).to(x.dtype),
             stride=tuple(view.dilations), dilation=tuple(view.strides), groups=b * o)
    g = g[(0, slice(None)) + tuple(slice(0, k) for k in view.kernel)]  # [B·O, k...]
    return g.reshape(b, -1)


def _batch_gradients(model: onnx.ModelProto, graph: TorchGraph, dataset: Dataset, loss: TaskLoss,
                     nodes: Sequence[CompressibleNode], seed: int, draws: int = 1):
    """Per batch: (size, groups, loss terms, sampled, per-node iterator of (node, an iterator of one [B, n]
    per-sample gradient per label draw in the graph's float type — or None where the loss does not depend on the
    node)): one forward and ``draws`` backward passes per batch for all ``nodes`` (one draw when the loss has no
    model-drawn labels: the data's labels are the same every time)."""
    views = {n.name: reduction_view(model, n) for n in nodes}
    alphas = {n.name: (_gemm_alpha(model, n) if n.op_type == "Gemm" else 1.0) for n in nodes}
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    draws = max(1, int(draws))
    for batch in dataset.batches:
        zs: dict[str, torch.Tensor] = {}
        xs: dict[str, torch.Tensor] = {}

        def out_fn(name):
            def f(y):
                zs[name] = torch.zeros_like(y, requires_grad=True)
                return y + zs[name]
            return f

        def in_fn(name):
            def f(x):
                xs[name] = x.detach()
                return x
            return f

        grads: list[dict[str, torch.Tensor]] = []
        with torch.enable_grad():
            outs, _ = graph.run(_feeds(graph, batch, False), output_fns={n.name: out_fn(n.name) for n in nodes},
                                input_fns={n.name: in_fn(n.name) for n in nodes}, outputs=[loss.output])
            out = outs[loss.output]
            labels = _labels(batch, loss, graph.device)
            want = [n.name for n in nodes if n.name in zs]
            for d in range(draws):
                terms = loss.fisher_terms(out, labels, gen)
                sampled = terms is not None
                s, c = terms if sampled else loss.terms(out, labels)
                last = d == draws - 1 or not sampled
                grads.append(dict(zip(want, torch.autograd.grad(s, [zs[n] for n in want], allow_unused=True,
                                                                retain_graph=not last))))
                del s, terms
                if last:
                    break
        del outs, out, zs
        size = batch.size

        def per_node():
            for n in nodes:
                gs = [g.pop(n.name, None) for g in grads]
                if gs[0] is None:
                    yield n, None
                    continue
                x = xs.pop(n.name)
                yield n, (_per_sample(n, views[n.name], x, g, size, alphas[n.name]) for g in gs)  # one at a time
        yield size, batch.groups, int(c), sampled, per_node()
        del xs, grads


def sample_gradients(model: onnx.ModelProto, graph: TorchGraph, dataset: Dataset, loss: TaskLoss,
                     nodes: Sequence[CompressibleNode], *, seed: int = 0,
                     progress: Callable[[int], None] | None = None) -> dict[str, SampleGradients]:
    """Every sample's ∇_W ℓ_s for each node of ``nodes`` over ``dataset`` (module doc): one forward and one
    backward per batch for all the nodes. Memory: S · Σ n_i float32 for the result plus one batch's
    activations (the caller groups nodes to bound it). Deterministic for a fixed ``seed``."""
    parts: dict[str, list[np.ndarray]] = {n.name: [] for n in nodes}
    count, sampled = 0, True
    for size, _, c, samp, per_node in _batch_gradients(model, graph, dataset, loss, nodes, seed):
        count += c
        sampled = sampled and samp
        for n, pg in per_node:
            if pg is None:  # the loss does not depend on this node's output: zero curvature
                parts[n.name].append(np.zeros((size, int(np.prod(n.weight_shape))), np.float32))
            else:
                parts[n.name].append(next(pg).to(torch.float32).cpu().numpy())
        if progress:
            progress(1)
    if count == 0:
        raise LLCError("the curvature pass produced no loss terms (all labels ignored?); it needs labelled samples")
    return {n.name: SampleGradients(n.name, tuple(n.weight_shape), np.concatenate(parts[n.name]), count, sampled)
            for n in nodes}


@dataclass
class FisherTrace:
    """tr(F_ii) = Σ_s ‖g_s‖² / N of one node (``sample_gradients``' block without its rows), with the standard
    error of that mean over samples, √S · std_s(‖g_s‖²) / N (samples independent, or clusters of ``groups``
    when the data has them: then the sum over each cluster is the unit). Every term is ≥ 0: never a negative
    trace, and the error is the data's and the drawn labels' spread, not a probe's."""

    node: str
    trace: float
    se: float
    samples: int
    count: int
    sampled: bool
    draws: int = 1  # label draws averaged per sample (1 with the data's labels)


def fisher_traces(model: onnx.ModelProto, graph: TorchGraph, dataset: Dataset, loss: TaskLoss,
                  nodes: Sequence[CompressibleNode], *, seed: int = 0, draws: int = 1,
                  progress: Callable[[int], None] | None = None) -> dict[str, FisherTrace]:
    """The trace of every node's sampled Fisher block (module doc) in one forward and backward per batch for
    all ``nodes`` at once: each sample's squared gradient norm is summed as soon as it is formed, so memory is
    one batch's activations and one node's [B, n] gradients, whatever the number of nodes. The same numbers
    as ``(rows ** 2).sum(1)`` of :func:`sample_gradients` with the same ``seed``. ``draws`` > 1: each sample's
    ‖g_s‖² is the mean over that many label draws (one forward, ``draws`` backward passes per batch) — the same
    expectation with less of the labels' noise; the samples stay the units of the standard error.
    Measured on SmolLM2-135M (12 sequences): the drawn labels are about half of one draw's variance (median
    over nodes), so 3 draws halve the nodes with SE > 10 % (38 → 18 of 211); the rest is the data's spread."""
    sq: dict[str, list[np.ndarray]] = {n.name: [] for n in nodes}
    groups: list[np.ndarray] = []
    count, sampled = 0, True
    for size, ids, c, samp, per_node in _batch_gradients(model, graph, dataset, loss, nodes, seed, draws):
        count += c
        sampled = sampled and samp
        groups.append(ids)
        for n, pgs in per_node:
            norms = [pg.to(torch.float64).square().sum(dim=1).cpu().numpy() for pg in pgs or ()]  # one [B] a draw
            sq[n.name].append(np.mean(norms, axis=0) if norms else np.zeros(size))
        if progress:
            progress(1)
    if count == 0:
        raise LLCError("the curvature pass produced no loss terms (all labels ignored?); it needs labelled samples")
    ids = np.concatenate(groups) if all(g is not None for g in groups) else None
    out = {}
    for n in nodes:
        a = np.concatenate(sq[n.name])
        if ids is not None:                  # clustered data: a cluster's sum is one independent unit
            _, inv = np.unique(ids, return_inverse=True)
            a = np.bincount(inv, weights=a)
        m = a.size
        se = float(math.sqrt(m) * a.std(ddof=1) / count) if m > 1 else float("nan")
        out[n.name] = FisherTrace(n.name, float(a.sum() / count), se, m, count, sampled,
                                  max(1, int(draws)) if sampled else 1)
    return out
