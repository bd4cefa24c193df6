"""What the graph-rewriting passes (``passes/qdq.py``, ``lowrank.py``, ``matmulnbits.py``, ``w8a8.py``,
``series.py``) share: onnx-ir's pass contract filled in once, and the few helpers onnx-ir does not have.

The contract (``onnx_ir.passes``): a pass is an in-place :class:`RewritePass` keyed by node names. Its
``requires()`` checks the model and the plans *before anything is touched* (opset, the named nodes exist and
have constant float weights, every plan fits its node) and raises a one-line :class:`PlanError` — an
:class:`~llc_onnx.errors.LLCError` that is also onnx-ir's ``PreconditionError``, so onnx-ir passes it through
unwrapped and the CLI prints it as bad input. ``call()`` rewrites and returns a :class:`RewriteResult`, a
``PassResult`` that also says what was written, what was left alone and why, and storage notes (subclasses
add the pass's own side outputs). ``ensures()`` checks what every rewrite promises (the graph stays sorted,
names stay unique, a written node no longer reads its float weight); a failure there is a bug
(``PostconditionError``), not bad input. The last result stays on the pass (``pass.result``), since a
``PassManager`` keeps only the model.

Passes do not delete what they replace: :func:`apply_passes` composes them in a ``PassManager`` with onnx-ir's
``RemoveUnusedNodesPass``, which removes the float weights no node reads any more (and any other node or
initializer nothing reads). Run a pass on its own and the replaced weights stay in the graph until such a pass
runs.

Kept here because onnx-ir has no equivalent: :class:`Names` (a fresh, readable name *when a value is created*:
onnx-ir's ``NameFixPass`` renames duplicates afterwards in traversal order — initializers before node outputs —
so it could rename an existing value instead of the new one, and it cannot follow our fallbacks such as
``<weight>_<node>_q4`` for a shared weight), :func:`find_nodes` (many nodes by name in one walk, refusing
duplicate names; ``Graph.node(name)`` is one O(n) lookup per name), :func:`weight_value` (which input is the
weight of MatMul/Gemm/Conv, and that it is a constant float initializer) and the opset relabelling.

Everything here works on :mod:`onnx_ir` objects. Nodes are identified by their (unique) name, as produced by
``model_io.prepare_model``; only nodes of the main graph are rewritten.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from llc_onnx.errors import LLCError

#: op types the passes know how to rewrite, and the input index that holds the weight.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}

_FLOAT_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    ir.DataType.DOUBLE: np.float64,
}


def default_opset(model: ir.Model) -> int:
    """Version of the default ("" / "ai.onnx") opset of ``model``."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def set_default_opset(model: ir.Model, version: int, ir_version: int) -> None:
    """Relabel the default opset to ``version`` (never lowers it) and raise the IR version to at
    least ``ir_version``. Also updates ``model.graph.opset_imports`` (serialised from the model)."""
    key = "ai.onnx" if "ai.onnx" in model.opset_imports and "" not in model.opset_imports else ""
    if default_opset(model) < version:
        model.opset_imports[key] = version
        model.graph.opset_imports[key] = version
    if model.ir_version < ir_version:
        model.ir_version = ir_version


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    """Main-graph nodes by name (raises on duplicate names: run ``prepare_model`` first)."""
    out: dict[str, ir.Node] = {}
    for node in graph:
        if not node.name:
            continue
        if node.name in out:
            raise LLCError(
                f"node '{node.name}': the name is used by two nodes; run model_io.prepare_model first"
            )
        out[node.name] = node
    return out


def find_nodes(graph: ir.Graph, names: Iterable[str], what: str) -> list[ir.Node]:
    """The main-graph nodes named in ``names``, in graph (topological) order."""
    wanted = set(names)
    by_name = nodes_by_name(graph)
    missing = sorted(wanted - by_name.keys())
    if missing:
        raise LLCError(
            f"node '{missing[0]}': {what} names a node that is not in the main graph "
            f"({len(missing)} missing); use the node names of the prepared model"
        )
    return [n for n in graph if n.name in wanted]


