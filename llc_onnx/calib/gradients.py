"""One forward+backward pass over the calibration data: loss, weight and input gradients per node.

For the mean task loss  L = (Σ_b S_b) / (Σ_b n_b)  (S_b the summed loss of batch b, n_b its count), the
gradient w.r.t. node i's weight is  g_w,i = (Σ_b ∂S_b/∂W_i) / Σ_b n_b,  accumulated batch by batch, so memory
stays one batch of activations plus one accumulator per weight. Gradients are taken *through the node*
(node-local aliases from :meth:`TorchGraph.run`), so a shared initializer gets one gradient per user.

With it, the first-order LLC prediction for weight noise δ on node i is  ΔL ≈ Σ g_w,i · δ  (exact for the
mean gradient because δ does not depend on the sample). Input (activation) noise ε depends on the sample, so
the prediction  ΔL ≈ (1/N) Σ_samples g_x · ε(x)  is accumulated inside the pass for every candidate activation
quantizer given in ``act_candidates`` (their scales come from a cheap forward pass, :func:`collect_ranges`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .. import memory
from ..compressible import CompressibleNode
from ..errors import LLCError
from ..interpreter import TorchGraph
from .data import Batch, Dataset
from .losses import TaskLoss

Progress = Callable[[int], None] | None


@dataclass
class NodeStats:
    """What the solvers need to know about one compressible node."""

    node: str
    grad_w: np.ndarray  # ∂L/∂W of the mean calibration loss (the interpreter's dtype: float32, ONNX layout)
    grad_w_abs: np.ndarray | None  # mean over batches of |∂L_b/∂W| (L_b the batch mean loss); None if not asked
    grad_w_sq: np.ndarray | None  # mean over batches of (∂L_b/∂W)², a Fisher-diagonal estimate; None if not asked
    grad_x_norm: float  # mean over samples of ‖∂L/∂x‖ (per-sample input-gradient norm, scaled by N)
    x_absmax: float  # max |x| over the calibration data
    x_rms: float  # root mean square of x over the calibration data
    channel_gw: np.ndarray  # Σ over non-output axes of g_w·W per output channel (first-order saliency)
    act_pred: dict[int, float] = field(default_factory=dict)  # act bits -> predicted ΔL of that input quantizer


@dataclass
class GradientPass:
    loss: float
    n: int  # number of loss terms (samples, or tokens for LM losses)
    nodes: dict[str, NodeStats]
    seconds: float


def _labels(batch: Batch, loss: TaskLoss, device) -> torch.Tensor:
    """The batch's labels as the loss reads them (an LM without labels uses its input_ids)."""
    return torch.as_tensor(loss.batch_labels(batch), device=device)


def _feeds(graph: TorchGraph, batch: Batch, grad: bool) -> dict[str, torch.Tensor]:
    feeds = {}
    for name, arr in batch.inputs.items():
        t = torch.as_tensor(arr, device=graph.device)
        if t.is_floating_point():
            t = t.to(graph.dtype)
            if grad:
                t.requires_grad_(True)
        feeds[name] = t
    return feeds


@torch.no_grad()
def collect_ranges(graph: TorchGraph, dataset: Dataset, nodes: Sequence[CompressibleNode],
                   progress: Progress = None) -> dict[str, float]:
    """Forward-only pass: max |x| of every node's input over the data (per-tensor activation ranges)."""
    absmax = {n.name: 0.0 for n in nodes}
    names = [n.name for n in nodes]
    for batch in dataset.batches:
        _, cap = graph.run(_feeds(graph, batch, False), capture=names)
        for name in names:
            absmax[name] = max(absmax[name], float(cap[name][1].abs().max()))
        if progress:
            progress(1)
    return absmax


