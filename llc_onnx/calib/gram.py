"""Input Gram matrices XᵀX of compressible nodes over calibration data (forward passes only).

For a node computing y = W·x over a reduction of length K, the layer-output error of a weight change Δ (as a
matrix [outputs, K]) on the calibration inputs is Σ_rows Δ (XᵀX) Δᵀ, with X [n, K] the rows the node reduces
over — what GPTQ (:mod:`llc_onnx.quant.gptq`) minimises. The rows are

* MatMul: the input's last axis; leading (batch, sequence) axes are flattened into rows;
* Gemm:   the rows of A (of Aᵀ with ``transA=1``);
* Conv:   the im2col / unfold view: one row per (sample, output position), K = C/g·kH·kW in the order of the
          weight's flattened [C/g, kH, kW] axes (padding, stride, dilation, auto_pad as the node uses them);
          a grouped Conv (g > 1) has one Gram matrix per group, [g, K, K].

The activations are read through the interpreter's ``input_fns`` hook, as the node sees them, while a forward
pass runs batch by batch; each one is folded into a float64 K×K accumulator and dropped, so memory is one
batch of activations plus the accumulators. Nodes that read the same tensor through the same view (the q/k/v
projections of an attention block) share one accumulator and one result object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from .. import memory
from ..compressible import CompressibleNode
from ..errors import LLCError
from ..interpreter import TorchGraph
from ..model_io import node_names
from .data import Dataset

__all__ = ["InputGram", "ReductionView", "collect_grams", "input_rows", "reduction_view"]

# rows per float64 Gram update (bounds the unfold copy of one chunk: ROW_CHUNK · K · 8 bytes)
ROW_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ReductionView:
    """How a node's activation input becomes rows of its reduction (see module docstring)."""

    op: str                                  # "MatMul" | "Gemm" | "Conv"
    k: int                                   # reduction length (per group for a grouped Conv)
    trans_a: bool = False                    # Gemm transA
    kernel: tuple[int, ...] = ()             # Conv spatial kernel
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()               # ONNX order: begins then ends (empty with auto_pad SAME_*)
    auto_pad: str = "NOTSET"
    group: int = 1


@dataclass
class InputGram:
    """Σ x xᵀ over the rows of one node's reduction view, and how many rows were summed."""

    gram: np.ndarray   # float64 [K, K]; grouped Conv [g, K, K]
    n: int             # rows summed (tokens, samples, or sample × output position for a Conv)
    nodes: tuple[str, ...]  # the nodes that read the same rows (they share this object)

    @property
    def mean(self) -> np.ndarray:
        """E[x xᵀ] = gram / n (zeros when no row was seen)."""
        return self.gram / max(self.n, 1)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def reduction_view(model: onnx.ModelProto, node: CompressibleNode) -> ReductionView:
    """The :class:`ReductionView` of ``node`` (read from its attributes in ``model``)."""
    protos = dict(zip(node_names(model.graph), model.graph.node))
    if node.name not in protos:
        raise LLCError(f"node '{node.name}': not in the model; pass nodes found in this model (find_compressible)")
    proto = protos[node.name]
    shape = node.weight_shape
    if node.op_type == "MatMul":
        return ReductionView("MatMul", k=int(shape[0]))
    if node.op_type == "Gemm":
        return ReductionView("Gemm", k=int(shape[node.reduce_axis]), trans_a=bool(_attr(proto, "transA", 0)))
    if node.op_type == "Conv":
        nsp = len(shape) - 2
        kernel = tuple(int(d) for d in shape[2:])
        return ReductionView(
            "Conv", k=int(np.prod(shape[1:], dtype=np.int64)), kernel=kernel,
            strides=tuple(int(v) for v in _attr(proto, "strides", [1] * nsp)),
            dilations=tuple(int(v) for v in _attr(proto, "dilations", [1] * nsp)),
            pads=tuple(int(v) for v in _attr(proto, "pads", [0] * (2 * nsp))),
            auto_pad=str(_attr(proto, "auto_pad", "NOTSET")), group=int(_attr(proto, "group", 1)))
    raise LLCError(f"node '{node.name}' (op {node.op_type}): no input Gram for this op; MatMul, Gemm and Conv have one")


