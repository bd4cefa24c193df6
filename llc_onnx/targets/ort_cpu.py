"""ONNX Runtime on CPU (``--target ort-cpu``, the default): the formats ORT 1.31's CPU provider runs faster
than float, and nothing else.

Measured on this machine (AMD EPYC, AVX2 without VNNI, ORT 1.31.1, 1 thread, medians of interleaved runs;
``tests/test_targets_ort_cpu.py`` checks the fusions, ``llc_onnx/targets/latency.py`` measures each node):

===========  =========================================================  =========================================
op           format                                                     why
===========  =========================================================  =========================================
MatMul/Gemm  ``MatMulNBits`` 4-bit, block a power of two ≥ 16,          0.4–0.8× FP32 at batch 1 (576–1024 wide),
             ``accuracy_level=4``                                       0.85–1.1× at 32 rows
MatMul/Gemm  ``MatMulNBits`` 2-bit, block ≥ 32, ``accuracy_level=4``    0.4–0.75× at batch 1; 1.0–1.4× at 32 rows.
                                                                        Block 16 has no int8 kernel: ORT computes
                                                                        it at level 0, 20–30× slower than FP32
MatMul/Gemm  W8A8: int8 weights with 7-bit codes per channel, uint8     MatMulIntegerToFloat / QGemm: 0.4–0.7×
             calibrated activations (``MatMulIntegerToFloat``,          at batch 1 and 32 rows
             ``QGemm``)
MatMul/Gemm  ``MatMulNBits`` 8-bit, ``accuracy_level=4``                0.6–0.75× at batch 1, 1.3–1.7× at 32 rows
                                                                        (offered beside W8A8; latency decides)
MatMul       dynamic W8A8: int8 weights (7-bit codes) per channel,      ``DynamicQuantizeMatMul``; offered with
             uint8 activations quantized per tensor at run time         ``w8a8_activations`` "dynamic"/"both"
             (``DynamicQuantizeLinear → MatMulInteger``, what ORT's     (``--w8a8-activations``; "auto": when a
             ``quantize_dynamic`` writes)                               latency budget is set); latency decides
Conv         W8A8 with the output quantized too (``QLinearConv``),      0.55–0.6× for 64-channel 3×3 convs;
             uint8 activations, 7-bit codes                             1.1–1.5× for 1×1, depthwise, few-channel
                                                                        convs (latency decides)
===========  =========================================================  =========================================

Series terms (``--method series``; T b-bit terms W ≈ Σ_t s_t·Q_t, :mod:`llc_onnx.series`). MatMul/Gemm: the
terms stacked along K as **one** ``MatMulNBits`` with K = T·K' on the input tiled T times
(``Pad → Concat → MatMulNBits``, ``accuracy_level=4`` written on the node, reproduced in the interpreter by the
MatMulNBits input hook), blocks of ``block_size`` for 2, 4 and 8 bits (a power of two ≥ 16; ≥ 32 for 2 bits).
That node is what ORT's optimizer would make of the portable standard form (one blocked ``DequantizeLinear``
feeding the MatMul), but writing it explicitly is needed: ORT fuses a Gemm (or a MatMul + Add) followed by
Relu into a float ``FusedGemm`` *before* its DequantizeLinear fusion, leaving the weight dequantized at every
run in float, and ORT 1.31's INT2 fusion is wrong when N % 4 ≠ 0 (the explicit node is right; both checked in
tests/test_series_flow.py). Conv: the standard form (``DequantizeLinear → Reshape → Conv`` on the tiled
input), not fused. Measured (1 thread, shared 2-core machine, so ±30 %): **series is not faster than FP32 on
ORT CPU**: T = 1 is MatMulNBits itself (0.8–1.2× FP32), each further term adds a Concat and another K of
int8 products: T = 2 ran 1.3–3×, T = 3 1.5–4× FP32's time at batch 64 on 64–784-wide layers, about 2× at
batch 1; Conv in the standard form is slower than FP32 (the weight is dequantized at every run). Series
saves bytes here, not time; with ``--latency-budget`` the latency table decides.

Not offered, with the reason the report shows: 16-bit anything and 2/4-bit Conv (ORT CPU has no such
kernels: a weight-only ``DequantizeLinear`` in front of Conv/MatMul/Gemm is not fused and runs slower than
FP32), W8A8 on a 2-D MatMul whose only consumer is an ``Add`` of a constant (ORT fuses MatMul+Add into a
float Gemm before its Q/DQ fusion, so it stays float), MatMulNBits on a Gemm with ``transA`` or
``alpha ≠ 1`` or a bias that is not ``[N]``.

Why dynamic W8A8 (``llc_onnx.passes.dynamic_w8a8``): a transformer's activations move between inputs, so one
calibrated range per tensor costs loss where a range taken on every run does not; ORT's own advice for
transformers is ``quantize_dynamic``. Dynamic and static W8A8 store the same bytes; they differ in loss (measured
per node, like every level) and time (the per-run min/max pass; the latency table decides). MatMul only: ORT
fuses ``MatMulInteger`` + scale into ``DynamicQuantizeMatMul`` for MatMul; Gemm and Conv keep static W8A8. The
latency table times each dynamic unit with its own ``DynamicQuantizeLinear``; in the model the MatMuls reading
one tensor (q/k/v projections) share one, so the prediction is conservative for them. Measured per unit
(``python -m bench.exp_dynamic_units minilm --nodes …``; AMD EPYC with AVX512-VNNI, 2 threads; bench/RESULTS.md,
"Dynamic W8A8 on ONNX Runtime CPU"): MiniLM's MatMuls run 0.18–0.40× FP32's time dynamic against 1.04–4.4×
static (a bias Add follows each); SmolLM2's 0.2–0.65× either way.

Why 7-bit codes: ORT's int8 GEMM on x86 without VNNI multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds pairs of products in int16 and saturates when the weight codes use the full
int8 range (tests/test_pass_qdq.py::test_int8_matmul_saturation_canary); 7-bit codes are exact (ORT's own
``reduce_range``). ``--w8a8-codes 8`` (``OrtCpuTarget(w8a8_code_bits=8)``) writes full-range codes, half the
weight rounding error, for models that ship to CPUs whose int8 kernels do not saturate — x86 with AVX512-VNNI
or AVX-VNNI (``vpdpbusd`` adds in int32) and ARM64 — refused on a CPU without them (the verdict would be
taken on kernels that saturate) and recorded in the model's metadata (``llc_onnx.w8a8_codes``). Measured on
Fashion-MNIST's ResNet, every Conv W8A8, calibration file only: +0.0012 → +0.0005 CE with min–max ranges,
+0.0011 → +0.0001 with percentile ranges. Why ``accuracy_level=4``: it is what makes 2/8-bit MatMulNBits fast (level 0 is
15–38× slower than FP32 at batch 1) and 4-bit faster than FP32; it quantizes A per block to int8, which
moves outputs by ~0.5 % relative (tests/test_pass_matmulnbits.py); written on the node, it does not depend
on the session, and :func:`llc_onnx.targets.base.input_hook` reproduces it in the interpreter.

Float types: a float16 model keeps float16 (MatMulNBits takes float16 A and float16 scales; measured here);
W8A8 is refused for it (ORT's integer kernels take float32 activations), and so is 16-bit (no smaller than the
float16 weight). ORT's CPU provider has no bfloat16 kernels at all: every level of a bfloat16 node is refused.

Session of the verdict: a default ``InferenceSession(path, providers=["CPUExecutionProvider"])`` — what a
user writes — with graph optimizations on (they do the integer fusions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import onnx

from llc_onnx.compressible import CompressibleNode
from llc_onnx.errors import LLCError
from llc_onnx.passes.dynamic_w8a8 import DynamicW8A8Pass
from llc_onnx.passes.matmulnbits import MatMulNBitsPass, valid_block_size
from llc_onnx.passes.series import SeriesPass
from llc_onnx.series.packing import stacked_block
from llc_onnx.passes.pad_fusion import FusePadIntoConvPass
from llc_onnx.passes.w8a8 import W8A8Pass, W8A8Plan
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

__all__ = ["OrtCpuTarget", "mnb_unsupported", "w8a8_unsupported"]

ACCURACY_LEVEL = 4
#: weight code bits of W8A8 formats: 7 is exact on every x86 CPU, 8 only where int8 kernels do not saturate
W8A8_CODE_BITS = (7, 8)
#: which W8A8 activation forms are offered: calibrated per tensor (static), per run (dynamic), or both
W8A8_ACTIVATIONS = ("static", "dynamic", "both")
NO_DYNAMIC = ("dynamic W8A8 is written for MatMul only (ORT fuses MatMulInteger into DynamicQuantizeMatMul); "
              "this node keeps static W8A8")


def int8_full_range_exact() -> str | None:
    """None when this CPU's ONNX Runtime int8 kernels take full-range int8 weight codes exactly (x86 with
    AVX512-VNNI or AVX-VNNI, ARM64); else why not."""
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return f"cannot read /proc/cpuinfo to check for VNNI on this {machine} CPU"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return None
    return ("this CPU has no AVX512-VNNI/AVX-VNNI: ONNX Runtime's u8s8 kernels add pairs of products in int16 "
            "and saturate with full-range int8 weight codes")

NO_INT16 = ("ORT CPU has no int16 GEMM/Conv kernel: an INT16 DequantizeLinear before the node is not fused and "
            "runs slower than FP32")
NO_LOWBIT_CONV = ("ORT CPU runs Conv in integers only as QLinearConv (8-bit weights and activations); a weight-only "
                  "DequantizeLinear before Conv is not fused (measured slower than FP32)")
NO_BF16 = ("ORT's CPU provider has no bfloat16 MatMul/Gemm/Conv/MatMulNBits kernels (a bfloat16 model runs on GPU "
           "providers)")
TWO_BIT_BLOCK16 = ("2-bit MatMulNBits has no int8 kernel for block 16: ORT computes it in float, 20-30x slower "
                   "than FP32 at batch 1; use a block of 32 or more")


def mnb_unsupported(node: CompressibleNode, ctx: GraphContext) -> str | None:
    """Why ``node`` cannot become MatMulNBits (None when it can)."""
    if len(node.weight_shape) != 2:
        return f"weight has rank {len(node.weight_shape)}; MatMulNBits takes a 2-D weight"
    if node.op_type == "Gemm":
        if ctx.attr(node.name, "transA", 0):
            return "Gemm with transA=1; MatMulNBits takes A untransposed"
        if ctx.attr(node.name, "alpha", 1.0) != 1.0:
            return "Gemm with alpha != 1; MatMulNBits has no output scale"
        ins = ctx.nodes[node.name].input
        if len(ins) > 2 and ins[2]:
            c = ctx.const_shape(ins[2])
            n = node.weight_shape[node.out_axis]
            if c is None or c not in ((n,), (1, n)):
                return "Gemm bias is not a constant [N]; MatMulNBits' bias input is [N]"
    return None


def w8a8_unsupported(node: CompressibleNode, ctx: GraphContext, *, check_add_fusion: bool = True) -> str | None:
    """Why ``node`` has no static W8A8 form that ORT fuses (None when it has)."""
    init = ctx.inits.get(node.weight)
    if init is not None and init.data_type != onnx.TensorProto.FLOAT:
        return "weight is not float32; ORT's integer kernels take float32 activations"
    if node.op_type == "Gemm":
        if ctx.attr(node.name, "transA", 0):
            return "Gemm with transA=1 has no QGemm form"
        ins = ctx.nodes[node.name].input
        if len(ins) > 2 and ins[2]:
            c = ctx.const_shape(ins[2])
            n = node.weight_shape[node.out_axis]
            if c is None or math.prod(c) != n:
                return "Gemm bias is not a constant with one value per output; it cannot be stored as int32"
            if ctx.attr(node.name, "beta", 1.0) != 1.0:
                return "Gemm with beta != 1 cannot take an int32 bias"
    if node.op_type == "MatMul" and check_add_fusion and ctx.input_rank(node.name) == 2:
        out = ctx.nodes[node.name].output[0]
        user = ctx.only_consumer(out)
        if user is not None and user.op_type == "Add" and any(t in ctx.inits for t in user.input if t != out):
            return ("2-D MatMul followed by an Add of a constant: ORT fuses them into a float Gemm before its Q/DQ "
                    "fusion, so W8A8 would run in float")
    return None


def series_unsupported(node: CompressibleNode, ctx: GraphContext, block_size: int) -> str | None:
    """Why ``node``'s series terms cannot be one MatMulNBits (None when they can)."""
    if len(node.weight_shape) != 2:
        return f"weight has rank {len(node.weight_shape)}; MatMulNBits takes a 2-D weight"
    k = node.weight_shape[node.reduce_axis]
    block = stacked_block(k, block_size)
    if not valid_block_size(block):
        return (f"the terms' block is {block} (K={k}, block size {block_size}); MatMulNBits takes a block that is "
                "a power of two ≥ 16")
    return None