def weight_value(node: ir.Node) -> tuple[int, ir.Value, np.ndarray]:
    """(input index, value, float array) of the initializer weight of a MatMul/Gemm/Conv node."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
        raise LLCError(
            f"node '{node.name}' (op {node.op_type}): not a compressible op; only MatMul, Gemm and Conv "
            "weights can be rewritten"
        )
    idx = WEIGHT_INPUT[node.op_type]
    value = node.inputs[idx] if len(node.inputs) > idx else None
    if value is None or value.const_value is None or not value.is_initializer():
        raise LLCError(
            f"node '{node.name}' (op {node.op_type}): input {idx} is not an initializer; only nodes "
            "with a constant weight can be compressed"
        )
    if value.is_graph_input():
        raise LLCError(
            f"node '{node.name}': weight '{value.name}' is also a graph input (it can be overridden at "
            "run time); remove it from the graph inputs first"
        )
    dtype = value.const_value.dtype
    if dtype not in _FLOAT_DTYPES:
        raise LLCError(
            f"node '{node.name}': weight '{value.name}' has type {dtype.name}; only float weights can be "
            "compressed"
        )
    return idx, value, value.const_value.numpy()


def plan_codes(where: str, plan: Any, what: str, allowed_bits: Sequence[int]) -> tuple[np.ndarray, int]:
    """(codes q, bits) of a QuantizedWeight-like plan (``q, scale, axis, block_size, bits``), checked: the
    attributes exist, ``bits`` is one of ``allowed_bits``, q is integer-valued within the signed range
    [-2^(bits-1), 2^(bits-1)-1] and the scales are positive and finite."""
    for attr in ("q", "scale", "axis", "block_size", "bits"):
        if not hasattr(plan, attr):
            raise LLCError(f"{where}: {what} has no attribute '{attr}'; pass a QuantizedWeight")
    bits = int(plan.bits)
    if bits not in allowed_bits:
        raise LLCError(f"{where}: {what} has bits={bits}; supported are {', '.join(map(str, allowed_bits))}")
    q = np.asarray(plan.q)
    if not np.issubdtype(q.dtype, np.integer) and not np.array_equal(q, np.round(q)):
        raise LLCError(f"{where}: {what} q is not integer-valued; pass the integer codes")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.size and (q.min() < lo or q.max() > hi):
        raise LLCError(f"{where}: {what} q has values in [{q.min()}, {q.max()}], outside int{bits} [{lo}, {hi}]")
    scale = np.asarray(plan.scale, dtype=np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise LLCError(f"{where}: {what} scale has non-positive or non-finite values; fix the quantizer")
    return q, bits


def np_float_dtype(dtype: ir.DataType | None) -> type:
    """Numpy float type for an IR float data type (float32 when unknown)."""
    return _FLOAT_DTYPES.get(dtype, np.float32) if dtype is not None else np.float32


class Names:
    """Fresh, readable names for new values/nodes: the preferred name when free, else the fallbacks,
    else ``<preferred>_<k>``."""

    def __init__(self, graph: ir.Graph):
        self.used: set[str] = set()
        for g in (graph, *graph.subgraphs()):
            for v in (*g.inputs, *g.outputs, *g.initializers.values()):
                if v.name:
                    self.used.add(v.name)
            for node in g:
                if node.name:
                    self.used.add(node.name)
                for v in node.outputs:
                    if v.name:
                        self.used.add(v.name)

    def fresh(self, preferred: str, *fallbacks: str) -> str:
        for name in (preferred, *fallbacks):
            if name not in self.used:
                self.used.add(name)
                return name
        k = 1
        while f"{preferred}_{k}" in self.used:
            k += 1
        name = f"{preferred}_{k}"
        self.used.add(name)
        return name


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` as initializer ``name`` of ``graph`` and return its value."""
    value = ir.val(name, const_value=tensor)
    graph.register_initializer(value)
    return value


class PlanError(LLCError, ir.passes.PreconditionError):
    """A plan the model cannot take, found by a pass's ``requires()``: one line naming the node and the fix.
    Both an :class:`LLCError` (bad input, exit code 2) and onnx-ir's ``PreconditionError`` (which
    ``PassBase.__call__`` re-raises as it is instead of wrapping)."""


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    """``PassResult`` plus what the pass did. ``written``: the planned nodes rewritten, in graph order (a node
    that keeps its name, e.g. MatMulNBits, is listed under it; a node replaced by new ones, e.g. low-rank,
    under its old name); ``skipped``: planned node -> why it was left alone."""

    written: tuple[str, ...] = ()
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def notes(self) -> list[tuple[str, str]]:
        """(node, note) pairs for the report: storage decisions the user should know about."""
        return []


