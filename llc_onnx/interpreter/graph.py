"""The graph executor: :class:`TorchGraph` runs an ONNX model node by node with the registered torch ops.

Hooks let callers transform the weight or the activation input of a node (quantization noise, low-rank, ...)
and capture node-local aliases of the (weight, activation) pair actually used by that node, whose gradients
are the gradients *through that node only*. Nodes are keyed by the names ``model_io.node_names`` gives them
(their own name, else ``<op_type>_<index>``): the names ``model_io.prepare_model`` writes. Intermediate tensors are
freed after their last consumer has run; :meth:`TorchGraph.snapshot` keeps the live values before chosen nodes
so that a perturbed run can resume there.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.inliner  # noqa: F401  (inline_local_functions; not imported by `import onnx`)
import torch
from onnx import numpy_helper

from ..errors import LLCError
from ..model_io import node_names
from . import registry
from .recompute import recompute
from .registry import OpContext, OpFn
from .tensors import Tensor, attr_value, np_to_torch

__all__ = ["TorchGraph", "Subgraph", "Snapshots", "outer_names", "unsupported_nodes"]

# ops whose weight / activation operands the hooks address in a fixed way
_CONV_LIKE = {"Conv", "ConvTranspose"}
_MATMUL_LIKE = {"MatMul", "Gemm"}


def _domain_key(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _has_subgraph(proto: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in proto.attribute)


def _subgraphs(proto: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in proto.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_names(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (a node's subgraph) reads from the enclosing scopes, in first-use order: read by its
    nodes (or their own subgraphs) and defined neither by its inputs, initializers nor nodes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    out: dict[str, None] = {}
    for n in graph.node:
        reads = list(n.input) + [name for g in _subgraphs(n) for name in outer_names(g)]
        for name in reads:
            if name and name not in defined:
                out[name] = None
        defined.update(o for o in n.output if o)
    return list(out)


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node key, op type, domain) of every main-graph node the interpreter cannot run (in graph order):
    no registered implementation for the model's opset of its domain, or a subgraph attribute the
    implementation does not handle (``fn.handles_subgraphs``); nodes inside the subgraphs of a node that
    handles them are checked too and listed as ``<node key>/<subgraph node key>``. Local functions are
    inlined first, as :class:`TorchGraph` does."""
    registry.load_plugins()
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    versions = {_domain_key(imp.domain): int(imp.version) for imp in model.opset_import}

    def check(graph: onnx.GraphProto, prefix: str) -> list[tuple[str, str, str]]:
        out = []
        for proto, name in zip(graph.node, node_names(graph)):
            domain = _domain_key(proto.domain)
            fn = registry.lookup(proto.op_type, domain, versions.get(domain, 21 if domain == "" else 1))
            key = prefix + name
            if fn is None or (_has_subgraph(proto) and not getattr(fn, "handles_subgraphs", False)):
                out.append((key, proto.op_type, proto.domain))
            elif _has_subgraph(proto):
                for g in _subgraphs(proto):
                    out.extend(check(g, key + "/"))
        return out

    return check(model.graph, "")


class _Node:
    """One node as the executor runs it. A node with subgraph attributes (If, Loop, ...) also reads the
    values its subgraphs take from the enclosing scope: they are appended to ``inputs`` after the node's
    own ``n_explicit`` inputs (so they stay alive until it runs), under the names ``implicit``."""

    __slots__ = ("index", "key", "op", "domain", "inputs", "outputs", "attrs", "proto", "w_idx", "x_idx", "fn",
                 "n_explicit", "implicit")

    def __init__(self, index: int, proto: onnx.NodeProto, key: str):
        self.index = index
        self.key = key
        self.op = proto.op_type
        self.domain = proto.domain or ""
        self.inputs = list(proto.input)
        self.n_explicit = len(self.inputs)
        self.implicit: list[str] = []
        if _has_subgraph(proto):  # (a name may be both an explicit input and read by a subgraph)
            self.implicit = list(dict.fromkeys(n for g in _subgraphs(proto) for n in outer_names(g)))
            self.inputs += self.implicit
        self.outputs = list(proto.output)
        self.attrs = {a.name: attr_value(a) for a in proto.attribute}
        self.proto = proto
        self.w_idx: int | None = None
        self.x_idx: int | None = None
        self.fn: OpFn | None = None


