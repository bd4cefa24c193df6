"""Reading, preparing and writing ONNX models.

* :func:`load_model` reads a model (with its external data), checks it with ``onnx.checker`` and turns
  every failure into a one-line :class:`~llc_onnx.errors.LLCError`. It never writes to the input path.
* :func:`prepare_model` returns a *copy* at an opset ONNX Runtime 1.31 runs: a model at opset 21..26 keeps
  its opset, an older one (11..20) is converted up to 21; with an IR version ORT accepts, unique node names,
  constant weights folded into initializers (:func:`fold_constant_weights`), ``-1`` dims read as dynamic
  and inferred shapes.
* :func:`save_model` writes atomically (temp file in the destination directory + ``os.replace``) and
  switches to external data above :data:`EXTERNAL_DATA_THRESHOLD` bytes, in a content-named data file, so
  that the ``.onnx``/``.data`` pair is never mismatched (see its docstring for what a reader sees when).
* :func:`sort_nodes` puts out-of-order nodes in order (ORT runs such graphs; ``load_model`` sorts them).
* :func:`tensor_nbytes` / :func:`initializer_bytes` count storage at the element bit width (INT4 = 1/2
  byte per element, INT2 = 1/4, ...), which is how compressed sizes are reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from .errors import LLCError, first_line

# ONNX Runtime 1.31 runs default-domain opsets up to 26.
MAX_ORT_OPSET = 26
# Protobuf cannot serialize messages >= 2 GiB; stay well below that.
EXTERNAL_DATA_THRESHOLD = int(1.8e9)

_FIX_EXPORT = "check the file was fully written/exported"

# Bits per element for every tensor element type (strings have no fixed size: counted as 0).
_BITS = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.STRING: 0,
    TensorProto.BOOL: 8, TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32,
    TensorProto.UINT64: 64, TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128,
    TensorProto.BFLOAT16: 16, TensorProto.FLOAT8E4M3FN: 8, TensorProto.FLOAT8E4M3FNUZ: 8,
    TensorProto.FLOAT8E5M2: 8, TensorProto.FLOAT8E5M2FNUZ: 8, TensorProto.UINT4: 4, TensorProto.INT4: 4,
    TensorProto.FLOAT4E2M1: 4, TensorProto.FLOAT8E8M0: 8, TensorProto.UINT2: 2, TensorProto.INT2: 2,
    TensorProto.FLOAT6E2M3: 6, TensorProto.FLOAT6E3M2: 6,
}


def ir_version_for_opset(opset: int) -> int:
    """IR version written for a default-domain opset: 10 up to opset 22, 11 above (ORT 1.31 accepts both)."""
    return 10 if opset <= 22 else 11


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / "ai.onnx") domain imported by ``model`` (0 if none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def proto_size(message) -> int:
    """The serialized size of ``message`` in bytes (``len(message.SerializeToString())``), without serializing
    a model's large tensors: protobuf's upb backend computes ``ByteSize()`` by encoding the whole message, so
    sizing a 0.65 GB model held +1.3 GB for a moment (the peak of every stage that sized one, measured on
    SmolLM2). A :class:`onnx.ModelProto` is sized from its parts (:func:`_model_size`): the main graph's
    initializers with ``raw_data`` of at least :data:`_SIZE_BY_PARTS` bytes count as their data's length plus
    their encoding's overhead, everything else by ``ByteSize()``; exact for the fields protobuf knows (unknown
    fields of those tensors and of the graph are not counted). Any other message: ``ByteSize()``, or 2**31 where
    protobuf refuses to size it (upb raises EncodeError above 2 GB): larger than every threshold here."""
    if isinstance(message, onnx.ModelProto):
        return _model_size(message)
    return _byte_size(message)


#: initializers with at least this much ``raw_data`` are sized by its length (:func:`proto_size`)
_SIZE_BY_PARTS = 1 << 20


def _raw_len(t: TensorProto) -> int:
    """Bytes of ``t.raw_data`` (0 without it); the tensors :func:`proto_size`, :func:`_write_serialized` and
    :func:`update_digest` take apart are those with at least :data:`_SIZE_BY_PARTS`."""
    return len(t.raw_data) if t.HasField("raw_data") else 0  # (upb copies one tensor's bytes to tell)


def _byte_size(message) -> int:
    try:
        return message.ByteSize()
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError
        return 2**31


def _varint_size(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


def _field_size(number: int, payload: int) -> int:
    """Bytes of one length-delimited field (tag, length, payload) of field ``number``."""
    return _varint_size(number << 3 | 2) + _varint_size(payload) + payload


def _model_size(model: onnx.ModelProto) -> int:
    """:func:`proto_size` of a model: protobuf's encoding is the sum of its fields' encodings, so the model is
    the model without its graph, plus the graph field; the graph is the graph without its initializers, plus
    each initializer field; a large tensor is the tensor without ``raw_data``, plus the ``raw_data`` field."""
    if not any(_raw_len(t) >= _SIZE_BY_PARTS for t in model.graph.initializer):
        return _byte_size(model)
    shell = onnx.ModelProto()
    _copy_message_fields(model, shell, {"graph"})
    return _byte_size(shell) + _field_size(_MODEL_GRAPH, _graph_size(model.graph))


def _graph_size(graph: onnx.GraphProto) -> int:
    g = onnx.GraphProto()
    _copy_message_fields(graph, g, {"initializer"})
    return _byte_size(g) + sum(_field_size(_GRAPH_INITIALIZER, _tensor_size(t)) for t in graph.initializer)


def _tensor_size(t: TensorProto) -> int:
    n = _raw_len(t)
    if n < _SIZE_BY_PARTS:
        return _byte_size(t)
    light = TensorProto()
    _copy_message_fields(t, light, {"raw_data"})
    return _byte_size(light) + _field_size(_TENSOR_RAW_DATA, n)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_head(number: int, payload: int) -> bytes:
    """Tag and length of a length-delimited field (:func:`_field_size` counts them with the payload)."""
    return _varint(number << 3 | 2) + _varint(payload)


def _fields(message, keep) -> bytes:
    """The encoding of the fields of ``message`` whose numbers ``keep`` accepts (a part of its encoding:
    protobuf writes fields in the order of their numbers, so the parts of disjoint ranges concatenate to it)."""
    part = type(message)()
    _copy_fields_where(message, part, lambda fd: keep(fd.number))
    return part.SerializeToString()


def _write_serialized(model: onnx.ModelProto, f) -> None:
    """Write ``model.SerializeToString()`` to the binary file ``f`` without ever holding it (or a second copy of
    a large tensor) in memory: the parts of its encoding in field order, each large initializer's ``raw_data``
    written from the tensor (:func:`_model_size` gives the lengths). The bytes are those of
    ``SerializeToString()`` (tests/test_model_memory.py compares them)."""
    graph = model.graph
    large = {i for i, t in enumerate(graph.initializer) if _raw_len(t) >= _SIZE_BY_PARTS}
    if not large:
        f.write(model.SerializeToString())
        return
    f.write(_fields(model, lambda n: n < _MODEL_GRAPH))
    f.write(_field_head(_MODEL_GRAPH, _graph_size(graph)))
    f.write(_fields(graph, lambda n: n < _GRAPH_INITIALIZER))
    for i, t in enumerate(graph.initializer):
        if i not in large:
            data = t.SerializeToString()
            f.write(_field_head(_GRAPH_INITIALIZER, len(data)) + data)
            continue
        raw = t.raw_data  # one tensor's bytes at a time
        head, tail = _fields(t, lambda n: n < _TENSOR_RAW_DATA), _fields(t, lambda n: n > _TENSOR_RAW_DATA)
        f.write(_field_head(_GRAPH_INITIALIZER, len(head) + _field_size(_TENSOR_RAW_DATA, len(raw)) + len(tail)))
        f.write(head + _field_head(_TENSOR_RAW_DATA, len(raw)))
        f.write(raw)
        f.write(tail)
        del raw
    f.write(_fields(graph, lambda n: n > _GRAPH_INITIALIZER))
    f.write(_fields(model, lambda n: n > _MODEL_GRAPH))


def update_digest(h, model: onnx.ModelProto, held: Mapping[str, Callable[[], bytes]] | None = None) -> None:
    """Feed ``model`` to hash object ``h`` (hashlib) without serializing it whole (see :func:`proto_size`): the
    model without the data of its large initializers (:data:`_SIZE_BY_PARTS`), serialized deterministically,
    then each of those initializers' name, length and ``raw_data`` in graph order. Equal models give equal
    digests and any change of a weight's bytes changes it; it is not the digest of the serialized model.
    ``held``: initializers whose ``raw_data`` is held elsewhere (name -> a callable giving their bytes;
    ``FlowContext.hold_weights``): the digest is that of the model with them put back."""
    held = held or {}
    large = [t for t in model.graph.initializer
             if (tensor_nbytes(t) if t.name in held else _raw_len(t)) >= _SIZE_BY_PARTS]  # held: from dims
    if not large and not held:
        h.update(model.SerializeToString(deterministic=True))
        return
    names = {t.name for t in large}
    shell = onnx.ModelProto()
    _copy_message_fields(model, shell, {"graph"})
    _copy_message_fields(model.graph, shell.graph, {"initializer"})
    for t in model.graph.initializer:
        out = shell.graph.initializer.add()
        _copy_message_fields(t, out, {"raw_data"} if t.name in names else set())
        if t.name in held and t.name not in names:  # a small held tensor: its bytes in place, as in the model
            out.raw_data = held[t.name]()
    h.update(shell.SerializeToString(deterministic=True))
    for t in large:
        raw = held[t.name]() if t.name in held else t.raw_data  # one tensor's bytes at a time
        h.update(f"|{t.name}|{len(raw)}|".encode())
        h.update(raw)
        del raw


_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_TENSOR_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def load_model(path) -> onnx.ModelProto:
    """Read ``path`` (with external data next to it), run ``onnx.checker`` on the file and return the
    model. Raises :class:`LLCError` for a missing, empty, truncated or non-ONNX file, missing external
    data, or a model the checker rejects. The file is only read."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise LLCError(f"{p}: file not found; check the path")
    if os.path.isdir(p):
        raise LLCError(f"{p}: is a directory, not an .onnx file; pass the model file")
    if os.path.getsize(p) == 0:
        raise LLCError(f"{p}: not a valid ONNX model (empty file); {_FIX_EXPORT}")
    try:
        model = onnx.load_model(p, load_external_data=False)
    except Exception:
        raise LLCError(f"{p}: not a valid ONNX model (cannot parse protobuf); {_FIX_EXPORT}") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise LLCError(f"{p}: not a valid ONNX model (no ir_version or graph); {_FIX_EXPORT}")
    _check_external_files(model, p)
    del model  # the checker below holds its own copy of the model: not two at once
    try:
        # The checker reads the file itself, which works for models with external data / > 2 GB.
        onnx.checker.check_model(p)
        unsorted = None
    except Exception as exc:
        unsorted = LLCError(f"{p}: not a valid ONNX model (checker: {first_line(exc)}); {_FIX_EXPORT}")
        if "topologically sorted" not in str(exc):
            raise unsorted from None
    model = onnx.load_model(p, load_external_data=False)
    try:
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(p)))
    except Exception as exc:
        raise LLCError(f"{p}: cannot read external data ({first_line(exc)}); {_FIX_EXPORT}") from None
    _check_tensor_sizes(model, p)
    _check_function_ids(model, p)
    if unsorted is not None:
        _check_sorted(model, p, unsorted)
    return model