class RewritePass(ir.passes.InPlacePass):
    """An in-place rewrite of planned nodes (module doc). Subclasses implement :meth:`check` (the whole
    precondition: validate the model and every plan, compute what :meth:`rewrite` needs, touch nothing) and
    :meth:`rewrite`."""

    def __init__(self) -> None:
        super().__init__()
        #: the result of the last run (a PassManager keeps only the model)
        self.result: RewriteResult | None = None
        self._checked: tuple[ir.Model, Any] | None = None

    @abstractmethod
    def check(self, model: ir.Model) -> Any:
        """Validate ``model`` and the plans; raise :class:`LLCError` naming the node; return what
        :meth:`rewrite` needs. Must not modify the model."""

    @abstractmethod
    def rewrite(self, model: ir.Model, checked: Any) -> RewriteResult:
        """Rewrite ``model`` in place with what :meth:`check` returned."""

    def requires(self, model: ir.Model) -> None:
        try:
            self._checked = (model, self.check(model))
        except PlanError:
            raise
        except LLCError as exc:
            raise PlanError(str(exc)) from None

    def call(self, model: ir.Model) -> RewriteResult:
        if self._checked is None or self._checked[0] is not model:  # call() used without __call__
            self.requires(model)
        checked = self._checked[1]
        self._checked = None
        self.result = self.rewrite(model, checked)
        return self.result

    def ensures(self, model: ir.Model) -> None:
        """The graph is in topological order, node names are unique, and no written node still reads its
        float weight initializer."""
        seen: set[ir.Value] = set(model.graph.inputs) | set(model.graph.initializers.values())
        names: set[str] = set()
        for node in model.graph:
            for v in node.inputs:
                if v is not None and v not in seen and v.producer() is not None:
                    raise ir.passes.PostconditionError(
                        f"{type(self).__name__}: node '{node.name}' reads '{v.name}' before it is computed")
            seen.update(node.outputs)
            if node.name:
                if node.name in names:
                    raise ir.passes.PostconditionError(f"{type(self).__name__}: two nodes named '{node.name}'")
                names.add(node.name)
        by_name = {n.name: n for n in model.graph if n.name}
        for name in self.result.written if self.result is not None else ():
            node = by_name.get(name)
            if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
                continue
            idx = WEIGHT_INPUT[node.op_type]
            w = node.inputs[idx] if len(node.inputs) > idx else None
            if w is not None and w.is_initializer() and w.const_value is not None \
                    and w.const_value.dtype in _FLOAT_DTYPES:
                raise ir.passes.PostconditionError(
                    f"{type(self).__name__}: node '{name}' was written but still reads float weight '{w.name}'")


def _llc_cause(exc: BaseException | None) -> LLCError | None:
    """The LLCError inside onnx-ir's ``PassError`` wrappers (``Sequential`` and ``PassManager`` wrap every
    exception of a pass), if any."""
    while exc is not None:
        if isinstance(exc, LLCError):
            return exc
        exc = exc.__cause__
    return None


def apply_passes(model: onnx.ModelProto, passes: Sequence[ir.passes.PassBase], *,
                 remove_unused: bool = True, replaced: Iterable[str] = ()) -> onnx.ModelProto:
    """Run in-place onnx-ir passes on a copy of ``model`` with an ``onnx_ir.passes.PassManager``, followed by
    onnx-ir's ``RemoveUnusedNodesPass`` (``remove_unused``: the weights the passes replaced, and any other node
    or initializer nothing reads); return the new ModelProto. ``model`` is not modified (it is copied first:
    onnx-ir wraps the proto's tensors without copying them, and renaming an initializer would rename the
    proto's). A pass's :class:`LLCError` comes out as itself, not wrapped in onnx-ir's ``PassError``; the
    passes' results stay on them (``pass.result``).

    ``replaced``: names of the nodes whose weights the passes write anew. The copy then leaves out the data of
    the initializers only those nodes read (:func:`weights_only_read_by`): a large model is not copied whole
    for every plan built. Should a pass keep such a weight after all, the passes run again on a full copy."""
    if not isinstance(model, onnx.ModelProto):
        raise LLCError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the model first")
    from ..model_io import _copy

    skip = weights_only_read_by(model, replaced) if remove_unused else set()
    copy = _copy(model, skip_data=dict.fromkeys(skip))
    steps = [*passes, RemoveUnusedNodesPass()] if remove_unused else list(passes)
    if not steps:
        return copy
    try:
        result = ir.passes.PassManager(steps)(ir.serde.deserialize_model(copy))
    except Exception as exc:
        cause = _llc_cause(exc)
        if cause is None:
            raise
        raise cause from None
    out = ir.serde.serialize_model(result.model)
    if skip and any(t.name in skip for t in out.graph.initializer):    # a left-out weight survived: no shortcut
        return apply_passes(model, passes, remove_unused=remove_unused)
    return out


def weights_only_read_by(model: onnx.ModelProto, nodes: Iterable[str]) -> set[str]:
    """Initializers of the main graph that the named nodes read as their weight (input 1 of a MatMul, Gemm or
    Conv) and nothing else reads (no other node or other input, no graph output, no subgraph by name). A bias is
    not one: the rewrites read it (an integer bias, a MatMulNBits bias) — a tensor left without data would read
    as zeros."""
    from ..model_io import _WEIGHT_INPUT, _all_graphs

    names = set(nodes)
    if not names:
        return set()
    inits = {t.name for t in model.graph.initializer}
    mine, others = set(), {o.name for o in model.graph.output}
    graphs = _all_graphs(model.graph)                     # the main graph first, then every subgraph
    for node in next(graphs).node:
        slot = _WEIGHT_INPUT.get(node.op_type) if node.name in names and node.domain in ("", "ai.onnx") else None
        for k, i in enumerate(node.input):
            if i in inits:
                (mine if k == slot else others).add(i)
    for g in graphs:
        others.update(i for node in g.node for i in node.input)
    return mine - others
