"""Series expansion (FP = xINT, :mod:`llc_onnx.series`) in the product: the per-node candidates of the
knapsack, and the data-free mode.

**LLC-chosen** (``--method series`` / ``quant,series``): the target offers series formats per node
(:meth:`llc_onnx.targets.base.Target.offer_series`: ``Format("series", b, block, terms=T)``);
:func:`expansion` gives each (node, b, block) *one* greedy expansion at the largest configured T (nearest
rounding, ``quant.scale`` scales) and every T is its truncation, so the candidates of one bit-width cost one
expansion. :mod:`llc_onnx.flows.quantize` measures each like any other candidate (the weight hook is the
dequantized sum Σ_{t<T} s_t·Q_t, with the input hook of the written node) and the same grouped knapsack
chooses among all families at once.

**Data-free** (:func:`data_free_expansion`, ``llc-onnx expand``; the paper's setting): fixed b and T for every
node, no data, nothing measured, so nothing verified: the result lists bytes and relative residual norms
‖R_t‖/‖W‖ per node and says so; ``api.expand(..., data=)`` compares the written model with the float one in
ONNX Runtime. ``order=τ`` writes the model truncated at τ terms from the same expansion (the model-granularity
progressive family: each truncation is a valid, smaller model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from ..compressible import CompressibleNode, find_compressible
from ..errors import LLCError
from ..series import SERIES_BITS, SeriesWeight, default_block_size, expand_node, expand_model
from ..targets.base import Format

__all__ = ["expansion", "values", "compact", "NodeExpansion", "ExpandResult", "data_free_expansion"]


def expansion(w: np.ndarray, node: CompressibleNode, fmt: Format, *, scale_method: str, max_terms: int,
              memo: dict) -> SeriesWeight:
    """The first ``fmt.terms`` terms of ``node``'s weight ``w`` in ``fmt``'s bits and block, truncated from one
    expansion per (weight, axes, bits, block) at ``max_terms`` kept in ``memo`` (the greedy expansion's first T
    terms *are* its T-term expansion)."""
    key = (node.weight, node.out_axis, node.reduce_axis, int(fmt.bits), fmt.block_size, scale_method)
    full = memo.pop(key, None)
    if full is None or full.order < fmt.terms:
        full = expand_node(w, node, bits=int(fmt.bits), terms=max(int(max_terms), int(fmt.terms)),
                           block_size=fmt.block_size, scale_method=scale_method)
    memo[key] = full  # the most recently used last
    while len(memo) > EXPANSIONS_KEPT:  # each holds its float64 target and every term's codes and float values
        memo.pop(next(iter(memo)))
    return full.truncate(int(fmt.terms))


#: expansions :func:`expansion` keeps (the most recently used): the candidates of one node at every bit-width
#: reuse them; keeping every node's would hold ~40 bytes per weight per bit-width (a SmolLM2 series run was
#: killed at 10 GB). A later use of an evicted one expands again, with the same result.
EXPANSIONS_KEPT = 3


def values(weight) -> np.ndarray:
    """The float weight a stored weight computes: Σ_t s_t·Q_t of a SeriesWeight, a QuantizedWeight's dequant."""
    return weight.dequant() if isinstance(weight, SeriesWeight) else weight.dequant


def compact(sw: SeriesWeight) -> SeriesWeight:
    """``sw`` holding only what the passes read (codes as int8 and scales; no float copies)."""
    terms = tuple(replace(t, q=np.asarray(t.q).astype(np.int8), dequant=None) for t in sw.terms)
    return replace(sw, terms=terms, target=None)


# ------------------------------------------------------------------------------------------ data-free
@dataclass
class NodeExpansion:
    """One node of a data-free expansion."""

    node: str
    op_type: str
    shape: tuple[int, ...]
    terms: int                        # terms written (τ)
    float_bytes: int
    nbytes: int                       # stored bytes of the terms written
    relative_residuals: tuple[float, ...]  # ‖R_t‖/‖W‖ after each term of the expansion (t = 1..T)

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "shape": list(self.shape), "terms": self.terms,
                "float_bytes": self.float_bytes, "bytes": self.nbytes,
                "relative_residuals": list(self.relative_residuals)}


