"""ONNX Runtime with the CUDA execution provider (``--target ort-cuda``).

From ORT's CUDA kernel sources (``contrib_ops/cuda/quantization/matmul_nbits.cc``; not measured here, this
machine has no GPU):

* MatMul / Gemm → ``MatMulNBits`` with 4 or 8 bits (the CUDA kernel rejects other bit widths), block 32,
  64 or 128 (the blocks of its fused GEMV / fpA_intB paths); ``accuracy_level`` is ignored on CUDA and
  written as 0, so a node that falls back to the CPU provider computes the same numbers; a Gemm bias is
  written as a separate ``Add`` (some ORT CUDA builds reject MatMulNBits' bias input).
* Conv: float only — ORT's CUDA provider has no integer Conv kernel (Q/DQ Conv runs dequantized).
* 2 and 16 bits: refused (no CUDA kernel).
* Series terms (MatMul/Gemm, 4 or 8 bits, blocks 32/64/128, K ≥ the block): the explicit
  ``Pad → Concat_T → MatMulNBits(K = T·K')`` form of :mod:`llc_onnx.passes.series` (``form="nbits"``,
  accuracy level 0, Gemm's α/β·C after the node), which ORT's CUDA MatMulNBits kernels run; the input is
  tiled T times (T× the GEMV work). Unmeasured here (no GPU); its numbers are checked on the CPU provider.

Session of the verdict: CUDA execution provider, CPU after it, default options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from llc_onnx.compressible import CompressibleNode
from llc_onnx.passes.matmulnbits import MatMulNBitsPass
from llc_onnx.passes.series import SeriesPass
from llc_onnx.targets.base import (
    FLOAT,
    LEVELS,
    Format,
    GraphContext,
    NodePlan,
    Offer,
    Rewrite,
    SessionSettings,
    Target,
    apply_passes,
)
from llc_onnx.targets.ort_cpu import mnb_unsupported

__all__ = ["OrtCudaTarget", "CUDA_BLOCKS"]

CUDA_BLOCKS = (32, 64, 128)


class OrtCudaTarget(Target):
    """ONNX Runtime CUDA (see module docstring; from kernel sources, unmeasured here)."""

    name = "ort-cuda"
    summary = "ONNX Runtime CUDA: MatMulNBits 4/8-bit (blocks 32/64/128); Conv stays float (unmeasured here)"
    table = {
        "MatMul/Gemm": [("MatMulNBits 4 or 8 bits, block 32/64/128, bias as Add", "ORT CUDA fused GEMV / GEMM")],
        "Conv": [("float", "no integer Conv kernel in ORT's CUDA provider")],
        "series (MatMul/Gemm)": [("Pad → Concat_T → MatMulNBits 4/8 bits, K = T·K', blocks 32/64/128",
                                  "ORT CUDA MatMulNBits on the tiled input (unmeasured here)")],
    }

    def offer(self, node: CompressibleNode, context: GraphContext, *, levels: Sequence[int | str] = LEVELS,
              block_size: int = 32) -> Offer:
        formats: list[Format] = [FLOAT]
        refused: list[tuple[str, str]] = []
        for lv in levels:
            if lv == "float":
                continue
            if node.op_type == "Conv":
                refused.append((f"int{lv}", "ORT's CUDA provider has no integer Conv kernel"))
            elif lv not in (4, 8):
                refused.append((f"int{lv}", "ORT's CUDA MatMulNBits takes 4 or 8 bits"))
            elif block_size not in CUDA_BLOCKS:
                refused.append((f"int{lv}", f"block {block_size}: ORT's CUDA MatMulNBits paths take {CUDA_BLOCKS}"))
            else:
                why = mnb_unsupported(node, context)
                if why:
                    refused.append((f"int{lv}", why))
                else:
                    formats.append(Format("matmulnbits", int(lv), block_size, accuracy_level=0))
        return Offer(node.name, tuple(formats), tuple(refused))

    def offer_series(self, node: CompressibleNode, context: GraphContext, *, bits: Sequence[int] = (2, 4, 8),
                     terms: Sequence[int] = (1, 2, 3, 4), block_size: int = 32) -> Offer:
        formats: list[Format] = [FLOAT]
        refused: list[tuple[str, str]] = []
        k = node.weight_shape[node.reduce_axis] if node.op_type != "Conv" else 0
        for b in bits:
            b = int(b)
            why = None
            if node.op_type == "Conv":
                why = "ORT's CUDA provider has no integer Conv kernel"
            elif b not in (4, 8):
                why = "ORT's CUDA MatMulNBits takes 4 or 8 bits"
            elif block_size not in CUDA_BLOCKS:
                why = f"block {block_size}: ORT's CUDA MatMulNBits paths take {CUDA_BLOCKS}"
            elif k < block_size:
                why = f"K={k} is smaller than the block {block_size}"
            else:
                why = mnb_unsupported(node, context)
            if why:
                refused.append((f"series int{b}", why))
            else:
                formats += [Format("series", b, block_size, accuracy_level=0, terms=int(t)) for t in terms]
        return Offer(node.name, tuple(formats), tuple(refused))

    def session(self) -> SessionSettings:
        return SessionSettings(providers=(("CUDAExecutionProvider", ()), ("CPUExecutionProvider", ())),
                               description="ONNX Runtime CUDA execution provider, default options")

    def rewrite(self, model: onnx.ModelProto, plans: Mapping[str, NodePlan]) -> Rewrite:
        self.check_plans(plans, ("float", "matmulnbits", "series"))
        mnb = {n: p.weight for n, p in plans.items() if p.format.kind == "matmulnbits"}
        series = {n: p.weight for n, p in plans.items() if p.format.kind == "series"}
        out = apply_passes(model, [MatMulNBitsPass(mnb, accuracy_level=0, bias_input=False, unsupported="error"),
                                   SeriesPass(series, form="nbits", accuracy_level=0)], replaced=[*mnb, *series])
        return Rewrite(model=out, written={n: p.format.name for n, p in plans.items() if p.format.kind != "float"})