def collect_gradients(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, nodes: Sequence[CompressibleNode],
                      act_candidates: dict[str, dict[int, Callable[[torch.Tensor], torch.Tensor]]] | None = None,
                      progress: Progress = None, magnitudes: bool = False, *, segments: int = 0,
                      spill=None) -> GradientPass:
    """Run the calibration data once through forward+backward and accumulate :class:`NodeStats`.

    ``act_candidates[node][bits]`` is a fake-quantizer of that node's input; its predicted ΔL
    (1/N) Σ g_x·(q(x) − x) is accumulated into ``NodeStats.act_pred[bits]``. ``magnitudes=True`` also keeps
    the |g| and g² accumulators (``grad_w_abs`` / ``grad_w_sq``: two more copies of every weight), which only
    the Fisher baseline reads. Weight-gradient accumulators are in the interpreter's dtype (float32 for the
    usual float32 graph: one weight-sized buffer per node, summed in place), so the pass holds about one copy
    of the weights besides the model itself.

    Memory for large models (both leave every number unchanged, bit for bit):

    * ``segments`` > 1: the forward runs in that many checkpointed pieces (:meth:`TorchGraph.run`), so the
      backward holds one piece's activations at a time instead of the whole forward's, for about one more
      forward pass of time;
    * ``spill`` (a :class:`llc_onnx.memory.Spill`): the weight-gradient accumulators are files mapped back
      writable; each node's pages leave the process's memory after its update (``memory.drop``), and
      ``NodeStats.grad_w`` is that file's map (owned by ``spill``; keep it alive as long as the result).
    """
    t0 = time.perf_counter()
    names = [n.name for n in nodes]
    act_candidates = act_candidates or {}
    acc_g = {n: None for n in names}
    acc_abs = {n: None for n in names}
    acc_sq = {n: None for n in names}
    gx_norm = {n: 0.0 for n in names}
    x_absmax = {n: 0.0 for n in names}
    x_sq = {n: 0.0 for n in names}
    x_count = {n: 0 for n in names}
    act_acc = {n: {b: 0.0 for b in act_candidates.get(n, {})} for n in names}
    total_sum, total_n, n_batches = 0.0, 0, 0

    mapped: dict[str, np.ndarray] = {}  # node -> the file map behind acc_g[node] (with ``spill``)

    def add_weight_grad(name: str, gw: torch.Tensor, count: int) -> None:
        if spill is not None:
            if name not in mapped:
                mapped[name] = spill.zeros(tuple(gw.shape), torch.empty((), dtype=graph.dtype).numpy().dtype)
                acc_g[name] = torch.from_numpy(mapped[name])
                acc_g[name].copy_(gw)  # the same values as the in-memory copy below
            else:
                acc_g[name].add_(gw)
            memory.drop(mapped[name])
        elif acc_g[name] is None:
            acc_g[name] = gw.to(graph.dtype, copy=True)   # own buffer: autograd may share storage
        else:
            acc_g[name].add_(gw)
        if magnitudes:
            per_batch = gw / max(count, 1)
            sq = per_batch * per_batch
            ab = per_batch.abs_()
            acc_abs[name] = ab if acc_abs[name] is None else acc_abs[name].add_(ab)
            acc_sq[name] = sq if acc_sq[name] is None else acc_sq[name].add_(sq)

    def add_input_grad(name: str, x: torch.Tensor | None, gx: torch.Tensor) -> None:
        gx = gx.detach().to(torch.float64)
        b = gx.shape[0] if gx.dim() > 0 else 1
        gx_norm[name] += float(gx.reshape(b, -1).norm(dim=1).sum())
        for bits, fq in act_candidates.get(name, {}).items():
            eps = (fq(x) - x).to(torch.float64)
            act_acc[name][bits] += float((gx * eps).sum())

    for batch in dataset.batches:
        # each node reads its weight through its own leaf (a detached view: no copy), so the backward pass hands
        # over ∂S_b/∂W one node at a time (accumulated, then freed) instead of every node's at once
        leaves: dict[str, torch.Tensor] = {}

        def own_leaf(w, name):
            leaves[name] = w.detach().requires_grad_(True)
            return leaves[name]

        fns = {name: (lambda w, name=name: own_leaf(w, name)) for name in names}
        outs, cap = graph.run(_feeds(graph, batch, True), weight_fns=fns, capture=names, outputs=[loss.output],
                              segments=segments)
        s, count = loss.terms(outs[loss.output], _labels(batch, loss, graph.device))
        seen: set[str] = set()
        kept: dict[str, torch.Tensor] = {}  # inputs the backward combines with their gradient (activation candidates)

        def on_weight(leaf, name):
            seen.add(name)
            gw, leaf.grad = leaf.grad, None
            add_weight_grad(name, gw.detach(), count)

        def on_input(gx, name):
            add_input_grad(name, kept.get(name), gx)

        hooks, targets, leaf_xs = [], list(leaves.values()), []
        x = xd = None
        for name in names:
            x = cap[name][1]
            xd = x.detach()
            x_absmax[name] = max(x_absmax[name], float(xd.abs().max()))
            x_sq[name] += float((xd.to(torch.float64) ** 2).sum())
            x_count[name] += xd.numel()
            hooks.append(leaves[name].register_post_accumulate_grad_hook(lambda t, name=name: on_weight(t, name)))
            if x.requires_grad:
                if act_candidates.get(name):
                    kept[name] = xd
                hooks.append(x.register_hook(lambda g, name=name: on_input(g, name)))
                # a non-leaf input as its gradient edge: the hook sees its gradient, and no .grad is kept for it
                if x.grad_fn is None:
                    leaf_xs.append(x)
                    targets.append(x)
                else:
                    targets.append(torch.autograd.graph.get_gradient_edge(x))
        # the captured inputs are let go: the backward reads from its graph (or recomputes pieces), not from them
        del cap, x, xd
        if s.requires_grad:
            torch.autograd.backward(s, inputs=targets)
        for h in hooks:
            h.remove()
        for x in leaf_xs:
            x.grad = None
        for name in names:
            if name not in seen:  # no path from the loss to this node's weight: a zero gradient
                add_weight_grad(name, torch.zeros_like(leaves[name]), count)
        total_sum += float(s.detach())
        total_n += int(count)
        n_batches += 1
        del outs, targets, leaves, kept, leaf_xs, hooks
        if spill is not None:
            memory.trim(memory.TASK_TRIM_BYTES)  # the batch's freed activations back to the OS before the next
        if progress:
            progress(1)
    if total_n == 0:
        raise LLCError(f"{dataset.source}: no loss terms (every label is the ignore index?); "
                       "the calibration data needs labelled samples")
    stats = {}
    by_name = {n.name: n for n in nodes}
    for name in names:
        node = by_name[name]
        g = acc_g.pop(name).div_(total_n).cpu().numpy()
        if name in mapped:
            g = mapped.pop(name)  # the same values, as the file's map
        w = graph.params[node.weight].detach().cpu().numpy()
        other = tuple(a for a in range(g.ndim) if a != node.out_axis)
        channel_gw = np.sum(g * w, axis=other, dtype=np.float64)
        memory.drop(g)
        stats[name] = NodeStats(
            node=name,
            grad_w=g,
            grad_w_abs=acc_abs.pop(name).div_(n_batches).cpu().numpy() if magnitudes else None,
            grad_w_sq=acc_sq.pop(name).div_(n_batches).cpu().numpy() if magnitudes else None,
            grad_x_norm=gx_norm[name] / total_n,
            x_absmax=x_absmax[name],
            x_rms=float(np.sqrt(x_sq[name] / max(x_count[name], 1))),
            channel_gw=channel_gw,
            act_pred={b: v / total_n for b, v in act_acc[name].items()},
        )
    return GradientPass(loss=total_sum / total_n, n=total_n, nodes=stats, seconds=time.perf_counter() - t0)
