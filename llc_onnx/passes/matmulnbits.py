"""Write MatMul/Gemm weights as ONNX Runtime ``com.microsoft::MatMulNBits`` nodes.

``MatMulNBits`` computes ``Y = A · dequant(B) (+ bias)`` with B stored blocked along the reduction axis K:

* ``B``: uint8 ``[N, ceil(K/bs), bs·bits/8]``, the codes of output column n along K, ``8/bits`` codes per
  byte, the lowest bits first (a code of block j, position i sits in byte ``i·bits // 8`` of that block);
* ``scales``: float ``[N · ceil(K/bs)]`` (row-major ``[N, ceil(K/bs)]``);
* no ``zero_points`` input: ORT then uses ``zp = 2^(bits−1)``, so ``dequant(u) = (u − 2^(bits−1))·scale``.

Our symmetric codes ``q ∈ [−2^(b−1), 2^(b−1)−1]`` (``llc_onnx.quant.QuantizedWeight``) are therefore stored as
``u = q + 2^(b−1)`` and ORT computes exactly ``q·scale``: the same numbers as the QDQ graph of
``passes/qdq.py``. A partial last block is padded with the code of 0 (``u = 2^(b−1)``).

Attributes written: ``K``, ``N``, ``bits`` (2, 4, 8), ``block_size`` (a power of two ≥ 16, what ORT's CPU
kernels accept) and ``accuracy_level``. The accuracy level is written on the node so the numerics do not
depend on the session (the session entry ``session.qdq_matmulnbits_accuracy_level`` only affects the
DQ+MatMul fusion, not an explicit MatMulNBits node). Measured on ONNX Runtime 1.31.1, AVX2 CPU
(tests/test_pass_matmulnbits.py):

* level 0: ``A`` stays float32; the output equals ``A · (q·scale)`` to float rounding (≤ 1e-6 relative);
* level 4: ``A`` is quantized per row and per block of ``block_size`` along K to int8,
  ``a_q = round_half_even(a · 127 / max|a_block|)``, ``a ≈ a_q · max|a_block| / 127``, and the products are
  summed in integers; :func:`level4_input_fake_quant` reproduces it (≤ 1e-6 relative to ORT's output). For
  2-bit weights with ``block_size = 16`` ORT has no int8 kernel and silently computes level 0.

Gemm: ``transA = 0`` and ``alpha = 1`` are required (else the node is left alone and listed in
the result's ``skipped`` with the reason); ``transB`` is handled by the layout; a bias ``C`` of shape
``[N]`` or ``[1, N]`` becomes the ``bias`` input (``beta·C`` precomputed in C's float type when
``beta ≠ 1``); any other C shape leaves the node alone. MatMul: the weight must be the 2-D second input
(``[K, N]``). The new node keeps the original node's name; the float weight is removed once unused
(``apply_passes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from llc_onnx.errors import LLCError
from llc_onnx.passes import common

__all__ = [
    "MS_DOMAIN",
    "MatMulNBitsPass",
    "apply_matmulnbits",
    "level4_input_fake_quant",
    "pack_codes",
    "unpack_codes",
    "valid_block_size",
]

MS_DOMAIN = "com.microsoft"
BITS = (2, 4, 8)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def valid_block_size(block_size: int | None) -> bool:
    """A block size ORT's MatMulNBits CPU kernels accept: a power of two ≥ 16."""
    return block_size is not None and block_size >= 16 and (block_size & (block_size - 1)) == 0


