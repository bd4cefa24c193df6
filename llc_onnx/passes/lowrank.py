"""Split a node's weight into two low-rank factors, as two consecutive nodes.

Factor convention (``factors: node name -> (L, R)``), the *matrix view* shared with
``solvers/rank_search``: every weight is a matrix M[K, N] (reduction × outputs) with X·M the node's
linear map — MatMul: M = W[K, N]; Gemm: M = W (transB=0) or Wᵀ (transB=1); Conv: M = W.reshape(O, I·kh·kw)ᵀ.
L is [K, r] and R is [r, N], L·R ≈ M. For Conv the ONNX layouts are accepted too: L [r, I, kh, kw] and
R [O, r, 1, 1] (what :func:`svd_factors` returns for ``kind="conv"``).

Rewrites (``<node>`` named N, weight initializer named W):

* MatMul  ``Y = X·W``            → ``N_lr_a: T = MatMul(X, W_lr_a[K,r])``, ``N_lr_b: Y = MatMul(T, W_lr_b[r,N])``
* Gemm    ``Y = α·A'·B' + β·C``  → ``N_lr_a: T = MatMul(X, W_lr_a)`` (``Gemm(X, W_lr_a, transA=1)`` when the
  original has transA=1), ``N_lr_b: Y = Gemm(T, W_lr_b, C, α, β, transB)`` with W_lr_b stored [r, N] for
  transB=0 and [N, r] for transB=1 (the original layout convention is kept).
* Conv    (groups must be 1) → ``N_lr_a: T = Conv(X, W_lr_a[r, I, kh, kw])`` with the original kernel,
  strides, pads, dilations, auto_pad, then ``N_lr_b: Y = Conv(T, W_lr_b[O, r, 1, 1], bias)`` (1×1).

The output tensor keeps its name; the float weight is removed (by ``apply_passes``) when no other node
uses it. The new nodes are ordinary MatMul/Gemm/Conv nodes with initializer weights, i.e. compressible nodes
themselves: quantization (``passes/qdq``) can follow, addressing them as ``<node>_lr_a`` / ``<node>_lr_b``
(reduce/out axes as for any MatMul/Gemm/Conv of that layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from llc_onnx.errors import LLCError
from llc_onnx.passes import common

__all__ = ["LowRankPass", "apply_lowrank", "svd_factors", "matrix_dims"]

_CONV_COPY = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def _kind(kind: str) -> str:
    k = kind.lower()
    if k not in ("matmul", "gemm", "conv"):
        raise LLCError(f"low-rank: kind '{kind}' is not supported; use 'matmul', 'gemm' or 'conv'")
    return "conv" if k == "conv" else "matmul"


def matrix_dims(shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    """(K, N) of the matrix view of a weight of ``shape`` (``kind`` matmul/gemm: the 2-D shape as [K, N]; the
    formulas using it are symmetric in K and N, so the Gemm transB layout does not matter; conv
    W[O, I, kh, kw]: (I·kh·kw, O)). Parameter counts and useful ranks of that view:
    ``solvers.rank_search.factor_params`` / ``useful_ranks``."""
    if _kind(kind) == "conv":
        if len(shape) < 3:
            raise LLCError(f"low-rank: conv weight shape {tuple(shape)} must be [O, I, k...]")
        return int(np.prod(shape[1:])), int(shape[0])
    if len(shape) != 2:
        raise LLCError(f"low-rank: matmul/gemm weight shape {tuple(shape)} must be 2-D")
    return int(shape[0]), int(shape[1])


def svd_factors(w: np.ndarray, r: int, kind: str = "matmul", out_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Truncated-SVD factors with the singular values split evenly (float64 SVD, returned in w's dtype).

    ``kind="matmul"``/``"gemm"``: w is [K, N] (``out_axis=1``, default) or [N, K] (``out_axis=0``, Gemm
    transB=1); with M[K, N] = U S Vᵀ returns L = U_r·sqrt(S_r) [K, r], R = sqrt(S_r)·V_rᵀ [r, N].
    ``kind="conv"``: w is [O, I, kh, kw]; with w.reshape(O, -1) = U S Vᵀ returns
    L = sqrt(S_r)·V_rᵀ → [r, I, kh, kw] and R = U_r·sqrt(S_r) → [O, r, 1, 1].
    """
    w = np.asarray(w)
    k, n = matrix_dims(w.shape, kind)
    if not 1 <= r <= min(k, n):
        raise LLCError(f"low-rank: rank {r} is out of range [1, {min(k, n)}] for weight {tuple(w.shape)}")
    dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
    if _kind(kind) == "conv":
        u, s, vt = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:r])
        left = (root[:, None] * vt[:r]).reshape(r, *w.shape[1:])
        right = (u[:, :r] * root).reshape(w.shape[0], r, *([1] * (w.ndim - 2)))
        return left.astype(dtype), right.astype(dtype)
    axis = 1 if out_axis is None else out_axis % 2
    m = w if axis == 1 else w.T
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(dtype), (root[:, None] * vt[:r]).astype(dtype)


