"""Baseline compressors the benchmark compares llc-onnx with, on the same splits and size accounting.

* :func:`ort_int8`   ONNX Runtime ``quantize_static``: QDQ, per-channel symmetric INT8 weights, INT8
  activations (MinMax calibration over the calibration split).
* :func:`ort_int4`   ONNX Runtime ``MatMulNBitsQuantizer``: 4-bit weight-only, block 32, symmetric, on the
  MatMul nodes with a constant weight (conv / Gemm nodes are not covered by it).
* :func:`hawq_costs` / :func:`fisher_costs` + :func:`allocate`: mixed precision by a second-order proxy,
  HAWQ-V2 style (cost of level j of node i = ½·tr(H_ii)/n_i·‖δ_ij‖², Hutchinson trace from
  ``llc_onnx.solvers.hessian``) or diagonal-Fisher style (ModelOpt AutoQuantize: ½·Σ F⊙δ², F the mean
  squared batch gradient from ``llc_onnx.calib.gradients``). Same quantizers as llc (nearest rounding, same
  block size and scale method), same grouped knapsack and byte budget, same QDQ rewrite; no back-off.
* :func:`uniform_svd` plain truncated SVD with one rank fraction for every node, the largest whose total
  parameter count does not exceed a target (the llc compact low-rank result).

Sizes: :func:`weight_bytes` counts, in any of the produced models, the bytes of the constant weights of
MatMul / Gemm / Conv / MatMulNBits nodes, through DequantizeLinear (quantized values packed at their bit
width + scales + zero points when stored). Biases are not counted (llc's reports do not count them either).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from llc_onnx.model_io import tensor_nbytes
from llc_onnx.quant import WeightQuantSpec, quantize_weight

LEVELS = (2, 4, 8, 16, 0)  # llc's default ladder: 0 = float
WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "MatMulNBits": 1}


# ----------------------------------------------------------------------------------------- sizes
def weight_bytes(model: onnx.ModelProto) -> tuple[int, int]:
    """(bytes, number of weight-bearing nodes): constant weights of MatMul/Gemm/Conv (through
    DequantizeLinear) and MatMulNBits (B + scales + zero points)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:  # Constant nodes count like initializers
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits.setdefault(n.output[0], n.attribute[0].t)

    def const_bytes(name: str, depth: int = 0) -> int | None:
        if name in inits:
            return tensor_nbytes(inits[name])
        p = producers.get(name)
        if p is None or depth > 3:
            return None
        if p.op_type == "DequantizeLinear":
            parts = [const_bytes(i, depth + 1) for i in p.input if i]
            return None if any(x is None for x in parts) else sum(parts)
        if p.op_type in ("Transpose", "Reshape", "Identity", "Cast"):
            return const_bytes(p.input[0], depth + 1)
        return None

    total, count = 0, 0
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        if n.op_type == "MatMulNBits":
            b = sum(tensor_nbytes(inits[i]) for i in n.input[1:4] if i and i in inits and i != n.input[0])
        else:
            b = const_bytes(n.input[1])
            if b is None:
                continue
        total += b
        count += 1
    return total, count


# ---------------------------------------------------------------------------------------- ORT INT8
class NpzReader:
    """onnxruntime ``CalibrationDataReader`` over the batches of a :class:`llc_onnx.calib.data.Dataset`."""

    def __init__(self, dataset):
        self._it = iter([dict(b.inputs) for b in dataset.batches])

    def get_next(self):
        return next(self._it, None)