def pack_codes(q_nk: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Signed codes ``q`` laid out ``[N, K]`` → MatMulNBits ``B`` uint8 ``[N, ceil(K/bs), bs·bits/8]``."""
    n, k = q_nk.shape
    nb = -(-k // block_size)
    zero = 1 << (bits - 1)
    u = np.full((n, nb * block_size), zero, dtype=np.uint8)
    u[:, :k] = (np.asarray(q_nk, dtype=np.int32) + zero).astype(np.uint8)
    per = 8 // bits
    u = u.reshape(n, nb, block_size // per, per)
    out = np.zeros((n, nb, block_size // per), dtype=np.uint8)
    for i in range(per):
        out |= (u[..., i] << (i * bits)).astype(np.uint8)
    return out


def unpack_codes(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: signed int32 codes ``[N, K]``."""
    n, nb, blob = b.shape
    per = 8 // bits
    mask = (1 << bits) - 1
    u = np.stack([(b >> (i * bits)) & mask for i in range(per)], axis=-1).reshape(n, nb * blob * per)
    return u[:, :k].astype(np.int32) - (1 << (bits - 1))


def level4_input_fake_quant(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """What MatMulNBits at ``accuracy_level=4`` does to its input A on ORT's CPU: per row, per block of
    ``block_size`` along the last axis, ``round_half_even(a·127/amax)·amax/127`` (a zero block stays 0).
    Differentiable with a straight-through gradient. Use it as an interpreter ``input_fns`` hook."""
    k = x.shape[-1]
    nb = -(-k // block_size)
    pad = nb * block_size - k
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    blocks = xp.reshape(*x.shape[:-1], nb, block_size)
    with torch.no_grad():
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(blocks * inv)  # torch.round: half to even
        deq = q * (amax / 127.0)
    deq = deq.reshape(*x.shape[:-1], nb * block_size)[..., :k]
    return x + (deq - x).detach()


def _check_plan(node: ir.Node, w: np.ndarray, plan: Any, reduce_axis: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    where = f"node '{node.name}'"
    q, bits = common.plan_codes(where, plan, "MatMulNBits plan", BITS)
    block = plan.block_size
    if not valid_block_size(block):
        raise LLCError(f"{where}: MatMulNBits plan has block_size={block}; ONNX Runtime needs a power of two "
                       ">= 16 (quantize this node blocked, e.g. block 32)")
    block = int(block)
    if int(plan.axis) % w.ndim != reduce_axis:
        raise LLCError(f"{where}: MatMulNBits plan is blocked along axis {plan.axis}, the reduction axis is "
                       f"{reduce_axis}; quantize blocked along the reduction axis")
    if q.shape != w.shape:
        raise LLCError(f"{where}: MatMulNBits plan q has shape {q.shape} but the weight is {w.shape}")
    scale = np.asarray(plan.scale, dtype=np.float32)
    want = list(w.shape)
    want[reduce_axis] = -(-w.shape[reduce_axis] // block)
    if scale.shape != tuple(want):
        raise LLCError(f"{where}: MatMulNBits plan scale has shape {scale.shape}, expected {tuple(want)}")
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise LLCError(f"{where}: MatMulNBits plan scale has non-positive or non-finite values; fix the quantizer")
    return q, scale, bits, block


class MatMulNBitsPass(common.RewritePass):
    """Replace planned MatMul/Gemm nodes by ``com.microsoft::MatMulNBits``.

    ``weights``: node name -> QuantizedWeight-like (``q, scale, axis, block_size, bits``), blocked along
    the reduction axis with a power-of-two block ≥ 16 and bits in {2, 4, 8}.
    ``accuracy_level``: written on every node (an int 0..4), or a mapping node name -> level.
    ``bias_input``: a Gemm bias becomes MatMulNBits' ``bias`` input (True) or a following ``Add`` (False:
    some ORT CUDA builds reject the bias input).
    The result (:class:`~llc_onnx.passes.common.RewriteResult`) lists the nodes replaced (``written``) and the
    planned Gemm nodes left alone with the reason (``skipped``: alpha ≠ 1, transA = 1, a bias ORT's bias input
    cannot take); with ``unsupported="error"`` such a node is a failed precondition instead (for a target that
    offered MatMulNBits only where it can be written).
    """

    def __init__(self, weights: Mapping[str, Any], *, accuracy_level: int | Mapping[str, int] = 4,
                 bias_input: bool = True, unsupported: str = "skip"):
        super().__init__()
        if unsupported not in ("skip", "error"):
            raise LLCError(f"MatMulNBitsPass: unsupported='{unsupported}'; use 'skip' or 'error'")
        self.unsupported = unsupported
        self.weights = dict(weights)
        self.accuracy_level = accuracy_level
        self.bias_input = bias_input

    def _level(self, name: str) -> int:
        lvl = self.accuracy_level[name] if isinstance(self.accuracy_level, Mapping) else self.accuracy_level
        if int(lvl) not in ACCURACY_LEVELS:
            raise LLCError(f"node '{name}': accuracy_level={lvl}; MatMulNBits takes 0..4 (4: int8 activations)")
        return int(lvl)

    def check(self, model: ir.Model) -> tuple[list, dict[str, str]]:
        nodes = common.find_nodes(model.graph, self.weights, "MatMulNBits plan")
        jobs, skipped = [], {}
        for node in nodes:
            if node.op_type not in ("MatMul", "Gemm"):
                raise LLCError(f"node '{node.name}' (op {node.op_type}): MatMulNBits replaces MatMul or Gemm only")
            idx, value, w = common.weight_value(node)
            if w.ndim != 2:
                raise LLCError(f"node '{node.name}': weight '{value.name}' has rank {w.ndim}; MatMulNBits needs a "
                               "2-D weight")
            bias = None
            if node.op_type == "Gemm":
                reason = None
                if node.attributes.get_int("transA", 0) != 0:
                    reason = "Gemm with transA=1 (MatMulNBits takes A untransposed)"
                elif node.attributes.get_float("alpha", 1.0) != 1.0:
                    reason = "Gemm with alpha != 1 (MatMulNBits has no output scale)"
                trans_b = node.attributes.get_int("transB", 0)
                if reason is None and len(node.inputs) > 2 and node.inputs[2] is not None:
                    c = node.inputs[2]
                    n_out = w.shape[0] if trans_b else w.shape[1]
                    if c.const_value is None:
                        reason = "Gemm bias C is not a constant"
                    else:
                        cv = c.const_value.numpy()
                        if cv.shape not in ((n_out,), (1, n_out)):
                            reason = f"Gemm bias C has shape {cv.shape}; the MatMulNBits bias is [N]"
                        else:
                            beta = node.attributes.get_float("beta", 1.0)
                            bias = (cv.reshape(n_out) * cv.dtype.type(beta)).astype(cv.dtype) if beta != 1.0 \
                                else cv.reshape(n_out)
                if reason is not None and self.unsupported == "error":
                    raise LLCError(f"node '{node.name}': cannot be written as MatMulNBits ({reason}); choose another "
                                   "format for it")
                if reason is not None:
                    skipped[node.name] = reason
                    continue
                reduce_axis = 1 if trans_b else 0
            else:
                if idx != 1:
                    raise LLCError(f"node '{node.name}': MatMul weight must be the second input")
                reduce_axis = 0
            q, scale, bits, block = _check_plan(node, w, self.weights[node.name], reduce_axis)
            jobs.append((node, value, q, scale, bits, block, reduce_axis, bias, self._level(node.name)))
        return jobs, skipped

    def rewrite(self, model: ir.Model, checked: tuple[list, dict[str, str]]) -> common.RewriteResult:
        jobs, skipped = checked
        graph = model.graph
        names = common.Names(graph)
        if jobs:
            version = model.opset_imports.get(MS_DOMAIN)
            if version is None:
                model.opset_imports[MS_DOMAIN] = 1
                model.graph.opset_imports[MS_DOMAIN] = 1
        written = []
        for node, value, q, scale, bits, block, reduce_axis, bias, level in jobs:
            q_nk = q.T if reduce_axis == 0 else q            # [N, K]
            s_nb = scale.T if reduce_axis == 0 else scale    # [N, nb]
            n, k = q_nk.shape
            b_packed = pack_codes(q_nk, bits, block)
            fdtype = value.const_value.dtype
            base, nname = value.name, node.name
            b_name = names.fresh(f"{base}_mnb{bits}", f"{base}_{nname}_mnb{bits}")
            s_name = names.fresh(f"{base}_mnb_scale", f"{base}_{nname}_mnb_scale")
            b_val = common.add_initializer(graph, b_name, ir.tensor(b_packed, name=b_name))
            s_val = common.add_initializer(
                graph, s_name,
                ir.tensor(np.ascontiguousarray(s_nb).reshape(-1).astype(common.np_float_dtype(fdtype)), name=s_name))
            inputs: list[ir.Value | None] = [node.inputs[0], b_val, s_val]
            old_c = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None:
                c_shape = tuple(old_c.const_value.shape)
                if node.attributes.get_float("beta", 1.0) == 1.0 and len(c_shape) == 1:
                    bias_val = old_c
                else:
                    c_name = names.fresh(f"{nname}_mnb_bias")
                    bias_val = common.add_initializer(graph, c_name, ir.tensor(np.ascontiguousarray(bias), name=c_name))
                inputs += [None, None, bias_val]
            attrs = {"K": int(k), "N": int(n), "bits": bits, "block_size": block, "accuracy_level": level}
            add_bias = None
            if bias is not None and not self.bias_input:
                add_bias = inputs.pop()
                del inputs[3:]
            out = node.outputs[0]
            new = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, num_outputs=1, name=node.name)
            new_out = new.outputs[0]
            new_out.shape, new_out.type = out.shape, out.type
            graph.insert_before(node, new)
            if add_bias is not None:
                add = ir.node("Add", [new_out, add_bias], num_outputs=1, name=names.fresh(f"{nname}_bias_add"))
                add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
                graph.insert_before(node, add)
                new_out.name = names.fresh(f"{out.name}_nobias")
                new_out = add.outputs[0]
            ir.convenience.replace_all_uses_with(out, new_out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            new_out.name = out.name
            written.append(nname)
        return common.RewriteResult(model, modified=bool(jobs), written=tuple(written), skipped=skipped)


def apply_matmulnbits(model: onnx.ModelProto, weights: Mapping[str, Any], *,
                      accuracy_level: int | Mapping[str, int] = 4, bias_input: bool = True) -> onnx.ModelProto:
    """Return a copy of ``model`` with :class:`MatMulNBitsPass` applied (``model`` is not modified)."""
    return common.apply_passes(model, [MatMulNBitsPass(weights, accuracy_level=accuracy_level, bias_input=bias_input)])