def _check_function_ids(model: onnx.ModelProto, p: str) -> None:
    """Two local functions with one id (domain, name, overload) pass ``onnx.checker`` but break inlining and
    ONNX Runtime: bad input, said here."""
    seen = set()
    for f in model.functions:
        key = (f.domain, f.name, f.overload)
        if key in seen:
            raise LLCError(f"{p}: not a valid ONNX model (two local functions with the id "
                           f"'{f.domain}::{f.name}'); {_FIX_EXPORT}")
        seen.add(key)


def _check_sorted(model: onnx.ModelProto, p: str, checker_error: LLCError) -> None:
    """ONNX Runtime runs graphs whose nodes are listed out of order (ORT's own float16 converter writes them): put
    them in order (in place), then check again; a tensor nothing produces stays the checker's error."""
    try:
        sort_nodes(model, p)
    except LLCError:
        raise checker_error from None
    try:
        if proto_size(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory() as d:
                save_model(model, os.path.join(d, "sorted.onnx"))
                onnx.checker.check_model(os.path.join(d, "sorted.onnx"))
    except LLCError:
        raise
    except Exception as exc2:
        raise LLCError(f"{p}: not a valid ONNX model (checker: {first_line(exc2)}); {_FIX_EXPORT}") from None


def _check_external_files(model: onnx.ModelProto, p: str) -> None:
    base = os.path.dirname(os.path.abspath(p))
    for tensor in _external_tensors(model):
        loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not os.path.isfile(os.path.join(base, loc)):
            raise LLCError(
                f"{p}: external data file '{loc}' for tensor '{tensor.name}' not found next to the model; "
                "copy the .data file into the model's directory"
            )


def sort_nodes(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """Order the nodes of the main graph and of every subgraph topologically, in place (Kahn's algorithm,
    keeping the file's order among nodes that are ready together); returns ``model``. A node reading a tensor
    nothing produces (not a graph input, initializer or outer-scope value) or a cycle is an LLCError."""
    def sort(graph: onnx.GraphProto, outer: set[str]) -> None:
        known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
            {t.values.name for t in graph.sparse_initializer}
        nodes = list(graph.node)
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        for n in nodes:  # subgraphs see every name of this scope
            for a in n.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                          list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    sort(g, known | set(producer))
        needs: list[set[int]] = []
        for n in nodes:
            deps = set()
            for name in list(n.input) + _implicit_inputs(n):
                if not name or name in known:
                    continue
                if name not in producer:
                    raise LLCError(f"{source}: node '{n.name or n.op_type}' reads '{name}', which no node, input or "
                                   f"initializer provides; {_FIX_EXPORT}")
                deps.add(producer[name])
            needs.append(deps)
        users: dict[int, list[int]] = {}
        for i, deps in enumerate(needs):
            for d in deps:
                users.setdefault(d, []).append(i)
        import heapq

        waiting = [len(d) for d in needs]
        ready = [i for i, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for u in users.get(i, ()):
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) < len(nodes):
            stuck = next(nodes[i] for i, w in enumerate(waiting) if w > 0)
            raise LLCError(f"{source}: the graph has a cycle through node '{stuck.name or stuck.op_type}'; "
                           f"{_FIX_EXPORT}")
        if order != list(range(len(nodes))):
            del graph.node[:]
            graph.node.extend(nodes[i] for i in order)

    sort(model.graph, set())
    return model


def _implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from the enclosing scope (not produced or declared inside them)."""
    out = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                  list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            inner = {i.name for i in g.input} | {t.name for t in g.initializer} | \
                {o for n in g.node for o in n.output}
            for n in g.node:
                out += [name for name in list(n.input) + _implicit_inputs(n) if name and name not in inner]
    return out


# typed-data field of each element type whose entries are one per element
_TYPED_FIELD = {TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data", TensorProto.INT64: "int64_data",
                TensorProto.UINT64: "uint64_data", TensorProto.UINT32: "uint64_data",
                **{t: "int32_data" for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                                             TensorProto.UINT16, TensorProto.UINT8, TensorProto.BOOL,
                                             TensorProto.FLOAT16, TensorProto.BFLOAT16)}}


def _check_tensor_sizes(model: onnx.ModelProto, source: str) -> None:
    """Every tensor holds as much data as its dims and type say (the checker does not look: a truncated
    ``.data`` file or a wrong ``length`` would otherwise surface later as a numpy error)."""
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise LLCError(f"{source}: tensor '{t.name}' has negative dims {list(t.dims)}; {_FIX_EXPORT}")
        numel = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        bits = _BITS.get(t.data_type)
        if t.data_type == TensorProto.STRING or t.data_type == TensorProto.UNDEFINED:
            continue
        if bits is None:
            raise LLCError(f"{source}: tensor '{t.name}' has element type {t.data_type}, which ONNX does not define; "
                           f"{_FIX_EXPORT}")
        if t.HasField("raw_data"):
            have, want, unit = len(t.raw_data), (numel * bits + 7) // 8, "bytes"
        elif t.data_type in _TYPED_FIELD:
            have, want, unit = len(getattr(t, _TYPED_FIELD[t.data_type])), numel, "values"
        else:
            continue
        if have != want:
            name = TensorProto.DataType.Name(t.data_type)
            raise LLCError(f"{source}: tensor '{t.name}' holds {have} {unit} of data, its dims {list(t.dims)} of "
                           f"{name} need {want}; {_FIX_EXPORT}")


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            yield t


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def node_names(graph: onnx.GraphProto, taken: set[str] | None = None) -> list[str]:
    """Names :func:`name_nodes` gives the nodes of ``graph`` (in ``graph.node`` order), without changing
    anything: a node keeps its name; an unnamed node gets ``f"{op_type}_{index}"`` (index in
    ``graph.node``), or ``f"{op_type}_{index}_{k}"`` with the smallest k ≥ 1 that is free."""
    if taken is None:
        taken = {n.name for g in _all_graphs(graph) for n in g.node if n.name}
    names = []
    for i, node in enumerate(graph.node):
        if node.name:
            names.append(node.name)
            continue
        name = f"{node.op_type}_{i}"
        k = 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{i}_{k}"
        taken.add(name)
        names.append(name)
    return names


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node (also inside subgraphs) a unique name, in place; returns ``model``."""
    taken = {n.name for g in _all_graphs(model.graph) for n in g.node if n.name}
    for g in list(_all_graphs(model.graph)):
        for node, name in zip(g.node, node_names(g, taken)):
            node.name = name
    return model


def plain_raw(t: TensorProto) -> bool:
    """``t`` has no field but name, type, dims and ``raw_data``: a copy without its data (:func:`_copy`) loses
    nothing else, so setting ``raw_data`` back gives the tensor back byte for byte."""
    return {fd.name for fd, _ in t.ListFields()} <= {"dims", "data_type", "name", "raw_data"}


class ParkedData:
    """A model whose large plain initializers (``raw_data`` of at least ``min_bytes``; no field but name, type,
    dims and data) wait in files (``memory.Spill``: read-only maps, not resident once :func:`memory.release` drops
    their pages): :attr:`model` is a copy without their data — the caller drops the original, whose memory goes
    only with the whole message (protobuf's upb arenas do not give a cleared field back) — and :meth:`restore`
    puts the same bytes back: the model then serializes to the bytes it had. For a large model that must outlive
    sessions reading it from its own files (``optimize``'s final model during the calibration check, the test and
    the latency table: 0.6 GB on SmolLM2's lossless plan)."""

    def __init__(self, model: onnx.ModelProto, min_bytes: int = 1 << 20):
        import numpy as np

        from .memory import Spill, release

        self.spill, self.arrays = Spill(), {}
        for t in model.graph.initializer:
            if len(t.raw_data) >= min_bytes and plain_raw(t):
                self.arrays[t.name] = self.spill.put(np.frombuffer(t.raw_data, dtype=np.uint8))
        self.model = _copy(model, skip_data=self.arrays) if self.arrays else model
        release()

    def restore(self) -> onnx.ModelProto:
        """:attr:`model` with every parked tensor's bytes back (once; later calls return it as it is)."""
        from .memory import drop

        for t in self.model.graph.initializer:
            a = self.arrays.pop(t.name, None)
            if a is not None:
                t.raw_data = a.tobytes()
                drop(a)
        return self.model


class _DetachedWeights:
    """Temporarily strip large initializer payloads so that version conversion / shape inference can
    serialize a > 2 GB model; shapes and types stay, data is restored by name afterwards."""

    def __init__(self, model: onnx.ModelProto, enabled: bool):
        self.data: dict[str, TensorProto] = {}
        if not enabled:
            return
        for t in model.graph.initializer:
            if t.ByteSize() > 1024:
                keep = TensorProto()
                keep.CopyFrom(t)
                self.data[t.name] = keep
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(f)

    def restore(self, model: onnx.ModelProto) -> onnx.ModelProto:
        for t in model.graph.initializer:
            if t.name in self.data:
                t.CopyFrom(self.data[t.name])
        return model


def prepare_model(model: onnx.ModelProto, opset: int = 21) -> onnx.ModelProto:
    """Return a prepared copy of ``model`` (the argument is not modified):

    1. every unnamed node named ``<op_type>_<index>`` (see :func:`node_names`), before anything else, so
       the names are those of the file as given (what ``inspect`` shows);
    2. graph inputs that are also initializers (``keep_initializers_as_inputs`` exports) are removed
       from ``graph.input`` so the weights are constants;
    3. ``-1`` dims of inputs, outputs and value infos (some converters write them) become unknown dims;
    4. constant weights folded into initializers (:func:`fold_constant_weights`);
    5. a default-domain opset below ``opset`` is converted up to ``opset`` with ``onnx.version_converter``;
       a model at ``opset`` or newer (up to 26, the newest ORT 1.31 runs) keeps its opset. ``opset`` is the
       lowest opset wanted: 21 (the QDQ pass needs ≥ 21), 25 when INT2 tensors are needed;
    6. IR version set to :func:`ir_version_for_opset` of the resulting opset (10 up to 22, 11 above);
    7. shape inference (``onnx.shape_inference.infer_shapes`` with data propagation).
    """
    if not 7 <= int(opset) <= MAX_ORT_OPSET:
        raise LLCError(f"opset {opset}: not supported; ONNX Runtime 1.31 runs opsets 7..{MAX_ORT_OPSET} (use 21, or 25 for INT2)")
    current = default_opset(model)
    if current > MAX_ORT_OPSET:
        raise LLCError(f"model: opset {current} is newer than ONNX Runtime 1.31 runs ({MAX_ORT_OPSET}); "
                       f"re-export the model with an opset in 11..{MAX_ORT_OPSET}")
    try:  # the weights' data copied once, at the end (_heavy_weights); the plain copy if a weight moved
        return _prepare(model, current, int(opset), _heavy_weights(model))
    except _WeightsMoved:
        return _prepare(model, current, int(opset), {})


class _WeightsMoved(Exception):
    pass


def _prepare(model: onnx.ModelProto, current: int, opset: int, heavy: dict[str, TensorProto]) -> onnx.ModelProto:
    m = _intake_steps(_copy(model, skip_data=heavy), heavy)
    large = proto_size(m) > EXTERNAL_DATA_THRESHOLD
    detached = _DetachedWeights(m, large)
    target = max(current, opset)
    if current == 0:
        m.opset_import.append(onnx.helper.make_opsetid("", target))
    elif current < target:
        try:
            m = onnx.version_converter.convert_version(m, target)
        except Exception as exc:
            raise LLCError(
                f"model: cannot convert from opset {current} to {target} ({first_line(exc)}); "
                f"re-export the model with opset {target}"
            ) from None
        name_nodes(m)  # nodes the converter added
    m.ir_version = ir_version_for_opset(target)
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise LLCError(f"model: shape inference failed ({first_line(exc)}); check the model with onnx.checker") from None
    return _restore_weights(detached.restore(m), heavy)


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model, **kwargs)`` run on a copy without the float weights' data
    (:func:`_heavy_weights`: name, type and dims kept; no shape computation reads them). For the inferred
    ``value_info`` / input / output types and shapes only: the result's weights have no data. Shape inference
    serializes and parses its argument (SmolLM2: ~2 GB of copies with the weights, a few MB without)."""
    heavy = _heavy_weights(model)
    return onnx.shape_inference.infer_shapes(_copy(model, skip_data=heavy) if heavy else model, **kwargs)


# Float types whose large initializers are weights: no shape computation reads their values
_WEIGHT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def _heavy_weights(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """The float initializers > 1 KB: name -> the tensor of ``model`` itself (not copied). :func:`prepare_model`
    copies the model without their data and copies it once, into the prepared model, at the end, so intake,
    version conversion and shape inference (which serialize the model, several times) handle a model without
    its weights. No shape computation reads a float weight; the tensors a constant weight chain reads are put
    back before it is folded (:func:`_intake_steps`)."""
    return {t.name: t for t in model.graph.initializer
            if t.data_type in _WEIGHT_TYPES and t.ByteSize() > 1024
            and not (t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL)}


def _restore_weights(m: onnx.ModelProto, heavy: dict[str, TensorProto]) -> onnx.ModelProto:
    """Copy the data of the :func:`_heavy_weights` back into ``m`` (in place), by name."""
    if not heavy:
        return m
    targets = [(t, heavy[t.name]) for t in m.graph.initializer if t.name in heavy]
    if len(targets) != len(heavy) or any(list(t.dims) != list(src.dims) or t.data_type != src.data_type
                                         for t, src in targets):
        raise _WeightsMoved  # the opset converter renamed or changed a weight: prepare from a full copy
    for t, src in targets:
        t.CopyFrom(src)
    return m


def _intake_steps(m: onnx.ModelProto, heavy: dict[str, TensorProto] | None = None) -> onnx.ModelProto:
    """Steps 1–4 of :func:`prepare_model`, in place: name nodes, drop initializers from the graph inputs,
    ``-1`` dims to unknown, fold constant weights. ``heavy``: initializers copied without their data
    (:func:`_heavy_weights`); those a constant weight chain reads get it back (and leave ``heavy``) first."""
    name_nodes(m)
    init_names = {t.name for t in m.graph.initializer}
    if any(i.name in init_names for i in m.graph.input):
        kept = [i for i in m.graph.input if i.name not in init_names]
        del m.graph.input[:]
        m.graph.input.extend(kept)
    _negative_dims_to_unknown(m.graph)
    if heavy:
        nodes = m.graph.node
        read = {name for c in _constant_weight_chains(m).values() for i in c for name in nodes[i].input}
        for t in m.graph.initializer:
            if t.name in read and t.name in heavy:
                t.CopyFrom(heavy.pop(t.name))
    return fold_constant_weights(m)


def intake_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as :func:`prepare_model` sees it before converting the opset: nodes named, initializers
    dropped from the graph inputs, ``-1`` dims unknown, constant weights folded (no opset conversion, no
    shape inference). What ``inspect`` analyses, so that it lists the nodes ``optimize`` compresses. The
    argument is not modified; it is returned itself when no step would change which nodes are compressible
    (no copy of a large model for nothing)."""
    init_names = {t.name for t in model.graph.initializer}
    if not any(i.name in init_names for i in model.graph.input) and not _constant_weight_chains(model):
        return model
    return _intake_steps(_copy(model))


def _copy(model: onnx.ModelProto, skip_data: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model``; the initializers named in ``skip_data`` get their name, type and dims only."""
    m = onnx.ModelProto()
    if not skip_data:
        m.CopyFrom(model)
        return m
    _copy_message_fields(model, m, {"graph"})
    _copy_message_fields(model.graph, m.graph, {"initializer"})
    for t in model.graph.initializer:
        if t.name in skip_data:
            m.graph.initializer.add(name=t.name, data_type=t.data_type, dims=list(t.dims))
        else:
            m.graph.initializer.add().CopyFrom(t)
    return m


def _negative_dims_to_unknown(graph: onnx.GraphProto) -> None:
    """``dim_value: -1`` (a converter's way of writing a dynamic dim) -> an unknown dim, in place."""
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.ClearField("dim_value")


# Ops never folded at intake: (de)quantization (a weight behind DequantizeLinear is already compressed) and
# random generators (not constant although they have no variable input).
_NO_FOLD = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomNormalLike",
            "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
# Weight inputs of the ops llc-onnx compresses (compressible.py): MatMul B, Gemm B, Conv W.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}
# A folded chain may share a small tensor (a shape, a scalar) with the rest of the graph: it is then copied;
# a shared large tensor (e.g. an embedding also read by a Gather) is not, the chain is left as it is.
_SHARED_LIMIT = 4096


def _constant_weight_chains(model: onnx.ModelProto) -> dict[str, frozenset]:
    """Weight tensor name -> indices (in ``graph.node``) of the nodes computing it from constants, for every
    MatMul/Gemm/Conv weight that a constant subgraph computes (see :func:`fold_constant_weights`)."""
    graph = model.graph
    nodes = list(graph.node)
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name for t in graph.initializer}
    # one pass in graph (topological) order: a value is constant when an initializer (not a graph input)
    # or computed by a foldable node from constants; chains[v] = the nodes computing it
    chains: dict[str, frozenset] = {name: frozenset() for name in inits - graph_inputs}
    for i, n in enumerate(nodes):
        if n.domain not in ("", "ai.onnx") or n.op_type in _NO_FOLD or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            continue
        if all(name in chains for name in n.input if name):
            acc = frozenset({i}).union(*(chains[name] for name in n.input if name))
            for o in n.output:
                if o:
                    chains[o] = acc

    targets: dict[str, frozenset] = {}
    for n in nodes:
        k = _WEIGHT_INPUT.get(n.op_type)
        if n.domain not in ("", "ai.onnx") or k is None or len(n.input) <= k:
            continue
        w = n.input[k]
        if w and w not in inits and w not in targets and chains.get(w):
            targets[w] = chains[w]
    return targets


def fold_constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the weights of MatMul (B), Gemm (B) and Conv (W) that a constant subgraph computes into
    initializers, in place; returns ``model`` (run :func:`name_nodes` first: nodes are removed, and unnamed
    nodes are named by their index).

    A weight is constant when every path back from it ends in initializers (not graph inputs) or
    ``Constant`` nodes through ONNX-domain ops without subgraphs, other than DequantizeLinear/QuantizeLinear
    (a weight behind a DequantizeLinear is already compressed) and random generators — the shapes converter
    exports take: a ``Constant`` weight (Keras/TF/Paddle), ``Transpose`` of an initializer feeding MatMul
    (TF), ``Cast`` float16 -> float32 of an initializer, ``Reshape``/``Unsqueeze``/``Identity`` of a Conv
    weight (older PyTorch, Paddle). The folded initializer takes the name of the weight tensor; nodes and
    initializers nothing reads any more are removed, node names are untouched. A chain whose large
    intermediate (> 4096 elements) is also read elsewhere (a tied embedding read by a Gather) is left as it
    is: folding it would store that tensor twice.

    Evaluation: ONNX's reference implementation (``onnx.reference``), one node at a time. onnxscript's
    ``fold_constants`` evaluates with the same reference ops but also runs its rewrite rules over every
    node of the model; intake must change nothing but these weights."""
    from onnx.reference import ReferenceEvaluator

    targets = _constant_weight_chains(model)
    if not targets:
        return model
    graph = model.graph
    nodes = list(graph.node)
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, set[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name:
                consumers.setdefault(name, set()).add(i)
    graph_outputs = {o.name for o in graph.output}

    version = {(imp.domain or ""): int(imp.version) for imp in model.opset_import}
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in values:
            if name in inits:
                values[name] = onnx.numpy_helper.to_array(inits[name])
            else:
                n = nodes[producer[name]]
                feeds = {i: value(i) for i in n.input if i}
                try:
                    outs = ReferenceEvaluator(n, opsets={"": version.get("", 21)}).run(None, feeds)
                except Exception as exc:
                    raise LLCError(f"node '{n.name}' (op {n.op_type}): cannot fold the constant weight it computes "
                                   f"({first_line(exc)}); check the model with onnx.checker") from None
                for o, a in zip(n.output, outs):
                    if o:
                        values[o] = np.asarray(a)
        return values[name]

    def shared_large(t: str, c: frozenset) -> bool:
        """True when folding ``t`` would copy a large tensor that something outside its chain also reads."""
        internal = {name for i in c for name in nodes[i].input if name} | {o for i in c for o in nodes[i].output if o}
        for name in internal - {t}:
            outside = consumers.get(name, set()) - c
            if name in graph_outputs or (outside and value(name).size > _SHARED_LIMIT):
                return True
        other_outputs = [o for o in nodes[producer[t]].output if o and o != t]
        return any(consumers.get(o, set()) - c or o in graph_outputs for o in other_outputs)

    kept = {t: c for t, c in targets.items() if t not in graph_outputs and not shared_large(t, c)}
    if not kept:
        return model
    folded = {i for c in kept.values() for i in c}
    new_inits = [onnx.numpy_helper.from_array(np.ascontiguousarray(value(t)), t) for t in kept]
    # drop folded nodes nobody reads any more (a folded node may still feed the rest of the graph)
    alive = set(range(len(nodes))) - folded
    needed = set(graph_outputs) | {name for i in alive for name in nodes[i].input if name}
    for i in sorted(folded, reverse=True):  # topological order: consumers come after producers
        if any(o in needed and o not in kept for o in nodes[i].output if o):
            alive.add(i)
            needed.update(name for name in nodes[i].input if name)
    keep_nodes = [nodes[i] for i in sorted(alive)]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    still_read = needed | {o.name for o in graph.output}
    keep_inits = [t for t in graph.initializer if t.name in still_read or t.name in graph_inputs]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + new_inits)
    kept_names = set(kept)
    vis = [vi for vi in graph.value_info if vi.name not in kept_names]
    del graph.value_info[:]
    graph.value_info.extend(vis)
    return model


def save_with_metadata(model: onnx.ModelProto, path, metadata: dict[str, str]) -> str:
    """:func:`save_model` of a copy of ``model`` whose ``llc_onnx.*`` metadata is replaced by ``metadata`` (the
    model's other metadata kept; ``model`` is not modified). Returns the path written."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [p for p in out.metadata_props if not p.key.startswith("llc_onnx.")]
    del out.metadata_props[:]
    out.metadata_props.extend(keep)
    for k, v in metadata.items():
        out.metadata_props.add(key=k, value=v)
    save_model(out, path)
    return os.fspath(path)


def save_model(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` atomically (``model`` itself is not modified).

    A model up to :data:`EXTERNAL_DATA_THRESHOLD` bytes is one file: written under a temporary name in a
    temporary directory beside ``path``, flushed to disk, and moved onto ``path`` with ``os.replace``.

    A larger model is a pair: the model file and one external data file named by its content,
    ``<name>.<first 16 hex digits of its SHA-256>.data`` (:func:`external_data_name`; tensors of ≥ 1 KiB,
    each at a 4 KiB-aligned offset). Order of the steps, and what a reader of ``path`` sees meanwhile:

    1. the data and the model are written into the temporary directory and flushed: ``path`` is still the
       previous model (or absent), with its own data files, untouched;
    2. the data file is moved to its content name beside ``path``: nothing refers to it yet (a file already
       there under that name has the same bytes);
    3. ``os.replace`` of the model onto ``path`` — the commit: from here ``path`` is the new model, whose data
       file is complete on disk;
    4. the data files the previous model referred to (those named after ``path``) and what killed writes of
       ``path`` left (``<name>.<16 hex>.data`` not referred to, ``.<name>.*.tmp`` directories) are deleted: a reader that parsed the previous model
       before step 3 finds its data file either intact or gone (an error), never another model's data.

    So at no instant does ``path`` name a model whose data file is missing, partial or another model's, and a
    run killed at any point leaves ``path`` as it was or complete (a kill at step 2 or 4 may leave one orphan
    data file, which the next write removes). On an exception (KeyboardInterrupt included: the CLI turns
    SIGINT/SIGTERM into one) before the commit, every file this call created is removed."""
    p = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(p)
    base = os.path.basename(p)
    if not os.path.isdir(directory):
        raise LLCError(f"{path}: directory '{directory}' does not exist; create it first")
    previous = _external_locations(p) if os.path.isfile(p) else set()
    created: list[str] = []  # final paths this call created before the commit (removed on failure)
    tmpdir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    committed = False
    try:
        tmp_model = os.path.join(tmpdir, base)
        data_name = None
        if proto_size(model) > EXTERNAL_DATA_THRESHOLD:
            tmp_data = os.path.join(tmpdir, "data")
            shell, digest = _write_external(model, tmp_data, base)
            data_name = external_data_name(base, digest) if digest else None
            if data_name is not None:
                _set_location(shell, data_name)
            _write_file(tmp_model, shell.SerializeToString())
            if data_name is not None:
                final = os.path.join(directory, data_name)
                if not os.path.exists(final):
                    created.append(final)
                os.replace(tmp_data, final)
        else:
            with open(tmp_model, "wb") as f:  # streamed: SerializeToString() held the model twice more
                _write_serialized(model, f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_model, p)
        committed = True
        _fsync_directory(directory)
        _remove_stale_data(directory, base, previous, data_name, tmpdir)
    except LLCError:
        raise
    except Exception as exc:
        raise LLCError(f"{path}: cannot write the model ({first_line(exc)}); check disk space and permissions") from None
    finally:
        if not committed:
            for f in created:
                try:
                    os.unlink(f)
                except OSError:
                    pass
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_for_session(model: onnx.ModelProto, directory: str, name: str = "model.onnx",
                      held: dict | None = None) -> str:
    """Write ``model`` into ``directory`` the way ONNX Runtime loads a large model with the least memory:
    ``name`` with every main-graph initializer ≥ 1 KiB as external data in ``name + ".data"``, written tensor by
    tensor (:func:`_write_external`: no serialized copy of the whole model in memory; offsets aligned to 4 KiB;
    a temporary file, so no hash and no fsync). Returns the model path. ``model`` is not modified. ``held``: the
    data of initializers ``model`` leaves out, by name (:func:`_write_external`)."""
    data_name = name + ".data"
    shell, _ = _write_external(model, os.path.join(directory, data_name), name, durable=False, held=held)
    _set_location(shell, data_name)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(shell.SerializeToString())
    return path


_ALIGN = 4096
_EXTERNAL_MIN = 1024  # tensors of at least this many bytes go to the data file
_DATA_FIELDS = {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"}


def external_data_name(model_name: str, digest: str) -> str:
    """The data file of model ``model_name`` whose content has SHA-256 ``digest`` (hex)."""
    return f"{model_name}.{digest[:16]}.data"


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_message_fields(src, dst, skip: set[str]) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    _copy_fields_where(src, dst, lambda fd: fd.name not in skip)


def _copy_fields_where(src, dst, keep) -> None:
    """Copy the set fields of protobuf message ``src`` whose descriptor ``keep`` accepts into ``dst``."""
    for fd, value in src.ListFields():
        if not keep(fd):
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _write_external(model: onnx.ModelProto, data_path: str, base: str, *, durable: bool = True,
                    held: dict | None = None) -> tuple[onnx.ModelProto, str | None]:
    """(shell, SHA-256 hex of the data file or None when no tensor went there): the main graph's initializers
    of ≥ 1 KiB (``raw_data``, or typed data as its raw bytes; not strings) are written to ``data_path`` at
    4 KiB-aligned offsets, and ``shell`` is the model with those tensors pointing there (location to be set).
    Only one tensor's bytes are copied at a time: the shell is built field by field, never as a copy of the
    whole model. ``durable=False`` (a temporary file for ONNX Runtime) skips the hash and the fsync. ``held``:
    name -> a function giving the ``raw_data`` of an initializer that has none in ``model`` (a weight the
    interpreter holds, ``FlowContext.held_data``): written as if the model had it."""
    import hashlib

    from onnx import numpy_helper

    shell = onnx.ModelProto()
    _copy_message_fields(model, shell, {"graph"})
    _copy_message_fields(model.graph, shell.graph, {"initializer"})
    digest = hashlib.sha256()
    offset = 0
    moved = 0
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            out = shell.graph.initializer.add()
            fill = held.get(t.name) if held and not t.HasField("raw_data") else None
            raw = fill() if fill is not None else None
            size = len(raw) if raw is not None else len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
            if t.data_location == TensorProto.EXTERNAL or t.data_type == TensorProto.STRING or size < _EXTERNAL_MIN:
                out.CopyFrom(t)
                if raw is not None:
                    out.raw_data = raw
                continue
            _copy_message_fields(t, out, _DATA_FIELDS)
            if raw is None:
                raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            pad = -offset % _ALIGN
            if pad:
                f.write(b"\0" * pad)
                offset += pad
                if durable:
                    digest.update(b"\0" * pad)
            f.write(raw)
            if durable:
                digest.update(raw)
            del out.external_data[:]
            for key, value in (("location", "?"), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = out.external_data.add()
                entry.key, entry.value = key, value
            out.data_location = TensorProto.EXTERNAL
            offset += len(raw)
            moved += 1
            del raw
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if proto_size(shell) >= 2**31 - 1:  # protobuf cannot serialize it
        raise LLCError(f"{base}: the model is larger than 2 GB without its initializers (large Constant nodes or "
                       "subgraph tensors); store those weights as initializers")
    return shell, (digest.hexdigest() if moved else None)


def _set_location(shell: onnx.ModelProto, location: str) -> None:
    for t in shell.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and e.value == "?":
                    e.value = location


def _external_locations(path: str) -> set[str]:
    """Data files (plain names beside the model) the model at ``path`` refers to; empty when unreadable or
    large (a model with external data is small without it)."""
    try:
        if os.path.getsize(path) > 64 << 20:
            return set()
        m = onnx.load_model(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever was there is about to be replaced
        return set()
    return {e.value for t in _external_tensors(m) for e in t.external_data
            if e.key == "location" and e.value and os.path.basename(e.value) == e.value}


def _remove_stale_data(directory: str, base: str, previous: set[str], keep: str | None, own_tmp: str) -> None:
    """After the commit: delete the previous model's data files named after it, and what killed writes of this
    path left: content-named data files nothing refers to and their temporary directories (one writer per
    output path is assumed)."""
    import re

    pattern = re.compile(re.escape(base) + r"\.[0-9a-f]{16}\.data")
    tmp_pattern = re.compile(re.escape(f".{base}.") + r"[a-z0-9_]{8}\.tmp")
    stale = {n for n in previous if n.startswith(base + ".")}
    try:
        names = os.listdir(directory)
    except OSError:
        return
    stale |= {n for n in names if pattern.fullmatch(n)}
    for name in stale - {keep}:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    for name in names:
        if tmp_pattern.fullmatch(name) and name != os.path.basename(own_tmp):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def tensor_bits(elem_type: int) -> int:
    """Bits per element of an ONNX tensor element type."""
    return _BITS.get(int(elem_type), 0)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Storage of ``tensor`` at its element bit width, packed (INT4: numel/2 rounded up, INT2: numel/4...)."""
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    return (numel * tensor_bits(tensor.data_type) + 7) // 8


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total packed bytes of the main graph's initializers (see :func:`tensor_nbytes`)."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)