def ort_int8(model_path: str, calib_dataset, out_path: str) -> dict:
    """quantize_static: QDQ, per-channel symmetric int8 weights, int8 activations, MinMax."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    info = {}
    with tempfile.TemporaryDirectory() as d:
        pre = os.path.join(d, "pre.onnx")
        big = os.path.getsize(model_path) > 1_500_000_000
        try:
            quant_pre_process(model_path, pre, save_as_external_data=big)
            src = pre
            info["pre_process"] = "quant_pre_process"
        except Exception as exc:  # shape inference can fail on exported LMs; quantize the model as is
            src = model_path
            info["pre_process"] = f"skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        quantize_static(src, out_path, NpzReader(calib_dataset), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                        extra_options={"WeightSymmetric": True})
    return info


# ---------------------------------------------------------------------------------------- ORT INT4
def matmul_weight_nodes(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def ort_int4(model_path: str, out_path: str) -> dict:
    """MatMulNBitsQuantizer(block 32, symmetric). Returns {"covered": [...], "total_matmul": k} or raises
    NotApplicable when the model has no MatMul with a constant weight."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(model_path)
    mm = matmul_weight_nodes(model)
    if not mm:
        raise NotApplicable("no MatMul with a constant weight (conv/Gemm-only model)")
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    q.process()
    out = q.model.model
    covered = [n.name for n in out.graph.node if n.op_type == "MatMulNBits"]
    big = out.ByteSize() > 1_500_000_000
    onnx.save(out, out_path, save_as_external_data=big)
    return {"covered": covered, "total_matmul": len(mm)}


class NotApplicable(Exception):
    pass


# ------------------------------------------------------------------------------ HAWQ / Fisher costs
@dataclass
class LevelTable:
    """Per node: the quantized weights of each level (same quantizers as llc, nearest rounding)."""

    nodes: list[str]
    levels: dict[str, list[int]]  # node -> bits per level (0 = float)
    sizes: dict[str, list[int]]  # node -> bytes per level
    deltas_sq: dict[str, list[float]]  # node -> ‖δ‖² per level
    quantized: dict[str, dict[int, object]] = field(default_factory=dict)  # node -> bits -> QuantizedWeight
    fisher: dict[str, list[float]] = field(default_factory=dict)  # node -> Σ F⊙δ² per level (when given)


def spec_for(bits: int, block_size: int = 32, scale: str = "mse") -> WeightQuantSpec:
    """The llc quantizer of a level (llc: blocked along the reduction axis for ≤ 4 bits), nearest rounding."""
    return WeightQuantSpec(bits=bits, block_size=block_size if bits <= 4 else None, scale_method=scale,
                           rounding="nearest")


def level_table(weights: dict[str, tuple[np.ndarray, int, int]], levels=LEVELS, block_size: int = 32,
                scale: str = "mse", fisher: dict[str, np.ndarray] | None = None) -> LevelTable:
    """``weights``: node -> (W float, out_axis, reduce_axis). ``fisher``: node -> F (same shape as W)."""
    t = LevelTable(list(weights), {}, {}, {}, {}, {})
    for name, (w, out_axis, reduce_axis) in weights.items():
        w = np.asarray(w, dtype=np.float64)
        t.levels[name], t.sizes[name], t.deltas_sq[name], t.quantized[name] = [], [], [], {}
        if fisher is not None:
            t.fisher[name] = []
        for bits in levels:
            if bits == 0:
                size, d2, fd = 4 * w.size, 0.0, 0.0
            else:
                qw = quantize_weight(w, spec_for(bits, block_size, scale), out_axis, reduce_axis)
                delta = qw.dequant.astype(np.float64) - w
                size, d2 = int(qw.nbytes), float((delta * delta).sum())
                fd = float((fisher[name] * delta * delta).sum()) if fisher is not None else 0.0
                t.quantized[name][bits] = _compact(qw)
            t.levels[name].append(bits)
            t.sizes[name].append(size)
            t.deltas_sq[name].append(d2)
            if fisher is not None:
                t.fisher[name].append(fd)
    return t


def _compact(qw):
    """The QuantizedWeight without its float dequant copy and with q in the smallest integer dtype (memory:
    SmolLM2 has 135M weights × 4 levels)."""
    import dataclasses

    q = qw.q.astype(np.int8 if qw.bits <= 8 else np.int16)
    return dataclasses.replace(qw, q=q, dequant=None)


def dequant(qw) -> np.ndarray:
    """q · scale broadcast (float64), per-channel or blocked along ``axis`` (see llc_onnx.quant.QuantizedWeight)."""
    q = np.asarray(qw.q, dtype=np.float64)
    s = np.asarray(qw.scale, dtype=np.float64)
    if qw.block_size is None:
        shape = [1] * q.ndim
        shape[qw.axis] = -1
        return q * s.reshape(shape)
    s = np.repeat(s, qw.block_size, axis=qw.axis)
    s = np.take(s, np.arange(q.shape[qw.axis]), axis=qw.axis)
    return q * s


