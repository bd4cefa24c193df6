"""GPTQ rounding: column-by-column rounding with error feedback through the input Gram matrix.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023). For one layer y = W·x (W as a matrix [N outputs, K inputs]) and calibration inputs
X [n, K], the layer-output error of a rounded Ŵ is

    E(Ŵ) = ‖X Wᵀ − X Ŵᵀ‖²_F = Σ_rows (w − ŵ)ᵀ (XᵀX) (w − ŵ),

a quadratic with the same Hessian H = 2XᵀX for every output row. GPTQ (the Optimal Brain Quantizer with a
fixed column order) rounds column j of every row, then moves the not-yet-rounded columns F to the
minimiser of E given that choice:

    err = (w_j − ŵ_j) / [H_F⁻¹]_jj,     w_F ← w_F − err · [H_F⁻¹]_{j,F},     F ← F \\ {j}.

With U the upper Cholesky factor of H⁻¹ (UᵀU = H⁻¹), row j of U is [H_F⁻¹]_{j,F} / √[H_F⁻¹]_jj for the
remaining set F = {j, j+1, ...}, so every step reads one row of U (the paper's Cholesky reformulation); updates
beyond the current lazy block of columns are applied once per block as one matrix product (lazy batch update).
H is dampened, H + λI with λ = ``damp`` · mean(diag H) (raised ×10 until the Cholesky succeeds); the
result does not depend on the scale of the Gram matrix (2XᵀX, XᵀX or XᵀX/n give the same codes).

Our format (``llc_onnx.quant.weights``): symmetric codes, zero point 0, float32 scales, per output channel or
blocked along the reduction axis. A scale is chosen (by ``spec.scale_method``) when its group is reached —
when the first of its columns comes up for rounding — from the *current* values of its columns, i.e. after
the error feedback of every column rounded before (the reference code computes block scales from values that
miss the updates of the current lazy block; here the lazy block size changes nothing but float rounding).
``static_groups=True`` computes every scale up front from the original weight instead (the scales of
:func:`llc_onnx.quant.quantize_weight` with the same spec). With ``act_order`` columns are rounded in
decreasing order of diag(H) (stable order on ties); a group is still the format's block, so its scale is
computed when its first column *in that order* comes up.

Deviation from the reference code: columns whose input is always zero (diag H = 0) keep their weights
(rounded to nearest) instead of being set to zero, so a model that later sees such inputs is unchanged there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import LLCError
from .weights import (QuantizedWeight, WeightQuantSpec, _check_spec, _checked_weight, _Groups, _scales,
                      conv_matrix_shape, qrange, scale_bytes)

__all__ = ["GPTQMatrix", "gptq_matrix", "quantize_weight_gptq"]

#: rows × K elements per chunk of rows in :func:`_gptq_parts` (a few MB of float64 working copies per chunk)
GPTQ_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class GPTQMatrix:
    """GPTQ result for one weight matrix W [N, K] (rows = outputs, columns = the Gram's K inputs)."""

    q: np.ndarray        # int32 codes [N, K] in [qmin, qmax], original column order
    scale: np.ndarray    # float32 [N, n_groups]: the scale of column group g for row n
    damp: float          # λ added to diag(H) (after any raise needed by the Cholesky)
    proxy_loss: float    # Σ_steps (w_j − ŵ_j)² / (2 [H_F⁻¹]_jj) = ½ Σ_rows (w − ŵ)ᵀ (gram + λI) (w − ŵ)


def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the P matrices h [P, K, K]: U with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H), raised ×10 (up
    to 8 times) until H + λI is PD. Returns U [P, K, K] and λ [P]."""
    n_parts, k = h.shape[0], h.shape[-1]
    mean_diag = (torch.diagonal(h, dim1=-2, dim2=-1).mean(-1) if k else
                 torch.zeros(n_parts, dtype=h.dtype, device=h.device))
    lam = torch.where(mean_diag > 0, damp * mean_diag, torch.ones_like(mean_diag))
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    u = torch.zeros_like(h)
    todo = torch.arange(n_parts, device=h.device)
    for _ in range(9):
        chol, info = torch.linalg.cholesky_ex(h[todo] + lam[todo, None, None] * eye)
        ok = info == 0
        if bool(ok.any()):
            up, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol[ok]), upper=True)
            done = torch.zeros_like(ok)
            done[ok] = info2 == 0
            u[todo[done]] = up[info2 == 0]
            todo = todo[~done]
        if not todo.numel():
            return u, lam
        lam[todo] = torch.where(lam[todo] > 0, lam[todo] * 10, torch.full_like(lam[todo], 1e-8))
    raise LLCError("gptq: the dampened Gram matrix is not positive definite even with λ = "
                   f"{float(lam[todo].max()):.3g}; check the calibration inputs for NaN/Inf or use rounding='nearest'")


def gptq_matrix(w: np.ndarray, gram: np.ndarray, column_groups: np.ndarray, spec: WeightQuantSpec, *,
                damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                lazy_block: int = 128) -> GPTQMatrix:
    """GPTQ-round ``w`` [N, K] against the Gram matrix ``gram`` [K, K] (Σ x xᵀ of the inputs, any scale).

    ``column_groups`` [K]: integer id (0..G-1) of the scale group of each column — every row has its own scale
    per group (per channel: all zeros; blocked: the block index). ``spec`` gives bits and ``scale_method``
    (its ``block_size``/``rounding`` are not read here). See the module docstring for the algorithm."""
    q, scales, lam, proxy = _gptq_parts(np.asarray(w, dtype=np.float64)[None], np.asarray(gram)[None],
                                        column_groups, spec, damp, act_order, static_groups, lazy_block)
    return GPTQMatrix(q=q[0], scale=scales[0], damp=float(lam[0]), proxy_loss=float(proxy[0]))


def _batchable(grams: np.ndarray, groups: np.ndarray, act_order: bool) -> bool:
    """Whether P weight parts can run as one batch: every step of every part reads the same scale group (one
    group, or no reordering), so a lazily computed scale is also taken at the same step."""
    return grams.shape[0] == 1 or not act_order or int(groups.max(initial=0)) == 0


def _gptq_parts(w: np.ndarray, gram: np.ndarray, groups: np.ndarray, spec: WeightQuantSpec, damp: float,
                act_order: bool, static_groups: bool, lazy_block: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ on P independent parts at once: ``w`` [P, N, K] against ``gram`` [P, K, K] (a grouped Conv's groups;
    P = 1 for one matrix), every step batched over the parts (:func:`_batchable` must hold). Returns codes
    [P, N, K] (int32, original column order), scales [P, N, G] (float32), λ [P] and the proxy loss [P]."""
    n_parts, n_rows, k = w.shape
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if k else 0
    h = torch.from_numpy(np.array(gram, dtype=np.float64))
    h = (h + h.transpose(1, 2)) / 2
    dead = torch.diagonal(h, dim1=1, dim2=2) <= 0                      # [P, K]
    h = h.masked_fill(dead[:, :, None] | dead[:, None, :], 0.0)
    h = h + torch.diag_embed(dead.to(h.dtype))
    diag = torch.diagonal(h, dim1=1, dim2=2).numpy()
    order = (np.argsort(-diag, axis=1, kind="stable") if act_order else np.tile(np.arange(k), (n_parts, 1))
             ).astype(np.int64)                                         # [P, K] processing order of each part
    perm = torch.from_numpy(order)
    h = torch.gather(h, 1, perm[:, :, None].expand(n_parts, k, k))
    h = torch.gather(h, 2, perm[:, None, :].expand(n_parts, k, k))
    g_perm = groups[order[0]]                                           # the same in every part (_batchable)
    members = [np.flatnonzero(g_perm == g) for g in range(n_groups)]   # processing positions of each group
    u, lam = _upper_cholesky_of_inverse(h, damp)
    inv = torch.from_numpy(np.argsort(order, axis=1, kind="stable"))
    q_np = np.empty((n_parts, n_rows, k), dtype=np.int32)
    scales = np.zeros((n_parts, n_rows, n_groups), dtype=np.float32)
    proxy = torch.zeros(n_parts, dtype=torch.float64, device="cpu")
    # every row (output) is rounded against the same H alone: rows run in chunks, so a large weight (a 28 M-weight
    # lm_head) needs chunk-sized float64 working copies, not weight-sized ones
    step = max(1, GPTQ_CHUNK_ELEMENTS // max(1, n_parts * k))
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        q_c, s_c, p_c = _gptq_rows(w[:, rows], perm, u, g_perm, members, groups, spec, static_groups, lazy_block)
        q_np[:, rows] = torch.gather(q_c, 2, inv[:, None, :].expand(*q_c.shape)).numpy()
        scales[:, rows] = s_c
        proxy += p_c
    return q_np, scales, lam.numpy(), proxy.numpy()


def _gptq_rows(w: np.ndarray, perm: torch.Tensor, u: torch.Tensor, g_perm: np.ndarray, members: list[np.ndarray],
               groups: np.ndarray, spec: WeightQuantSpec, static_groups: bool, lazy_block: int
               ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The column loop of :func:`_gptq_parts` for some rows ``w`` [P, n, K] (original column order): codes
    [P, n, K] in processing order (int32), scales [P, n, G] and the proxy loss [P] of these rows."""
    n_parts, n_rows, k = w.shape
    n_groups = len(members)
    qmin, qmax = qrange(int(spec.bits))
    scales = np.zeros((n_parts, n_rows, n_groups), dtype=np.float32)
    ready = np.zeros(n_groups, dtype=bool)
    if static_groups:
        for g in range(n_groups):
            scales[:, :, g] = _scales(w[:, :, groups == g].reshape(n_parts * n_rows, -1), None,
                                      spec).reshape(n_parts, n_rows)
        ready[:] = True
    wt = torch.gather(torch.from_numpy(w), 2, perm[:, None, :].expand(n_parts, n_rows, k)).clone()
    q_out = torch.zeros((n_parts, n_rows, k), dtype=torch.int32, device="cpu")   # the algorithm runs on the CPU
    proxy = torch.zeros(n_parts, dtype=torch.float64, device="cpu")
    lazy_block = max(1, int(lazy_block))
    for i1 in range(0, k, lazy_block):
        i2 = min(i1 + lazy_block, k)
        w1 = wt[:, :, i1:i2].clone()
        err1 = torch.zeros((n_parts, n_rows, i2 - i1), dtype=torch.float64, device="cpu")
        for i in range(i2 - i1):
            j = i1 + i
            g = int(g_perm[j])
            if not ready[g]:
                cols = members[g]                       # all ≥ j: none of them is rounded yet
                inside, beyond = cols[cols < i2], cols[cols >= i2]
                vals = torch.empty((n_parts, n_rows, cols.size), dtype=torch.float64, device="cpu")
                vals[:, :, : inside.size] = w1[:, :, inside - i1]
                if beyond.size:
                    bt = torch.from_numpy(beyond)
                    vals[:, :, inside.size:] = wt[:, :, bt] - err1[:, :, :i] @ u[:, i1:j][:, :, bt]
                scales[:, :, g] = _scales(vals.reshape(n_parts * n_rows, -1).numpy(), None,
                                          spec).reshape(n_parts, n_rows)
                ready[g] = True
            s = torch.from_numpy(scales[:, :, g].astype(np.float64))        # [P, n]
            col = w1[:, :, i]
            q = torch.clamp(torch.round(col / s), qmin, qmax)   # torch.round: half to even, like np.rint
            q_out[:, :, j] = q.to(torch.int32)
            e = (col - q * s) / u[:, j, j, None]
            proxy += (e * e).sum(1) / 2
            w1[:, :, i:] -= e[:, :, None] * u[:, None, j, j:i2]
            err1[:, :, i] = e
        if i2 < k:
            wt[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]
    return q_out, scales, proxy


def _column_groups(shape: tuple[int, ...], block_size: int | None, out_axis: int, reduce_axis: int) -> np.ndarray:
    """Scale group (0..G-1) of every column of the weight seen as a matrix [N, K] (rows: ``out_axis``; columns:
    the other axes flattened in C order, the order of a Conv's im2col/unfold view C_in·kH·kW) in the format's
    layout (``_Groups``). Read from a copy of the layout with at most two outputs, which also checks that
    every output splits its columns the same way."""
    small = list(shape)
    small[out_axis] = min(2, shape[out_axis])
    lay = _Groups(tuple(small), block_size, out_axis, reduce_axis)
    size = int(np.prod(small, dtype=np.int64))
    ids = np.arange(1, size + 1, dtype=np.int64).reshape(small)   # 0 marks _Groups' padding
    rows = lay.to_rows(ids)
    scale_of = np.zeros(size + 1, dtype=np.int64)
    scale_of[rows.reshape(-1)] = np.repeat(np.arange(rows.shape[0], dtype=np.int64), rows.shape[1])
    sid = scale_of[np.moveaxis(ids, out_axis, 0).reshape(small[out_axis], -1)]      # [≤2, K] scale index
    _, groups = np.unique(sid[0], return_inverse=True)
    groups = groups.reshape(-1).astype(np.int64)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    for row in sid:
        if np.unique(row).size != n_groups or np.unique(np.stack([groups, row]), axis=1).shape[1] != n_groups:
            raise LLCError(f"gptq: the scale layout of a weight of shape {shape} (axis {lay.axis}) does not split "
                           "into column groups shared by every output; GPTQ needs per-channel or reduction-axis "
                           "blocks")
    return groups


def quantize_weight_gptq(w: np.ndarray, gram: np.ndarray, spec: WeightQuantSpec, out_axis: int, reduce_axis: int,
                         *, damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                         lazy_block: int = 128) -> QuantizedWeight:
    """:func:`llc_onnx.quant.quantize_weight`'s format (same scale layout, codes, dequant, nbytes), rounded by GPTQ.

    ``gram``: the node's input Gram matrix over the reduction, K×K with K = ``w.size / w.shape[out_axis]`` in the
    order of the weight's non-output axes flattened in C order (MatMul [K, N] / Gemm: the input features; Conv
    [M, C/g, kH, kW]: the unfold view C/g·kH·kW), as :func:`llc_onnx.calib.gram.collect_grams` returns it; for a
    grouped Conv [g, K, K], one per group (output channels split into g consecutive parts). ``spec``: bits,
    block_size, scale_method as for ``quantize_weight``; ``spec.rounding`` must be ``"nearest"`` or ``"gptq"``."""
    if spec.rounding not in ("nearest", "gptq"):
        raise LLCError(f"gptq: spec.rounding={spec.rounding!r} cannot be combined with GPTQ rounding; "
                       "use rounding='gptq' (or 'nearest')")
    _check_spec(replace(spec, rounding="nearest"))
    w, out_axis, reduce_axis = _checked_weight(w, out_axis, reduce_axis, "gptq", min_ndim=2)
    if out_axis == reduce_axis:
        raise LLCError(f"gptq: out_axis and reduce_axis are both {out_axis}; pass the weight's two roles")
    gram = np.asarray(gram, dtype=np.float64)
    n_out = w.shape[out_axis]
    k = w.size // max(n_out, 1)
    n_parts = gram.shape[0] if gram.ndim == 3 else 1
    if gram.ndim not in (2, 3) or gram.shape[-2:] != (k, k) or n_out % n_parts:
        raise LLCError(f"gptq: Gram matrix of shape {gram.shape} does not fit a weight of shape {w.shape} "
                       f"(expected [{k}, {k}], or [groups, {k}, {k}] for a grouped Conv with groups dividing "
                       f"{n_out}); collect it with llc_onnx.calib.gram.collect_grams for this node")
    if not np.all(np.isfinite(gram)):
        raise LLCError("gptq: Gram matrix contains NaN or Inf; check the calibration inputs")
    bs = None if spec.block_size is None else int(spec.block_size)
    if bs is not None and w.ndim >= 3:  # a blocked Conv is quantized as its [O, R] matrix (quant.weights' layout)
        if out_axis != 0 or reduce_axis != 1:
            raise LLCError(f"gptq: a blocked rank-{w.ndim} weight is a Conv weight [O, C/g, k…] with out_axis=0, "
                           f"reduce_axis=1 (got {out_axis}, {reduce_axis}); pass those axes")
        res = quantize_weight_gptq(w.reshape(conv_matrix_shape(w.shape)), gram, spec, 0, 1, damp=damp,
                                   act_order=act_order, static_groups=static_groups, lazy_block=lazy_block)
        return replace(res, dequant=res.dequant.reshape(w.shape))
    col_groups = _column_groups(w.shape, bs, out_axis, reduce_axis)
    # no copy of a float64 w (the flows pass one): GPTQ's row chunks read it, and write their own copies
    mat = np.moveaxis(w, out_axis, 0).reshape(n_out, k).astype(np.float64, copy=False)
    grams = gram.reshape(n_parts, k, k)
    part = n_out // n_parts
    q_mat = np.empty((n_out, k), dtype=np.int32)
    s_mat = np.empty((n_out, k), dtype=np.float32)           # the scale of every element
    parts = mat.reshape(n_parts, part, k)
    # a grouped Conv's parts in one batch where their scales come up at the same steps (a depthwise Conv has
    # one part per channel: thousands of tiny problems), else one part after the other
    batches = [slice(0, n_parts)] if _batchable(grams, col_groups, act_order) else \
        [slice(p, p + 1) for p in range(n_parts)]
    for sl in batches:
        q, sc, _, _ = _gptq_parts(parts[sl], grams[sl], col_groups, spec, damp, act_order, static_groups, lazy_block)
        rows = slice(sl.start * part, sl.stop * part)
        q_mat[rows] = q.reshape(-1, k)
        s_mat[rows] = sc.reshape(-1, sc.shape[-1])[:, col_groups]
    del mat
    moved = (n_out,) + tuple(d for i, d in enumerate(w.shape) if i != out_axis)
    back = lambda a: np.ascontiguousarray(np.moveaxis(a.reshape(moved), 0, out_axis))   # noqa: E731
    lay = _Groups(w.shape, bs, out_axis, reduce_axis)
    s_rows = lay.to_rows(back(s_mat))[:, 0]                  # a group's first element is never padding
    del s_mat
    q = back(q_mat)
    dq_rows = lay.to_rows(q).astype(np.float32) * s_rows[:, None]
    dequant = np.ascontiguousarray(lay.from_rows(dq_rows)).astype(np.float32, copy=False)
    scale = np.ascontiguousarray(lay.scale_from_rows(s_rows)).astype(np.float32, copy=False)
    nbytes = -(-int(spec.bits) * int(w.size) // 8) + scale_bytes(spec.float_type) * int(scale.size)
    return QuantizedWeight(q=q, scale=scale, axis=lay.axis, block_size=bs, bits=int(spec.bits),
                           dequant=dequant, nbytes=nbytes)
