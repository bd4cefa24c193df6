"""What a deployment target is: the formats a runtime executes fast per op type, the levels a node may be
offered (and why the others are not), the session the verdict must use, and the rewrite.

A **format** is one way of writing one compressible node (:class:`Format`): float (unchanged), weight-only
Q/DQ (``qdq``), ORT's ``MatMulNBits`` (``matmulnbits``), static W8A8 Q/DQ with calibrated activations
(``w8a8``), a plugin node (``plugin``, written by the plugin helper), or ``series``: T low-bit basis terms
W ≈ Σ_t s_t·Q_t (:mod:`llc_onnx.series`, written by :mod:`llc_onnx.passes.series`), offered per node by
:meth:`Target.offer_series`. A **level** is what the user asks
for (``--bits 2,4,8,16,float``); a target maps each requested level of a node to the formats it runs fast
(:meth:`Target.offer`), or refuses it with the reason (an :class:`Offer`). A **plan** gives each node one
format and its numbers (:class:`NodePlan`); :meth:`Target.rewrite` writes them.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from llc_onnx.compressible import CompressibleNode
from llc_onnx.errors import LLCError, first_line
from llc_onnx.model_io import infer_shapes
from llc_onnx.passes.common import apply_passes  # noqa: F401 - the targets' rewrite runner, exported here
from llc_onnx.quant import WeightQuantSpec, weight_nbytes
from llc_onnx.quant.weights import scale_bytes

__all__ = [
    "apply_passes",
    "input_hook",
    "output_hook",
    "FORMAT_KINDS",
    "LEVELS",
    "Format",
    "FLOAT",
    "NodePlan",
    "Offer",
    "Rewrite",
    "SessionSettings",
    "Target",
    "GraphContext",
    "merge_offers",
    "parse_levels",
]

FORMAT_KINDS = ("float", "qdq", "matmulnbits", "w8a8", "plugin", "series")
#: the levels a user can ask for (``--bits``)
LEVELS = (2, 4, 8, 16, "float")


@dataclass(frozen=True)
class Format:
    """One way of writing a node.

    ``bits``: bits per stored weight code (None: float). ``code_bits``: the range of codes actually used
    (7 for ORT CPU's W8A8, whose int8 kernels saturate with full-range codes on CPUs without VNNI);
    None = ``bits``. ``block_size``: blocked along the reduction axis (None: per output channel).
    ``activations``: ``"uint8"`` / ``"int8"`` calibrated per-tensor activations (W8A8),
    ``"int8-block"`` the dynamic per-block int8 activations of MatMulNBits at accuracy level 4,
    ``"dynamic"`` uint8 per-tensor activations quantized at run time (dynamic W8A8:
    ``DynamicQuantizeLinear → MatMulInteger``, :mod:`llc_onnx.passes.dynamic_w8a8`), or None.
    ``output``: W8A8 also quantizes the node's output (Conv → QLinearConv). ``float_type``: the node's float
    type (``"float32"``, ``"float16"``, ``"bfloat16"``: the weight's), in which the float weight and the scales
    are stored (:meth:`Target.offers` sets it from the model). ``terms``: the number of basis terms T of a
    ``series`` format (bits per term ``bits``, the terms' block ``block_size``).
    """

    kind: str
    bits: int | None = None
    block_size: int | None = None
    code_bits: int | None = None
    activations: str | None = None
    accuracy_level: int | None = None
    output: bool = False
    plugin: str | None = None
    terms: int | None = None
    float_type: str = "float32"

    def __post_init__(self):
        if self.kind not in FORMAT_KINDS:
            raise LLCError(f"format kind '{self.kind}' is unknown; use one of {', '.join(FORMAT_KINDS)}")
        if (self.kind == "series") != (self.terms is not None):
            raise LLCError(f"format {self.kind}: terms={self.terms!r}; series formats (and only they) have a number "
                           "of terms ≥ 1")
        if self.terms is not None and int(self.terms) < 1:
            raise LLCError(f"format series: terms={self.terms!r} must be ≥ 1")

    @property
    def level(self) -> int | str:
        """The user-facing level this format realises (2, 4, 8, 16 or "float")."""
        return "float" if self.kind == "float" else int(self.bits)

    @property
    def name(self) -> str:
        if self.kind == "float":
            return "float"
        parts = {"qdq": "qdq", "matmulnbits": "mnb", "w8a8": "w8a8", "plugin": "plugin", "series": "series"}[self.kind]
        s = f"{parts}-int{self.bits}"
        if self.kind == "series":
            s += f"x{self.terms}"
        if self.code_bits is not None and self.code_bits != self.bits:
            s += f"c{self.code_bits}"
        if self.block_size is not None:
            s += f"-b{self.block_size}"
        if self.activations in ("uint8", "int8", "int16"):
            s += f"-a{self.activations}"
        elif self.activations == "dynamic":
            s += "-adyn"
        if self.accuracy_level is not None:
            s += f"-acc{self.accuracy_level}"
        if self.plugin:
            s += f"-{self.plugin}"
        return s

    @property
    def dynamic(self) -> bool:
        """A W8A8 format whose activations are quantized at run time (no calibrated ranges)."""
        return self.kind == "w8a8" and self.activations == "dynamic"

    def weight_spec(self, *, scale_method: str = "minmax", rounding: str = "nearest") -> WeightQuantSpec | None:
        """The quantizer spec whose codes this format stores (None for float)."""
        if self.kind == "float":
            return None
        return WeightQuantSpec(int(self.code_bits or self.bits), self.block_size, scale_method, rounding,
                               self.float_type)

    def nbytes(self, node: CompressibleNode) -> int:
        """Bytes this format stores for the node's weight (codes, scales, zero points, padding); floats and
        scales at ``float_type``'s size (4 bytes, 2 for float16/bfloat16)."""
        numel = math.prod(node.weight_shape)
        fb = scale_bytes(self.float_type)
        if self.kind == "float":
            return fb * numel
        if self.kind == "series":  # T terms stacked along K, each padded to whole blocks (series.packing)
            from llc_onnx.series.packing import stacked_block

            k = math.prod(node.weight_shape[1:]) if len(node.weight_shape) > 2 else node.weight_shape[node.reduce_axis]
            n = numel // k
            block = stacked_block(k, self.block_size)
            nb = -(-k // block)
            return -(-int(self.bits) * n * self.terms * nb * block // 8) + fb * n * self.terms * nb
        if self.kind == "matmulnbits":
            k = node.weight_shape[node.reduce_axis]
            n = numel // k
            nb = -(-k // self.block_size)
            return n * nb * self.block_size * self.bits // 8 + fb * n * nb
        spec = WeightQuantSpec(int(self.bits), self.block_size, float_type=self.float_type)
        size = weight_nbytes(node.weight_shape, spec, node.reduce_axis, node.out_axis)
        if self.kind == "w8a8":
            size += node.weight_shape[node.out_axis]         # explicit int8 zero points
        return size


FLOAT = Format("float")
#: ONNX element type -> float type name of a compressible weight
FLOAT_TYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                    onnx.TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class Offer:
    """What a target offers one node: the formats (float first), and each requested level it refuses or
    narrows, with the reason (for the report)."""

    node: str
    formats: tuple[Format, ...]
    refused: tuple[tuple[str, str], ...] = ()       # (level or format name, reason)

    def names(self) -> list[str]:
        return [f.name for f in self.formats]

    def in_float_type(self, float_type: str) -> "Offer":
        """This offer for a node whose float type is ``float_type``: every format stores its float weight and
        scales in it, and 16-bit codes are refused for a 16-bit float weight (no smaller than it)."""
        if float_type == "float32":
            return self
        import dataclasses

        kept = tuple(dataclasses.replace(f, float_type=float_type) for f in self.formats
                     if f.kind == "float" or f.bits != 16)
        refused = (("int16", f"16-bit codes take as many bytes as the {float_type} weight"),) \
            if len(kept) < len(self.formats) else ()
        return Offer(self.node, kept, self.refused + refused)


def merge_offers(offers: Sequence[Offer], block_sizes: Sequence[int]) -> Offer:
    """One node's offers at several block sizes as one: every distinct format once (float first, then in the
    order of ``block_sizes``); a refusal given at every block size once, one given at some only with its
    block size named (e.g. 2-bit at block 16 on ORT CPU while block 32 is offered)."""
    if len(offers) == 1:
        return offers[0]
    formats = tuple(dict.fromkeys(f for o in offers for f in o.formats))
    everywhere = set.intersection(*(set(o.refused) for o in offers))
    refused = list(dict.fromkeys(r for r in offers[0].refused if r in everywhere))
    for o, b in zip(offers, block_sizes):
        refused += [(f"{label} b{b}", why) for label, why in o.refused if (label, why) not in everywhere]
    return Offer(offers[0].node, formats, tuple(dict.fromkeys(refused)))


@dataclass(frozen=True)
class NodePlan:
    """One node's chosen format and its numbers: ``weight`` a QuantizedWeight (None for float),
    ``input`` / ``output`` ActivationQParams for W8A8 (``output`` required when ``format.output``)."""

    format: Format
    weight: Any = None
    input: Any = None
    output: Any = None


@dataclass
class Rewrite:
    """A rewritten model and what was written where."""

    model: onnx.ModelProto
    written: dict[str, str] = field(default_factory=dict)    # node -> format name
    notes: list[tuple[str, str]] = field(default_factory=list)   # (node, note) e.g. storage fallbacks


@dataclass(frozen=True)
class SessionSettings:
    """The ONNX Runtime session a target's verdict runs in: the configuration README tells users to use.

    ``providers``: ``(name, options)`` in priority order; ``config``: session config entries;
    ``optimization``: ``"all"`` (ORT's default) or ``"disable"``."""

    providers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    config: tuple[tuple[str, str], ...] = ()
    optimization: str = "all"
    description: str = ""

    def available(self) -> bool:
        """Whether the installed ONNX Runtime has the first (the target's own) provider."""
        import onnxruntime as ort

        return self.providers[0][0] in ort.get_available_providers()

    def session_options(self, intra_op_num_threads: int = 0):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(intra_op_num_threads)
        so.use_deterministic_compute = True  # same numbers on every run: verdicts are repeatable
        so.log_severity_level = 3
        if self.optimization == "disable":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        for key, value in self.config:
            so.add_session_config_entry(key, value)
        return so

    def make_session(self, model: onnx.ModelProto | str, *, intra_op_num_threads: int = 0,
                     optimized_model_path: str | None = None):
        """An InferenceSession with these settings (``model``: proto or path; a large proto reaches ONNX Runtime
        as files, ``ort_eval.inference_session``)."""
        so = self.session_options(intra_op_num_threads)
        if optimized_model_path:
            so.optimized_model_filepath = str(optimized_model_path)
        providers = [(name, dict(opts)) for name, opts in self.providers]
        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
        try:
            from llc_onnx.ort_eval import inference_session

            return inference_session(model, so, providers)
        except Exception as exc:  # noqa: BLE001 - one line, named
            raise LLCError(f"{label}: ONNX Runtime cannot load the model ({first_line(exc)}); check the opset "
                           "(≤ 26) and the ops used") from None


def parse_levels(levels: Iterable[int | str]) -> list[int | str]:
    """Normalise a level list (ints 2/4/8/16 and "float"; strings like "8" accepted)."""
    out: list[int | str] = []
    for lv in levels:
        v: int | str = lv
        if isinstance(lv, str) and lv != "float":
            try:
                v = int(lv)
            except ValueError:
                raise LLCError(f"quant.bits: level '{lv}' is unknown; use 2, 4, 8, 16 or float") from None
        if v not in LEVELS:
            raise LLCError(f"quant.bits: level {lv!r} is unknown; use 2, 4, 8, 16 or float")
        if v not in out:
            out.append(v)
    return out


class GraphContext:
    """Facts about a model's graph the targets' offers depend on (computed once per model): consumers of
    each tensor, graph outputs, inferred ranks, Gemm attributes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes = {n.name: n for n in g.node}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.inits = {t.name: t for t in g.initializer}
        try:
            inferred = infer_shapes(model)
            vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        except Exception:  # noqa: BLE001 - ranks are a hint only
            vis = list(g.input) + list(g.output)
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in vis if v.type.tensor_type.HasField("shape")}

    def attr(self, node: str, name: str, default):
        for a in self.nodes[node].attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def input_rank(self, node: str) -> int | None:
        return self.ranks.get(self.nodes[node].input[0])

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.graph_outputs else None

    def float_type(self, node: CompressibleNode) -> str:
        """The node's float type: its weight's (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""
        init = self.inits.get(node.weight)
        return FLOAT_TYPE_NAMES.get(init.data_type, "float32") if init is not None else "float32"

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of initializer ``name`` (None when it is not one), read from its dims: the offers do not
        need the values, and a large model's weights may be held by the interpreter (``FlowContext.hold_weights``)."""
        t = self.inits.get(name)
        return None if t is None else tuple(int(d) for d in t.dims)


class Target(ABC):
    """A deployment runtime. Subclasses fill in the table and the three decisions."""

    #: the name used on the command line / in the config (``--target``)
    name: str = ""
    #: one line for the report
    summary: str = ""
    #: documented table: op type -> [(format family, when / why)], rendered by :meth:`describe`
    table: Mapping[str, Sequence[tuple[str, str]]] = {}

    @abstractmethod
    def offer(self, node: CompressibleNode, context: GraphContext, *, levels: Sequence[int | str] = LEVELS,
              block_size: int = 32) -> Offer:
        """The formats ``node`` may be offered for the requested ``levels``, and the refused ones with why."""

    @abstractmethod
    def session(self) -> SessionSettings:
        """The session settings of the verdict (what README tells users to use)."""

    @abstractmethod
    def rewrite(self, model: onnx.ModelProto, plans: Mapping[str, NodePlan]) -> Rewrite:
        """Write the plans (the input model is not modified)."""

    # ------------------------------------------------------------------ shared helpers
    def offers(self, model: onnx.ModelProto, nodes: Iterable[CompressibleNode], *,
               levels: Sequence[int | str] = LEVELS, block_size: int | Sequence[int] = 32) -> dict[str, Offer]:
        """:meth:`offer` for every node (one :class:`GraphContext`). Several ``block_size`` values: the union of
        the offers at each (:func:`merge_offers`), so a blocked level appears once per block size."""
        ctx = GraphContext(model)
        lv = parse_levels(levels)
        sizes = (block_size,) if isinstance(block_size, int) else tuple(block_size)
        return {n.name: merge_offers([self.offer(n, ctx, levels=lv, block_size=b) for b in sizes], sizes)
                .in_float_type(ctx.float_type(n)) for n in nodes}

    def offer_series(self, node: CompressibleNode, context: GraphContext, *, bits: Sequence[int] = (2, 4, 8),
                     terms: Sequence[int] = (1, 2, 3, 4), block_size: int = 32) -> Offer:
        """The ``series`` formats (T b-bit basis terms, :mod:`llc_onnx.series`) ``node`` may be offered for
        every b in ``bits`` and T in ``terms``, and the refused ones with why. Default: none (float only)."""
        return Offer(node.name, (FLOAT,), tuple((f"series int{b}", f"target {self.name} does not run series terms")
                                                for b in bits))

    def series_offers(self, model: onnx.ModelProto, nodes: Iterable[CompressibleNode], *,
                      bits: Sequence[int] = (2, 4, 8), terms: Sequence[int] = (1, 2, 3, 4),
                      block_size: int = 32) -> dict[str, Offer]:
        """:meth:`offer_series` for every node (one :class:`GraphContext`)."""
        ctx = GraphContext(model)
        return {n.name: self.offer_series(n, ctx, bits=tuple(bits), terms=tuple(terms), block_size=block_size)
                if ctx.float_type(n) == "float32" else
                Offer(n.name, (FLOAT,), (("series", f"series terms are written for float32 weights; this one is "
                                                    f"{ctx.float_type(n)}"),))
                for n in nodes}

    def tensors_to_calibrate(self, model: onnx.ModelProto, node: str, fmt: Format) -> tuple[str | None, str | None]:
        """(input tensor, output tensor) whose ranges ``fmt`` needs (None where it needs none)."""
        return self.tensors_to_calibrate_all(model, [(node, fmt)])[0]

    def tensors_to_calibrate_all(self, model: onnx.ModelProto, pairs) -> list[tuple[str | None, str | None]]:
        """:meth:`tensors_to_calibrate` of every (node, format) of ``pairs``, in order, reading the model once (a
        target that overrides :meth:`tensors_to_calibrate` is asked per node)."""
        if type(self).tensors_to_calibrate is not Target.tensors_to_calibrate:
            return [self.tensors_to_calibrate(model, n, f) for n, f in pairs]
        static = [(n, f) for n, f in pairs if f.kind == "w8a8" and not f.dynamic]
        if not static:
            return [(None, None)] * len(pairs)
        from llc_onnx.passes.w8a8 import quantized_tensors_of

        got = iter(quantized_tensors_of(model, [(n, f.activations) for n, f in static]))
        out = []
        for _, f in pairs:
            if f.kind != "w8a8" or f.dynamic:
                out.append((None, None))
                continue
            x, y = next(got)
            out.append((x, y if f.output else None))
        return out

    def describe(self) -> str:
        """The target's table as Markdown (README / report)."""
        lines = [f"**{self.name}** — {self.summary}", "", "| op | format | when / why |", "|---|---|---|"]
        for op, rows in self.table.items():
            for fmt, why in rows:
                lines.append(f"| {op} | {fmt} | {why} |")
        return "\n".join(lines)

    def check_plans(self, plans: Mapping[str, NodePlan], kinds: Sequence[str]) -> None:
        """Every plan has a format of ``kinds`` and numbers that fit it."""
        for name, plan in plans.items():
            fmt = plan.format
            if fmt.kind not in kinds:
                raise LLCError(f"node '{name}': format {fmt.name} is not a {self.name} format "
                               f"(its formats: {', '.join(kinds)}); choose from the target's offer")
            if fmt.kind == "float":
                continue
            w = plan.weight
            if w is None:
                raise LLCError(f"node '{name}': plan for format {fmt.name} has no quantized weight")
            if fmt.kind == "series":
                from llc_onnx.series import SeriesWeight

                if not isinstance(w, SeriesWeight) or (w.bits, w.block_size, w.order) != \
                        (fmt.bits, fmt.block_size, fmt.terms):
                    got = (f"{w.order} {w.bits}-bit terms with block_size={w.block_size}"
                           if isinstance(w, SeriesWeight) else f"a {type(w).__name__}")
                    raise LLCError(f"node '{name}': plan for {fmt.name} holds {got}; expand the weight into "
                                   f"{fmt.terms} {fmt.bits}-bit terms with block_size={fmt.block_size}")
                continue
            want_bits = int(fmt.code_bits or fmt.bits)
            if int(w.bits) != want_bits or w.block_size != fmt.block_size:
                raise LLCError(f"node '{name}': weight is {w.bits}-bit with block_size={w.block_size}, format "
                               f"{fmt.name} stores {want_bits}-bit codes with block_size={fmt.block_size}; "
                               "quantize with format.weight_spec()")
            if fmt.kind == "w8a8" and not fmt.dynamic and \
                    (plan.input is None or (fmt.output and plan.output is None)):
                raise LLCError(f"node '{name}': W8A8 plan needs calibrated activation parameters (input"
                               f"{' and output' if fmt.output else ''}); calibrate with "
                               "calib.activation_ranges")


def output_hook(plan: NodePlan) -> Callable | None:
    """The interpreter ``output_fns`` hook of a W8A8 node whose output is quantized too (QLinearConv)."""
    if plan.format.kind == "w8a8" and plan.format.output and plan.output is not None:
        return plan.output.fake_quant
    return None


def input_hook(plan: NodePlan) -> Callable | None:
    """The interpreter ``input_fns`` hook that reproduces what the written node does to its activation
    input (W8A8: the calibrated Q/DQ, or dynamic W8A8's run-time one; MatMulNBits level 4: per-block int8), or
    None. The output Q/DQ of a W8A8 Conv is not covered: it needs an output hook in the interpreter."""
    fmt = plan.format
    if fmt.dynamic:
        from llc_onnx.quant import dynamic_uint8_fake_quant

        return dynamic_uint8_fake_quant
    if fmt.kind == "w8a8":
        return plan.input.fake_quant
    if fmt.kind == "qdq" and fmt.activations:
        from llc_onnx.quant import fake_quant_activation

        return lambda x: fake_quant_activation(x, plan.input)
    if fmt.kind in ("matmulnbits", "series") and fmt.accuracy_level == 4 and \
            not (fmt.bits == 2 and fmt.block_size == 16):
        # a series format fused into one MatMulNBits: its K = T·K' holds T copies of the input, blocked alike
        from llc_onnx.passes.matmulnbits import level4_input_fake_quant

        bs = int(fmt.block_size)
        return lambda x: level4_input_fake_quant(x, bs)
    return None