def hawq_costs(table: LevelTable, traces: dict[str, float], numel: dict[str, int]) -> list[list[float]]:
    """HAWQ-V2: cost_ij = ½ · tr(H_ii)/n_i · ‖δ_ij‖² (the average Hessian eigenvalue times the noise energy)."""
    return [[0.5 * traces[n] / numel[n] * d2 for d2 in table.deltas_sq[n]] for n in table.nodes]


def fisher_costs(table: LevelTable) -> list[list[float]]:
    """Diagonal Fisher (AutoQuantize-style): cost_ij = ½ · Σ F_i ⊙ δ_ij²."""
    if not table.fisher:
        raise ValueError("level_table was built without fisher=...; pass the squared gradients")
    return [[0.5 * f for f in table.fisher[n]] for n in table.nodes]


def allocate(table: LevelTable, costs: list[list[float]], budget: int) -> dict[str, int]:
    """Grouped knapsack (llc's solver) at ``budget`` bytes -> node -> bits (0 = float)."""
    from llc_onnx.solvers.knapsack import solve_budget

    sizes = [table.sizes[n] for n in table.nodes]
    pick = solve_budget(costs, sizes, int(budget))
    return {n: table.levels[n][j] for n, j in zip(table.nodes, pick)}


def allocation_bytes(table: LevelTable, choice: dict[str, int]) -> int:
    return sum(table.sizes[n][table.levels[n].index(b)] for n, b in choice.items())


def rewrite(model: onnx.ModelProto, table: LevelTable, choice: dict[str, int]) -> onnx.ModelProto:
    from llc_onnx.passes.qdq import apply_qdq

    weights = {n: table.quantized[n][b] for n, b in choice.items() if b != 0}
    return apply_qdq(model, weights)


# -------------------------------------------------------------------------------------- uniform SVD
def svd_rank(k: int, n: int, frac: float) -> int | None:
    """Rank of fraction ``frac`` of min(K, N) (at least 1); None when it saves no parameters."""
    r = max(1, int(math.floor(frac * min(k, n))))
    return r if r * (k + n) < k * n else None


def svd_params(shapes: dict[str, tuple[int, int]], frac: float) -> tuple[int, dict[str, int | None]]:
    total, ranks = 0, {}
    for name, (k, n) in shapes.items():
        r = svd_rank(k, n, frac)
        ranks[name] = r
        total += k * n if r is None else r * (k + n)
    return total, ranks


def match_uniform_fraction(shapes: dict[str, tuple[int, int]], target_params: int, steps: int = 4000
                           ) -> tuple[float, int, dict[str, int | None]] | None:
    """The largest uniform rank fraction whose total parameters (factored nodes r·(K+N), the others K·N)
    are ≤ ``target_params``: (fraction, params, ranks), or None when even rank 1 everywhere is too big."""
    best = None
    for i in range(1, steps + 1):
        f = i / steps
        p, ranks = svd_params(shapes, f)
        if p <= target_params and (best is None or p >= best[1]):
            best = (f, p, ranks)
    return best


def uniform_svd(model: onnx.ModelProto, nodes, weights: dict[str, np.ndarray], ranks: dict[str, int | None]
                ) -> onnx.ModelProto:
    """Plain truncated-SVD factors (singular values split evenly) at ``ranks``, via llc's low-rank pass."""
    from llc_onnx.passes.lowrank import apply_lowrank
    from llc_onnx.solvers.rank_search import matrix_view

    factors = {}
    for node in nodes:
        r = ranks.get(node.name)
        if r is None:
            continue
        m = matrix_view(np.asarray(weights[node.name], dtype=np.float64), node)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        root = np.sqrt(s[:r])
        factors[node.name] = ((u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32))
    return apply_lowrank(model, factors)


def matrix_shape(node) -> tuple[int, int]:
    """(K, N) of the node's matrix view (Conv: I·kh·kw × O)."""
    s = node.weight_shape
    if node.op_type == "Conv":
        return int(np.prod(s[1:])), int(s[0])
    return (int(s[0]), int(s[1])) if node.out_axis == 1 else (int(s[1]), int(s[0]))


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