def _conv_pads(view: ReductionView, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, auto_pad included (the ONNX Conv rule)."""
    n = len(view.kernel)
    if view.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(n):
            o = -(-sizes[i] // view.strides[i])
            total = max(0, (o - 1) * view.strides[i] + (view.kernel[i] - 1) * view.dilations[i] + 1 - sizes[i])
            small = total // 2
            out.append((small, total - small) if view.auto_pad == "SAME_UPPER" else (total - small, small))
        return out
    if view.auto_pad == "VALID":
        return [(0, 0)] * n
    return [(view.pads[i], view.pads[n + i]) for i in range(n)]


def input_rows(x: torch.Tensor, view: ReductionView) -> torch.Tensor:
    """The rows of ``x`` (the node's activation input) as the node reduces over them: [R, K], or [R, g, K] for
    a Conv (g = 1 for an ordinary one)."""
    if view.op == "MatMul":
        return x.reshape(-1, x.shape[-1])
    if view.op == "Gemm":
        return x.T if view.trans_a else x
    nsp = len(view.kernel)
    if x.dim() != nsp + 2:
        raise LLCError(f"conv input of shape {tuple(x.shape)}: expected {nsp + 2} dims for a {nsp}-D kernel")
    pads = _conv_pads(view, list(x.shape[2:]))
    flat = [p for b, e in reversed(pads) for p in (b, e)]
    if any(flat):
        x = torch.nn.functional.pad(x, flat)
    for i in range(nsp):                       # windows along every spatial axis: [B, C, L1.., k1..]
        span = (view.kernel[i] - 1) * view.dilations[i] + 1
        x = x.unfold(2 + i, span, view.strides[i])
        if view.dilations[i] > 1:
            x = x[..., :: view.dilations[i]]
    b, c = x.shape[:2]
    # [B, C, L..., k...] -> [B, L..., C, k...] -> [B·L, g, C/g · Πk]
    perm = [0] + list(range(2, 2 + nsp)) + [1] + list(range(2 + nsp, 2 + 2 * nsp))
    x = x.permute(perm)
    return x.reshape(-1, view.group, (c // view.group) * int(np.prod(view.kernel, dtype=np.int64)))


def _node_outputs(model: onnx.ModelProto) -> dict[str, str]:
    return {name: proto.output[0] for name, proto in zip(node_names(model.graph), model.graph.node)}


@torch.no_grad()
def collect_grams(model: onnx.ModelProto, graph: TorchGraph, dataset: Dataset, nodes: Sequence[CompressibleNode],
                  *, names: Iterable[str] | None = None,
                  progress: Callable[[int], None] | None = None, spill=None) -> dict[str, InputGram]:
    """Input Gram matrix of every node in ``nodes`` (or of the subset ``names``) over ``dataset``: node name ->
    :class:`InputGram`. ``model`` is the prepared model ``graph`` was built from (node attributes); the pass
    runs only as far as the last requested node. Forward passes only, batch by batch; float64 accumulation.

    ``spill`` (a :class:`llc_onnx.memory.Spill`): the accumulators are files mapped back writable, whose pages
    leave the process's memory after each update (``memory.drop``) — SmolLM2's 0.8 GB of float64 K×K matrices
    (30 × 1536² for the down projections alone) are then never resident at once; the same values, and
    ``InputGram.gram`` is the file's map (owned by ``spill``)."""
    by_name = {n.name: n for n in nodes}
    wanted = list(by_name) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise LLCError(f"collect_grams: node '{unknown[0]}' is not one of the compressible nodes given; "
                       "use names from find_compressible")
    outputs = _node_outputs(model)
    acc: dict[tuple, list] = {}        # (input tensor, view) -> [gram tensor or None, rows, nodes]
    key_of: dict[str, tuple] = {}
    hooked: dict[str, tuple] = {}
    for name in wanted:
        node = by_name[name]
        view = reduction_view(model, node)
        key = (node.input, view)
        if key not in acc:
            acc[key] = [None, 0, []]
            hooked[name] = key
        acc[key][2].append(name)
        key_of[name] = key

    spill_maps: dict[tuple, np.ndarray] = {}  # key -> the file map behind acc[key][0] (with ``spill``)

    def hook(key: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
        view = key[1]

        def fold(x: torch.Tensor) -> torch.Tensor:
            rows = input_rows(x, view)
            if rows.shape[-1] != view.k:
                raise LLCError(f"node '{acc[key][2][0]}': its input gives rows of length {rows.shape[-1]}, "
                               f"its weight reduces over {view.k}; the model's shapes are inconsistent")
            r3 = rows if rows.dim() == 3 else rows.unsqueeze(1)     # [R, g, K]
            step = max(1, ROW_CHUNK_BYTES // (8 * r3.shape[1] * r3.shape[2]))
            g = acc[key][0]
            if g is None:
                shape = (r3.shape[1], view.k, view.k)
                if spill is not None:
                    spill_maps[key] = spill.zeros(shape, np.float64)
                    g = torch.from_numpy(spill_maps[key])
                else:
                    g = torch.zeros(shape, dtype=torch.float64, device="cpu")
            for s in range(0, r3.shape[0], step):
                c = r3[s:s + step].to(device="cpu", dtype=torch.float64).transpose(0, 1)   # [g, r, K]
                g += c.transpose(1, 2) @ c
            acc[key][0] = g
            if key in spill_maps:
                memory.drop(spill_maps[key])
            acc[key][1] += int(r3.shape[0])
            return x
        return fold

    fns = {name: hook(key) for name, key in hooked.items()}
    outs = [outputs[name] for name in hooked]
    for batch in dataset.batches:
        graph.run(batch.inputs, input_fns=fns, outputs=outs)
        if progress:
            progress(1)
    result: dict[str, InputGram] = {}
    for key, (g, n, members) in acc.items():
        view = key[1]
        if g is None:
            g = torch.zeros((max(view.group, 1) if view.op == "Conv" else 1, view.k, view.k), dtype=torch.float64,
                            device="cpu")
        arr = spill_maps[key] if key in spill_maps else g.numpy()
        if not (view.op == "Conv" and view.group > 1):
            arr = arr[0]
        shared = InputGram(gram=arr, n=n, nodes=tuple(members))
        for name in members:
            result[name] = shared
    return {name: result[name] for name in wanted}