@dataclass
class ExpandResult:
    """A data-free series expansion (module doc). ``comparison`` is set when data was given
    (:class:`llc_onnx.api.CompareResult` of the float model against the written one)."""

    model: onnx.ModelProto
    source: str
    bits: int
    terms: int
    order: int
    block_size: int | None
    form: str
    nodes: list[NodeExpansion]
    skipped: list[tuple[str, str]]
    comparison: Any = None
    output: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def float_bytes(self) -> int:
        return sum(n.float_bytes for n in self.nodes)

    @property
    def nbytes(self) -> int:
        return sum(n.nbytes for n in self.nodes)

    @property
    def verified(self) -> bool | None:
        """None: nothing was measured (no data); else whether the loss on the data is ≤ float's + tolerance."""
        return None if self.comparison is None else bool(self.comparison.passed)

    @property
    def status(self) -> str:
        if self.comparison is None:
            return "not verified: no data (run llc-onnx compare to check it)"
        return "VERIFIED on the data given" if self.comparison.passed else "NOT VERIFIED: worse on the data given"

    def metadata(self) -> dict[str, str]:
        return {"llc_onnx.series": f"bits={self.bits} terms={self.terms} order={self.order} "
                                   f"block_size={self.block_size} form={self.form} (data-free)",
                "llc_onnx.verified": {None: "unverified", True: "true", False: "false"}[self.verified]}

    def save(self, path: str) -> str:
        """Write the model (atomically) with ``llc_onnx.*`` metadata saying how it was made and whether it was
        checked."""
        from ..model_io import save_with_metadata

        self.output = save_with_metadata(self.model, path, self.metadata())
        return self.output

    def to_dict(self) -> dict:
        return {"model": self.source, "output": self.output, "mode": "data-free", "bits": self.bits,
                "terms": self.terms, "order": self.order, "block_size": self.block_size, "form": self.form,
                "float_bytes": self.float_bytes, "bytes": self.nbytes,
                "ratio": self.nbytes / self.float_bytes if self.float_bytes else None,
                "nodes": [n.to_dict() for n in self.nodes],
                "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
                "verified": self.verified, "status": self.status,
                "comparison": None if self.comparison is None else self.comparison.to_dict(), "notes": self.notes}


def data_free_expansion(model: onnx.ModelProto, *, bits: int = 4, terms: int = 2, order: int | None = None,
              block_size: int | None | str = "default", scale_method: str = "mse", form: str = "standard",
              source: str = "model") -> ExpandResult:
    """Expand every compressible node of ``model`` into ``terms`` ``bits``-bit terms (no data) and write the
    model truncated at ``order`` (default: all terms) in ``form`` (``standard`` | ``custom``)."""
    from ..model_io import prepare_model
    from ..series import write_series

    if int(bits) not in SERIES_BITS:
        raise LLCError(f"--bits {bits}: series terms have {', '.join(map(str, SERIES_BITS))} bits")
    if not isinstance(terms, int) or terms < 1:
        raise LLCError(f"--terms {terms}: give a number of terms ≥ 1")
    if order is not None and not (isinstance(order, int) and 1 <= order <= terms):
        raise LLCError(f"--order {order}: the truncation order must be in 1..{terms} (--terms)")
    if form not in ("standard", "custom"):
        raise LLCError(f"--form {form}: use standard or custom")
    if block_size not in ("default", None) and not (isinstance(block_size, int) and block_size >= 1):
        raise LLCError(f"--block-size {block_size}: give an integer ≥ 1")
    tau = terms if order is None else order
    prepared = prepare_model(model, opset=21)
    found, skipped = find_compressible(prepared)
    if not found:
        raise LLCError(f"{source}: no compressible node (MatMul/Gemm/Conv with a constant weight); nothing to expand")
    types = {t.name: t.data_type for t in prepared.graph.initializer}
    for n in found:
        if types.get(n.weight, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            raise LLCError(f"{source}: node '{n.name}' has a {onnx.TensorProto.DataType.Name(types[n.weight])} "
                           f"weight '{n.weight}'; series expansion takes float32 weights: convert the model first")
    series = expand_model(prepared, bits=int(bits), terms=int(terms), block_size=block_size,
                          scale_method=scale_method)
    out = write_series(prepared, series, form=form, order=tau)
    nodes = []
    for n in found:
        sw = series.weights[n.name]
        norm = sw.weight_norm or 1.0
        nodes.append(NodeExpansion(n.name, n.op_type, tuple(n.weight_shape), tau, 4 * math.prod(n.weight_shape),
                                   sw.nbytes(tau), tuple(r / norm for r in sw.residual_norms)))
    bs = default_block_size(bits) if block_size == "default" else block_size
    return ExpandResult(out, source, int(bits), int(terms), tau, bs, form, nodes, list(skipped))