def _mnb_format(bits: int, block: int) -> Format:
    return Format("matmulnbits", bits, block, activations="int8-block", accuracy_level=ACCURACY_LEVEL)


class OrtCpuTarget(Target):
    """ONNX Runtime, CPU execution provider (see module docstring for the measured table)."""

    name = "ort-cpu"
    summary = ("ONNX Runtime CPU: MatMulNBits (2/4/8-bit, accuracy level 4), static W8A8 Q/DQ (uint8 activations) "
               "and, on request, dynamic W8A8 (DynamicQuantizeMatMul)")
    table = {
        "MatMul/Gemm": [
            ("MatMulNBits 4-bit, block 2^k ≥ 16, accuracy_level 4", "0.4–0.8× FP32 at batch 1"),
            ("MatMulNBits 2-bit, block 2^k ≥ 32, accuracy_level 4", "0.4–0.75× FP32 at batch 1"),
            ("W8A8 (7-bit codes, uint8 activations) → MatMulIntegerToFloat / QGemm", "0.4–0.7× FP32"),
            ("MatMulNBits 8-bit, accuracy_level 4", "0.6–0.75× FP32 at batch 1 (latency decides)"),
            ("dynamic W8A8 (MatMul; 7-bit codes, uint8 activations per run) → DynamicQuantizeMatMul",
             "with --w8a8-activations dynamic/both (auto: with a latency budget); latency decides"),
        ],
        "Conv": [("W8A8 with output Q/DQ → QLinearConv", "0.55–0.6× FP32 for wide 3×3 convs; slower for "
                                                         "1×1/depthwise/few channels (latency decides)")],
        "any": [("16-bit, weight-only Q/DQ", "not offered: not fused on ORT CPU, slower than FP32")],
        "series (MatMul/Gemm)": [("T terms stacked along K: Pad → Concat_T → one MatMulNBits (K = T·K', "
                                  "accuracy level 4)", "T=1 0.8–1.2× FP32; T=2 1.3–3×, T=3 1.5–4× "
                                  "(slower: saves bytes, not time)")],
        "series (Conv)": [("T terms + DequantizeLinear → Reshape → Conv on the tiled input (standard form)",
                           "not fused: slower than FP32")],
    }

    def __init__(self, *, w8a8_code_bits: int = 7, w8a8_activations: str = "static"):
        if w8a8_code_bits not in W8A8_CODE_BITS:
            raise LLCError(f"ort-cpu: w8a8_code_bits={w8a8_code_bits!r}; use 7 (exact on every x86 CPU) or 8 "
                           "(VNNI x86 and ARM64 only)")
        if w8a8_activations not in W8A8_ACTIVATIONS:
            raise LLCError(f"ort-cpu: w8a8_activations={w8a8_activations!r}; use {', '.join(W8A8_ACTIVATIONS)}")
        self.w8a8_code_bits = int(w8a8_code_bits)
        self.w8a8_activations = w8a8_activations

    def offer(self, node: CompressibleNode, context: GraphContext, *, levels: Sequence[int | str] = LEVELS,
              block_size: int = 32) -> Offer:
        formats: list[Format] = [FLOAT]
        refused: list[tuple[str, str]] = []
        op = node.op_type
        if context.float_type(node) == "bfloat16":
            return Offer(node.name, (FLOAT,), tuple((f"int{lv}", NO_BF16) for lv in levels if lv != "float"))
        for lv in levels:
            if lv == "float":
                continue
            if lv == 16:
                refused.append(("int16", NO_INT16))
                continue
            if op == "Conv":
                if lv == 8:
                    why = w8a8_unsupported(node, context)
                    if why:
                        refused.append(("int8", why))
                    else:
                        formats.append(Format("w8a8", 8, None, code_bits=self.w8a8_code_bits, activations="uint8", output=True))
                else:
                    refused.append((f"int{lv}", NO_LOWBIT_CONV))
                continue
            mnb_why = mnb_unsupported(node, context)
            if mnb_why is None and not valid_block_size(block_size):
                mnb_why = f"block size {block_size} is not a power of two >= 16, which MatMulNBits needs"
            if lv == 8:
                formats += self._w8a8_matmul(node, context, refused)
                if mnb_why:
                    refused.append(("int8 (MatMulNBits)", mnb_why))
                else:
                    formats.append(_mnb_format(8, block_size))
                continue
            if mnb_why:
                refused.append((f"int{lv}", mnb_why))
            elif lv == 2 and block_size < 32:
                refused.append(("int2", TWO_BIT_BLOCK16))
            else:
                formats.append(_mnb_format(int(lv), block_size))
        return Offer(node.name, tuple(formats), tuple(refused))

    def _w8a8_matmul(self, node: CompressibleNode, context: GraphContext, refused: list) -> list[Format]:
        """The W8A8 formats of a MatMul/Gemm (static and/or dynamic, ``w8a8_activations``); refusals appended."""
        out: list[Format] = []
        if self.w8a8_activations in ("static", "both"):
            why = w8a8_unsupported(node, context)
            if why:
                refused.append(("int8 (W8A8)", why))
            else:
                out.append(Format("w8a8", 8, None, code_bits=self.w8a8_code_bits, activations="uint8"))
        if self.w8a8_activations in ("dynamic", "both"):
            why = NO_DYNAMIC if node.op_type != "MatMul" else \
                w8a8_unsupported(node, context, check_add_fusion=False)
            if why:
                refused.append(("int8 (dynamic W8A8)", why))
            else:
                out.append(Format("w8a8", 8, None, code_bits=self.w8a8_code_bits, activations="dynamic"))
        return out

    def offer_series(self, node: CompressibleNode, context: GraphContext, *, bits: Sequence[int] = (2, 4, 8),
                     terms: Sequence[int] = (1, 2, 3, 4), block_size: int = 32) -> Offer:
        formats: list[Format] = [FLOAT]
        refused: list[tuple[str, str]] = []
        if node.op_type == "Conv":  # the standard form, not fused (module doc)
            formats += [Format("series", int(b), block_size if int(b) < 8 else None, terms=int(t))
                        for b in bits for t in terms]
            return Offer(node.name, tuple(formats), tuple(refused))
        why = series_unsupported(node, context, block_size)
        for b in bits:
            b = int(b)
            if why is None and b == 2 and block_size < 32:
                refused.append(("series int2", TWO_BIT_BLOCK16))
            elif why is not None:
                refused.append((f"series int{b}", why))
            else:
                formats += [Format("series", b, block_size, activations="int8-block", accuracy_level=ACCURACY_LEVEL,
                                   terms=int(t)) for t in terms]
        return Offer(node.name, tuple(formats), tuple(refused))

    def session(self) -> SessionSettings:
        return SessionSettings(
            providers=(("CPUExecutionProvider", ()),),
            description="ONNX Runtime CPU, a default session (graph optimizations on: they make the integer "
                        "kernels); MatMulNBits nodes carry accuracy_level=4 themselves",
        )

    def rewrite(self, model: onnx.ModelProto, plans: Mapping[str, NodePlan]) -> Rewrite:
        self.check_plans(plans, ("float", "matmulnbits", "w8a8", "series"))
        w8 = {n: W8A8Plan(weight=p.weight, input=p.input, output=p.output if p.format.output else None)
              for n, p in plans.items() if p.format.kind == "w8a8" and not p.format.dynamic}
        dyn = {n: p.weight for n, p in plans.items() if p.format.dynamic}
        mnb = {n: p.weight for n, p in plans.items() if p.format.kind == "matmulnbits"}
        levels = {n: int(plans[n].format.accuracy_level) for n in mnb}
        series = {n: p.weight for n, p in plans.items() if p.format.kind == "series"}
        conv = {n: w for n, w in series.items() if len(w.shape) > 2}
        mm = {n: w for n, w in series.items() if n not in conv}
        passes = [FusePadIntoConvPass()] if w8 else []        # exact; keeps Pad → Q/DQ → Conv integer
        out = apply_passes(model, [*passes, W8A8Pass(w8, join_adds=True), DynamicW8A8Pass(dyn),
                                   MatMulNBitsPass(mnb, accuracy_level=levels, unsupported="error"),
                                   SeriesPass(conv), SeriesPass(mm, form="nbits", accuracy_level=ACCURACY_LEVEL)],
                           replaced=[n for n, p in plans.items() if p.format.kind != "float"])
        written = {n: p.format.name for n, p in plans.items() if p.format.kind != "float"}
        return Rewrite(model=out, written=written)