def _run_op(owner, n: _Node, xs: list, where: str):
    """``n``'s op on ``xs``; an error other than an LLCError becomes one naming the node and the input shapes."""
    try:
        return n.fn(OpContext(owner, n), xs)
    except LLCError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the node named
        shapes = [tuple(x.shape) if x is not None else None for x in xs]
        raise LLCError(f"node '{where}' (op {n.op}): failed on input shapes {shapes}: {type(e).__name__}: {e}") from e


def _store(env: dict[str, Tensor], n: _Node, res) -> None:
    """Put a node's result (one tensor, or one per output; unnamed outputs dropped) into ``env``."""
    if isinstance(res, Tensor):
        env[n.outputs[0]] = res
        return
    for o, r in zip(n.outputs, res):
        if o:
            env[o] = r


class Subgraph:
    """A node's subgraph (the body of If/Loop/...) run with the registered ops, eagerly, with autograd.

    ``parent``: the :class:`TorchGraph` (or enclosing :class:`Subgraph`) whose dtype, device, opsets and
    element types it shares. :meth:`run` takes the subgraph's inputs and the outer-scope values it reads
    (:attr:`outer`, from the node's implicit inputs) and returns its outputs in order."""

    def __init__(self, parent, proto: onnx.GraphProto, where: str):
        self.parent = parent
        self.dtype, self.device = parent.dtype, parent.device
        self.where = where
        self.input_names = [i.name for i in proto.input]
        self.output_names = [o.name for o in proto.output]
        self.outer = outer_names(proto)
        self.elem_types = dict(parent.elem_types)
        self.consts: dict[str, Tensor] = {}
        for init in proto.initializer:
            self.consts[init.name] = np_to_torch(numpy_helper.to_array(init), self.dtype, self.device)
            self.elem_types[init.name] = int(init.data_type)
        self._subgraphs: dict[tuple[int, str], Subgraph] = {}
        self.nodes = []
        for i, (p, key) in enumerate(zip(proto.node, node_names(proto))):
            n = _Node(i, p, key)
            n.fn = registry.lookup(n.op, n.domain, self.domain_version(n.domain))
            if n.fn is None:
                raise LLCError(f"node '{where}/{n.key}' (op {n.op}): not supported by the llc-onnx interpreter; "
                               "register an implementation (llc_onnx.interpreter.register_op)")
            if n.op == "Constant":
                self.consts[n.outputs[0]] = n.fn(OpContext(self, n), [])
                for a in p.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.elem_types[n.outputs[0]] = int(a.t.data_type)
            else:
                self.nodes.append(n)

    def domain_version(self, domain: str) -> int:
        return self.parent.domain_version(domain)

    def subgraph(self, node, attr: str) -> Subgraph:
        return _cached_subgraph(self, node, attr)

    def run(self, inputs: list[Tensor | None], outer: dict[str, Tensor]) -> list[Tensor]:
        env: dict[str, Tensor] = dict(outer)
        env.update(self.consts)
        env.update((k, v) for k, v in zip(self.input_names, inputs) if v is not None)
        for n in self.nodes:
            try:
                xs = [env[i] if i else None for i in n.inputs]
            except KeyError as e:
                raise LLCError(f"node '{self.where}/{n.key}' (op {n.op}): input {e} is not produced by any node") \
                    from None
            res = _run_op(self, n, xs, f"{self.where}/{n.key}")
            _store(env, n, res)
        try:
            return [env[o] for o in self.output_names]
        except KeyError as e:
            raise LLCError(f"subgraph of '{self.where}': output {e} is not produced") from None


def _cached_subgraph(owner, node, attr: str) -> Subgraph:
    key = (node.index, attr)
    if key not in owner._subgraphs:
        proto = node.attrs[attr]
        if not isinstance(proto, onnx.AttributeProto) or proto.type != onnx.AttributeProto.GRAPH:
            raise LLCError(f"node '{node.key}' (op {node.op}): attribute '{attr}' is not a graph")
        where = node.key if isinstance(owner, TorchGraph) else f"{owner.where}/{node.key}"
        owner._subgraphs[key] = Subgraph(owner, proto.g, where)
    return owner._subgraphs[key]