def _attrs(node: ir.Node) -> dict[str, ir.Attr]:
    """Copies of the node's attributes (safe to attach to new nodes)."""
    return {k: ir.Attr(a.name, a.type, a.value) for k, a in node.attributes.items()}


class LowRankPass(common.RewritePass):
    """Replace each named MatMul/Gemm/Conv by two nodes computing X·L·R (see module doc). The result's
    ``written`` lists the replaced nodes (now ``<node>_lr_a`` / ``<node>_lr_b``)."""

    def __init__(self, factors: Mapping[str, tuple[Any, Any]]):
        super().__init__()
        self.factors = dict(factors)

    def check(self, model: ir.Model) -> list:
        nodes = common.find_nodes(model.graph, self.factors, "low-rank factors")
        return [(node, *self._check(node)) for node in nodes]

    def rewrite(self, model: ir.Model, plans: list) -> common.RewriteResult:
        graph = model.graph
        names = common.Names(graph)
        for node, value, left, right in plans:
            self._rewrite(graph, names, node, value, left, right)
        return common.RewriteResult(model, modified=bool(plans), written=tuple(n.name for n, *_ in plans))

    def _check(self, node: ir.Node):
        where = f"node '{node.name}' (op {node.op_type})"
        _, value, w = common.weight_value(node)
        pair = self.factors[node.name]
        try:
            left, right = (np.asarray(f) for f in pair)
        except (TypeError, ValueError):
            raise LLCError(f"{where}: low-rank factors must be a pair (L, R) of arrays") from None
        if node.op_type == "Conv":
            if node.attributes.get_int("group", 1) != 1:
                raise LLCError(f"{where}: low-rank factorisation of grouped Conv (group > 1) is not supported; leave this node out")
            o, sp = w.shape[0], w.shape[2:]
            if left.ndim == 2 and right.ndim == 2:  # matrix view: L [I·k, r], R [r, O]
                r = left.shape[1]
                if left.shape[0] != int(np.prod(w.shape[1:])) or right.shape != (r, o):
                    raise LLCError(f"{where}: factors {left.shape}·{right.shape} do not match weight {w.shape} (matrix view [I*k, r]·[r, O])")
                left, right = left.T.reshape(r, *w.shape[1:]), right.T.reshape(o, r, *([1] * len(sp)))
            else:
                r = left.shape[0] if left.ndim else 0
                if left.shape[1:] != w.shape[1:] or right.shape != (o, r, *([1] * len(sp))):
                    raise LLCError(
                        f"{where}: factors {left.shape}, {right.shape} do not match weight {w.shape}; "
                        f"expected [r, {', '.join(map(str, w.shape[1:]))}] and [{o}, r, {', '.join('1' * len(sp))}]"
                    )
        else:
            if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                k, n = w.shape[1], w.shape[0]
            else:
                k, n = w.shape
            if left.ndim != 2 or right.ndim != 2 or left.shape[0] != k or right.shape[1] != n or left.shape[1] != right.shape[0]:
                raise LLCError(
                    f"{where}: factors {left.shape}·{right.shape} do not match the weight as [K, N] = [{k}, {n}]; "
                    "give L [K, r] and R [r, N]"
                )
            r = left.shape[1]
        if r < 1:
            raise LLCError(f"{where}: low-rank factors have rank 0")
        dtype = w.dtype
        if not (np.all(np.isfinite(left)) and np.all(np.isfinite(right))):
            raise LLCError(f"{where}: low-rank factors contain NaN or inf")
        return value, left.astype(dtype), right.astype(dtype)

    def _rewrite(self, graph, names, node, value, left, right) -> None:
        nname, wname = node.name, value.name
        a_name = names.fresh(f"{wname}_lr_a", f"{wname}_{nname}_lr_a")
        b_name = names.fresh(f"{wname}_lr_b", f"{wname}_{nname}_lr_b")
        x = node.inputs[0]
        out = node.outputs[0]
        fdtype = value.const_value.dtype
        mid = ir.Value(name=names.fresh(f"{nname}_lr_mid"), type=ir.TensorType(fdtype))
        new_out = ir.Value(name=names.fresh(f"{nname}_lr_out"), type=out.type, shape=out.shape)
        attrs = _attrs(node)
        if node.op_type == "MatMul":
            a_val = common.add_initializer(graph, a_name, ir.tensor(left, name=a_name))
            b_val = common.add_initializer(graph, b_name, ir.tensor(right, name=b_name))
            first = ir.node("MatMul", [x, a_val], outputs=[mid], name=names.fresh(f"{nname}_lr_a"))
            second = ir.node("MatMul", [mid, b_val], outputs=[new_out], name=names.fresh(f"{nname}_lr_b"))
        elif node.op_type == "Gemm":
            trans_b = node.attributes.get_int("transB", 0)
            a_val = common.add_initializer(graph, a_name, ir.tensor(left, name=a_name))
            b_store = np.ascontiguousarray(right.T) if trans_b else right
            b_val = common.add_initializer(graph, b_name, ir.tensor(b_store, name=b_name))
            if node.attributes.get_int("transA", 0):
                first = ir.node("Gemm", [x, a_val], {"transA": 1}, outputs=[mid], name=names.fresh(f"{nname}_lr_a"))
            else:
                first = ir.node("MatMul", [x, a_val], outputs=[mid], name=names.fresh(f"{nname}_lr_a"))
            inputs = [mid, b_val, *node.inputs[2:]]
            keep = {k: v for k, v in attrs.items() if k != "transA"}
            second = ir.Node("", "Gemm", inputs, keep.values(), outputs=[new_out], name=names.fresh(f"{nname}_lr_b"))
        else:  # Conv, group == 1
            a_val = common.add_initializer(graph, a_name, ir.tensor(left, name=a_name))
            b_val = common.add_initializer(graph, b_name, ir.tensor(right, name=b_name))
            first_attrs = [attrs[k] for k in _CONV_COPY if k in attrs]
            first = ir.Node("", "Conv", [x, a_val], first_attrs, outputs=[mid], name=names.fresh(f"{nname}_lr_a"))
            inputs = [mid, b_val, *node.inputs[2:]]
            second = ir.node("Conv", inputs, {"kernel_shape": [1] * (left.ndim - 2)}, outputs=[new_out],
                             name=names.fresh(f"{nname}_lr_b"))
        graph.insert_before(node, [first, second])
        out_name = out.name
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = names.fresh(f"{out_name}_replaced")
        new_out.name = out_name


def apply_lowrank(model: onnx.ModelProto, factors: Mapping[str, tuple[Any, Any]]) -> onnx.ModelProto:
    """Return a copy of ``model`` with :class:`LowRankPass` applied (``model`` is not modified)."""
    return common.apply_passes(model, [LowRankPass(factors)])