class TorchGraph:
    """Executes an ONNX model with torch ops (see module docstring).

    ``params``: float initializers as leaf tensors in ``dtype`` on ``device`` (``requires_grad`` off;
    turn it on with :meth:`requires_grad_`). ``input_names`` / ``output_names``: graph inputs (excluding
    initializers) and outputs.

    ``weights``: where the initializers' data is read from when not from ``model`` itself — a model with the same
    initializers (names, types, shapes) whose data ``model`` may leave out. So the graph can be built from a copy
    of the structure only and hold no reference into a large model's proto (a proto's memory lives as long as
    anything points into it): :func:`llc_onnx.flows.context.create_context` then drops that proto while the
    interpreter holds the weights.
    """

    def __init__(self, model: onnx.ModelProto, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 *, weights: onnx.ModelProto | None = None):
        if dtype not in (torch.float32, torch.float64):
            raise LLCError(f"interpreter dtype {dtype}: not supported; use torch.float32 or torch.float64")
        self.dtype = dtype
        self.device = torch.device(device)
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        graph = model.graph
        registry.load_plugins()
        self.opset = 21  # the ONNX-domain opset (21 when the model imports none)
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)

        self._params: dict[str, Tensor] | None = {}
        self._source: onnx.ModelProto | None = None  # where released params are read again (release_params)
        self.consts: dict[str, Tensor] = {}  # integer/bool initializers and Constant outputs
        # ONNX element type of initializers and Constant outputs (torch widens INT4/UINT16/...; ops such as
        # QuantizeLinear need the ONNX type of a zero point)
        self.elem_types: dict[str, int] = {init.name: int(init.data_type) for init in graph.initializer}
        for proto in graph.node:
            if proto.op_type == "Constant" and proto.domain in ("", "ai.onnx"):
                for a in proto.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.elem_types[proto.output[0]] = int(a.t.data_type)
        for name, t in self._initializers(graph if weights is None else weights.graph):
            if t.is_floating_point():
                self.params[name] = t
            else:
                self.consts[name] = t
        init_names = set(self.params) | set(self.consts)
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in init_names]
        self.output_names: list[str] = [o.name for o in graph.output]

        self._domains = {_domain_key(imp.domain): int(imp.version) for imp in model.opset_import}
        self._nodes: list[_Node] = []
        self._by_key: dict[str, list[_Node]] = {}
        self._producer: dict[str, int] = {}
        missing = unsupported_nodes(model)
        if missing:
            key, op, domain = missing[0]
            dom = f" domain {domain}" if domain else ""
            more = f" (and {len(missing) - 1} more unsupported nodes)" if len(missing) > 1 else ""
            raise LLCError(
                f"node '{key}' (op {op}{dom}): not supported by the llc-onnx interpreter{more}; see "
                "'llc-onnx inspect' for the list, or register an implementation (llc_onnx.interpreter.register_op)"
            )
        for i, (proto, key) in enumerate(zip(graph.node, node_names(graph))):
            n = _Node(i, proto, key)
            n.fn = registry.lookup(n.op, n.domain, self.domain_version(n.domain))
            self._nodes.append(n)
            self._by_key.setdefault(n.key, []).append(n)
            for o in n.outputs:
                if o:
                    self._producer[o] = len(self._nodes) - 1

        # fold Constant nodes once
        for n in self._nodes:
            if n.op == "Constant":
                self.consts[n.outputs[0]] = n.fn(OpContext(self, n), [])

        for n in self._nodes:
            self._assign_operands(n)
        self._subgraphs: dict[tuple[int, str], Subgraph] = {}
        self._plans: dict[tuple, tuple[list[_Node], dict[str, int]]] = {}
        self._positions: dict[tuple[str, ...], dict[int, int]] = {}  # outputs -> node index -> position

    def subgraph(self, node, attr: str) -> Subgraph:
        """The :class:`Subgraph` of graph attribute ``attr`` of main-graph node ``node`` (built once)."""
        return _cached_subgraph(self, node, attr)

    def domain_version(self, domain: str) -> int:
        """The opset version the model imports for ``domain`` (1 when it imports none)."""
        d = _domain_key(domain)
        if d == "":
            return self.opset
        return self._domains.get(d, 1)

    # ------------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Tensor]:
        """The float initializers as tensors (read from the model again when :meth:`release_params` dropped them)."""
        if self._params is None:
            self._params = {name: t for name, t in self._initializers(self._source.graph) if t.is_floating_point()}
        return self._params

    def _initializers(self, graph: onnx.GraphProto):
        """(name, tensor) of every initializer: floats in the interpreter's dtype, integers as themselves."""
        for init in graph.initializer:
            yield init.name, np_to_torch(numpy_helper.to_array(init), self.dtype, self.device)

    @params.setter
    def params(self, value: dict[str, Tensor]) -> None:
        self._params = value

    def release_params(self, source: onnx.ModelProto) -> None:
        """Drop the float initializers' tensors (a copy of every weight of the model) when no more runs are
        planned; if a run or :attr:`params` needs them later they are read again from ``source``, the model
        this graph was made from (held by the caller anyway; not copied)."""
        self._params, self._source = None, source

    @property
    def params_released(self) -> bool:
        return self._params is None

    def _is_init(self, name: str) -> bool:
        return name in self.params or name in self.consts

    def _assign_operands(self, n: _Node) -> None:
        """Which input is the weight (W) and which the activation (X) for hooks/capture."""
        ins = n.inputs
        if n.op in _CONV_LIKE:
            n.w_idx, n.x_idx = 1, 0
        elif n.op in _MATMUL_LIKE:
            if len(ins) > 1 and ins[1] in self.params:
                n.w_idx, n.x_idx = 1, 0
            elif ins and ins[0] in self.params:
                n.w_idx, n.x_idx = 0, 1
            else:
                n.w_idx, n.x_idx = 1, 0
        else:
            ws = [i for i, name in enumerate(ins) if name in self.params]
            xs = [i for i, name in enumerate(ins) if name and not self._is_init(name)]
            n.w_idx = ws[0] if ws else None
            n.x_idx = xs[0] if xs else None

    def node_names(self) -> list[str]:
        """Hook keys of all nodes, in graph order."""
        return [n.key for n in self._nodes]

    def requires_grad_(self, names: Iterable[str] | None = None, requires_grad: bool = True) -> TorchGraph:
        """Turn ``requires_grad`` on (or off) for the named params (all when ``names`` is None)."""
        names = list(self.params) if names is None else list(names)
        for name in names:
            if name not in self.params:
                raise LLCError(f"initializer '{name}': not a float initializer of the graph")
            self.params[name].requires_grad_(requires_grad)
        return self

    def to(self, device: str | torch.device) -> TorchGraph:
        self.device = torch.device(device)
        self.params = {k: v.detach().to(self.device).requires_grad_(v.requires_grad) for k, v in self.params.items()}
        self.consts = {k: v.to(self.device) for k, v in self.consts.items()}
        return self

    # ------------------------------------------------------------------------------------------
    def _plan(self, outputs: tuple[str, ...], capture: tuple[str, ...]) -> tuple[list[_Node], dict[str, int]]:
        key = (outputs, capture)
        if key in self._plans:
            return self._plans[key]
        needed: set[str] = set(outputs)
        for c in capture:
            for n in self._by_key[c]:
                needed.update(i for i in n.inputs if i)
        run_mask = [False] * len(self._nodes)
        stack = [self._producer[t] for t in needed if t in self._producer]
        while stack:
            i = stack.pop()
            if run_mask[i]:
                continue
            run_mask[i] = True
            for t in self._nodes[i].inputs:
                if t and t in self._producer and not run_mask[self._producer[t]]:
                    stack.append(self._producer[t])
        for c in capture:
            for n in self._by_key[c]:
                run_mask[n.index] = True
        order = [n for i, n in enumerate(self._nodes) if run_mask[i] and n.op != "Constant"]
        last_use: dict[str, int] = {}
        for pos, n in enumerate(order):
            for t in n.inputs:
                if t:
                    last_use[t] = pos
        for t in outputs:
            last_use[t] = len(order)  # never freed
        self._plans[key] = (order, last_use)
        return order, last_use

    def _feed(self, name: str, value: Any) -> Tensor:
        if isinstance(value, Tensor):
            t = value.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t
        arr = np.asarray(value)
        return np_to_torch(arr, self.dtype, self.device)

    def run(
        self,
        feeds: dict[str, np.ndarray | Tensor],
        *,
        weight_fns: dict[str, Callable[[Tensor], Tensor]] | None = None,
        input_fns: dict[str, Callable[[Tensor], Tensor]] | None = None,
        output_fns: dict[str, Callable[[Tensor], Tensor]] | None = None,
        capture: Iterable[str] = (),
        outputs: Iterable[str] | None = None,
        resume: Snapshots | None = None,
        segments: int = 0,
        _record: tuple[set[int], dict[int, dict[str, Tensor]]] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Run the graph. Returns ``(outputs, captured)``: output name -> tensor, and for each
        captured node, the node-local aliases ``(W, X)`` as used by that node (after the hooks).
        ``weight_fns`` / ``input_fns`` / ``output_fns`` (node name -> f) replace that node's weight, activation
        input or (first) output by f of it.

        ``resume``: snapshots of an unhooked run on the same ``feeds`` (:meth:`snapshot`); execution starts at
        the last snapshot at or before the first hooked node instead of at the top (same result, less work).

        ``segments`` (> 1, with autograd on): the run is cut into that many consecutive pieces of its execution
        order and each runs under :func:`recompute` (activation checkpointing): the backward pass keeps only the
        values live between pieces (and what the caller holds: captured aliases, outputs) and recomputes one
        piece's saved activations at a time — about one forward more, the same gradients bit for bit (the
        interpreter's ops are deterministic). Hooks run again when a piece is recomputed, with the same inputs;
        ``captured`` holds the aliases of the first run only."""
        weight_fns = weight_fns or {}
        input_fns = input_fns or {}
        output_fns = output_fns or {}
        capture = tuple(dict.fromkeys(capture))
        outs = tuple(self.output_names if outputs is None else outputs)
        for k in output_fns:
            if k not in self._by_key:
                raise LLCError(f"output_fns: node '{k}' is not in the graph; use a node name from the model")
        for kind, keys in (("weight_fns", weight_fns), ("input_fns", input_fns), ("capture", capture)):
            for k in keys:
                nodes = self._by_key.get(k)
                if not nodes:
                    raise LLCError(f"{kind}: node '{k}' is not in the graph; use a node name from the model")
                for n in nodes:
                    if kind != "input_fns" and n.w_idx is None:
                        raise LLCError(
                            f"{kind}: node '{k}' (op {n.op}) has no weight input; hook MatMul/Gemm/Conv nodes"
                        )
                    if kind != "weight_fns" and n.x_idx is None:
                        raise LLCError(f"{kind}: node '{k}' (op {n.op}) has no activation input")
        env: dict[str, Tensor] = {}
        for name, value in feeds.items():
            if name not in self.input_names and name not in self.params and name not in self.consts:
                raise LLCError(f"feed '{name}': not an input of the graph; inputs are {self.input_names}")
            env[name] = self._feed(name, value)
        for name in self.input_names:
            if name not in env:
                raise LLCError(f"input '{name}': missing from the feeds; feed every graph input {self.input_names}")
        for t in outs:
            if t not in self._producer and t not in env and not self._is_init(t):
                raise LLCError(f"output '{t}': not a tensor of the graph")

        order, last_use = self._plan(outs, capture)
        start = 0
        if resume is not None:
            if capture or tuple(resume.outputs) != outs:
                raise LLCError("resume: snapshots are for an uncaptured run of the same outputs "
                               f"{list(resume.outputs)}; run without resume=")
            hooked = [n.index for k in (*weight_fns, *input_fns, *output_fns) for n in self._by_key[k]]
            first = min((self._position(outs, i) for i in hooked), default=len(order))
            start, saved = resume.before(first)
            if start:
                for name in self.input_names:
                    if name in saved and not torch.equal(saved[name], env[name]):
                        raise LLCError(f"resume: input '{name}' differs from the run the snapshots were taken of; "
                                       "snapshots belong to one batch")
                env = dict(saved)
        cap_set = set(capture)
        keep = set(self.input_names)
        captured: dict[str, tuple[Tensor, Tensor]] = {}
        grad_on = torch.is_grad_enabled()
        params, consts = self.params, self.consts

        def get(env: dict[str, Tensor], name: str) -> Tensor | None:
            if not name:
                return None
            if name in env:
                return env[name]
            if name in params:
                return params[name]
            return consts[name]

        def step(pos: int, env: dict[str, Tensor]) -> None:
            n = order[pos]
            if _record is not None and pos in _record[0]:
                _record[1][pos] = dict(env)  # the live values (dead ones are deleted as the run goes)
            try:
                xs = [get(env, i) for i in n.inputs]
            except KeyError as e:
                raise LLCError(f"node '{n.key}' (op {n.op}): input {e} is not produced by any node") from None
            key = n.key
            if key in weight_fns or key in input_fns or key in cap_set:
                wi, xi = n.w_idx, n.x_idx
                if key in weight_fns:
                    xs[wi] = weight_fns[key](xs[wi])
                if key in input_fns:
                    xs[xi] = input_fns[key](xs[xi])
                if key in cap_set:
                    w, x = _alias(xs[wi], grad_on), _alias(xs[xi], grad_on)
                    xs[wi], xs[xi] = w, x
                    if capturing[0] is not None:  # (None: a piece recomputed after the run returned)
                        capturing[0][key] = (w, x)
            res = _run_op(self, n, xs, n.key)
            del xs
            if key in output_fns:  # e.g. the output Q/DQ a W8A8 Conv is written with
                res = output_fns[key](res) if isinstance(res, Tensor) else [output_fns[key](res[0]), *res[1:]]
            _store(env, n, res)
            for t in n.inputs:
                if t and last_use.get(t) == pos and t in env and t not in keep:
                    del env[t]
            for o in n.outputs:  # outputs nobody reads
                if o and o not in last_use and o in env:
                    del env[o]

        # step writes captures through this cell, emptied when the run returns, so a recomputed piece's ``step``
        # cannot reach the captured tensors: the graph holds the piece in autograd's C++, where Python's collector
        # cannot follow, and the captures hold the graph (see interpreter.recompute)
        capturing = [captured]
        if segments > 1 and grad_on and _record is None:
            self._run_segments(order, last_use, start, env, step, segments, keep)
        else:
            for pos in range(start, len(order)):
                step(pos, env)
        capturing[0] = None
        result = {t: get(env, t) for t in outs}
        return result, captured

    @staticmethod
    def _run_segments(order: list[_Node], last_use: dict[str, int], start: int, env: dict[str, Tensor], step,
                      segments: int, keep: set[str]) -> None:
        """Run positions ``start…`` of ``order`` in ``segments`` pieces under :func:`recompute` (see :meth:`run`).
        A piece takes the live tensors its nodes read and returns those it makes that a later piece or the caller
        reads (``env`` is updated in place); a piece whose boundary holds something other than a tensor runs
        plainly."""
        n = len(order) - start
        size = max(1, -(-n // segments))
        for a in range(start, len(order), size):
            b = min(a + size, len(order))
            names_in = list(dict.fromkeys(t for p in range(a, b) for t in order[p].inputs if t and t in env))
            made = [o for p in range(a, b) for o in order[p].outputs if o and last_use.get(o, -1) >= b]
            if not all(isinstance(env[t], Tensor) for t in names_in):
                for p in range(a, b):
                    step(p, env)
                continue

            def piece(*vals, a=a, b=b, names_in=names_in, made=made):
                local = dict(zip(names_in, vals))
                for p in range(a, b):
                    step(p, local)
                return [local.get(o) for o in made]

            outs = recompute(piece, *[env[t] for t in names_in])
            for t in names_in:
                if last_use.get(t, -1) < b and t not in keep:
                    env.pop(t, None)
            for o, v in zip(made, outs):
                if v is not None:
                    env[o] = v

    def position(self, outs: Iterable[str], key: str) -> int:
        """The first position of node ``key`` in the uncaptured plan for ``outs`` (what :meth:`snapshot` keys its
        snapshots by)."""
        outs = tuple(outs)
        return min(self._position(outs, n.index) for n in self._by_key[key])

    def last_reads(self, outs: Iterable[str], names: Iterable[str]) -> dict[str, int]:
        """The last position in the uncaptured plan for ``outs`` at which a node reads each of ``names`` (as an
        input, or as an outer value a subgraph of the node reads); −1 when no node there does."""
        order, _ = self._plan(tuple(outs), ())
        last = dict.fromkeys(names, -1)
        for p, n in enumerate(order):
            for t in n.inputs:
                if t in last:
                    last[t] = p
        return last

    def _position(self, outs: tuple[str, ...], index: int) -> int:
        """Position of the node with graph index ``index`` in the uncaptured plan for ``outs`` (past the end
        when that plan does not run it)."""
        if outs not in self._positions:
            order, _ = self._plan(outs, ())
            self._positions[outs] = {n.index: p for p, n in enumerate(order)}
        return self._positions[outs].get(index, len(self._plan(outs, ())[0]))

    @torch.no_grad()
    def snapshot(self, feeds: dict[str, np.ndarray | Tensor], at: Iterable[str], *,
                 outputs: Iterable[str] | None = None, max_bytes: int | None = None
                 ) -> tuple[dict[str, Tensor], Snapshots]:
        """Run the graph without hooks and keep, just before each node of ``at``, the values live at that point
        (the prefix a later hooked run can skip). Returns ``(outputs, snapshots)``. With ``max_bytes``, snapshots
        are thinned evenly (every 2nd, 4th, ... kept) until their distinct tensors fit; a hooked node then
        resumes from the nearest earlier snapshot."""
        outs = tuple(self.output_names if outputs is None else outputs)
        order, _ = self._plan(outs, ())
        want = set()
        for k in at:
            if k not in self._by_key:
                raise LLCError(f"snapshot: node '{k}' is not in the graph; use a node name from the model")
            want.update(self._position(outs, n.index) for n in self._by_key[k])
        want.discard(len(order))
        want.discard(0)  # resuming at the top is an ordinary run
        record: dict[int, dict[str, Tensor]] = {}
        result, _ = self.run(feeds, outputs=outs, _record=(want, record))
        snaps = Snapshots(outs, sorted(record), [record[p] for p in sorted(record)])
        step = 1
        while max_bytes is not None and snaps.positions and snaps.nbytes() > max_bytes:
            step *= 2
            keep = sorted(record)[step - 1::step]
            snaps = Snapshots(outs, keep, [record[p] for p in keep])
        return result, snaps


@dataclass
class Snapshots:
    """Live values of one unhooked run just before chosen positions of its execution order (see
    :meth:`TorchGraph.snapshot`). Tensors are shared, never modified: the interpreter's ops do not write
    into their inputs."""

    outputs: tuple[str, ...]
    positions: list[int]  # ascending
    envs: list[dict[str, Tensor]]

    def before(self, pos: int) -> tuple[int, dict[str, Tensor]]:
        """(position, values) of the last snapshot at or before ``pos``; (0, {}) when there is none."""
        i = bisect.bisect_right(self.positions, pos) - 1
        return (self.positions[i], self.envs[i]) if i >= 0 else (0, {})

    def drop_before(self, pos: int) -> None:
        """Let go of the snapshots no run starting at ``pos`` or later reads: all before the last one at or
        before ``pos`` (a run that starts earlier anyway resumes from an earlier kept one, or from the inputs:
        the same values, more work)."""
        i = bisect.bisect_right(self.positions, pos) - 1
        if i > 0:
            del self.positions[:i], self.envs[:i]

    def nbytes(self) -> int:
        """Bytes of the distinct tensors held (shared tensors counted once)."""
        seen, total = set(), 0
        for env in self.envs:
            for t in env.values():
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key not in seen:
                    seen.add(key)
                    total += key[1]
        return total


def _alias(t: Tensor, grad_on: bool) -> Tensor:
    if grad_on and t.is_floating_point() and not t.requires_grad:
        return t.detach().requires_grad_(True)
    return t.view_as(t)
