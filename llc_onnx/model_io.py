"""Reading, preparing and writing ONNX models.

* :func:`load_model` reads a model (with its external data), checks it with ``onnx.checker`` and turns
  every failure into a one-line :class:`~llc_onnx.errors.LLCError`. It never writes to the input path.
* :func:`prepare_model` returns a *copy* brought to an opset ONNX Runtime 1.31 runs (21 by default, 25
  when INT2 is needed), with an IR version ORT accepts, unique node names and inferred shapes.
* :func:`save_model` writes atomically (temp file in the destination directory + ``os.replace``) and
  switches to external data above :data:`EXTERNAL_DATA_THRESHOLD` bytes.
* :func:`tensor_nbytes` / :func:`initializer_bytes` count storage at the element bit width (INT4 = 1/2
  byte per element, INT2 = 1/4, ...), which is how compressed sizes are reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import onnx
from onnx import TensorProto

from .errors import LLCError

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / "ai.onnx") domain imported by ``model`` (0 if none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


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
    base = os.path.dirname(os.path.abspath(p))
    for tensor in _external_tensors(model):
        loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not os.path.isfile(os.path.join(base, loc)):
            raise LLCError(
                f"{p}: external data file '{loc}' for tensor '{tensor.name}' not found next to the model; "
                "copy the .data file into the model's directory"
            )
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as exc:
        raise LLCError(f"{p}: cannot read external data ({_first_line(exc)}); {_FIX_EXPORT}") from None
    try:
        # The checker reads the file itself, which works for models with external data / > 2 GB.
        onnx.checker.check_model(p)
    except Exception as exc:
        raise LLCError(f"{p}: not a valid ONNX model (checker: {_first_line(exc)}); {_FIX_EXPORT}") from None
    return model


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

    1. default-domain opset converted to ``opset`` with ``onnx.version_converter`` (only when it
       differs); ``opset`` must be ≤ 26, the newest ORT 1.31 runs (use 25 when INT2 tensors are needed);
    2. IR version set to :func:`ir_version_for_opset` (10 for opset ≤ 22, 11 above);
    3. graph inputs that are also initializers (``keep_initializers_as_inputs`` exports) are removed
       from ``graph.input`` so the weights are constants;
    4. every unnamed node named ``<op_type>_<index>`` (see :func:`node_names`);
    5. shape inference (``onnx.shape_inference.infer_shapes`` with data propagation).
    """
    if not 7 <= int(opset) <= MAX_ORT_OPSET:
        raise LLCError(f"opset {opset}: not supported; ONNX Runtime 1.31 runs opsets 7..{MAX_ORT_OPSET} (use 21, or 25 for INT2)")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    large = m.ByteSize() > EXTERNAL_DATA_THRESHOLD
    detached = _DetachedWeights(m, large)
    current = default_opset(m)
    if current == 0:
        m.opset_import.append(onnx.helper.make_opsetid("", opset))
    elif current != opset:
        try:
            m = onnx.version_converter.convert_version(m, int(opset))
        except Exception as exc:
            raise LLCError(
                f"model: cannot convert from opset {current} to {opset} ({_first_line(exc)}); "
                f"re-export the model with opset {opset}"
            ) from None
    m.ir_version = ir_version_for_opset(int(opset))
    init_names = {t.name for t in m.graph.initializer}
    if any(i.name in init_names for i in m.graph.input):
        kept = [i for i in m.graph.input if i.name not in init_names]
        del m.graph.input[:]
        m.graph.input.extend(kept)
    name_nodes(m)
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise LLCError(f"model: shape inference failed ({_first_line(exc)}); check the model with onnx.checker") from None
    return detached.restore(m)


def save_model(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` atomically: the file is written next to ``path`` under a temporary
    name and moved into place with ``os.replace``; on failure the temporary files are removed and the
    destination is untouched. Models larger than :data:`EXTERNAL_DATA_THRESHOLD` bytes are written with
    external data in ``<name>.data`` next to the model (``model`` itself is not modified)."""
    p = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(p)
    base = os.path.basename(p)
    if not os.path.isdir(directory):
        raise LLCError(f"{path}: directory '{directory}' does not exist; create it first")
    tmpdir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        tmp_model = os.path.join(tmpdir, base)
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            m = onnx.ModelProto()
            m.CopyFrom(model)  # save_model(save_as_external_data=True) rewrites tensors in place
            data_name = base + ".data"
            onnx.save_model(m, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            if os.path.exists(os.path.join(tmpdir, data_name)):  # absent when every tensor is small
                os.replace(os.path.join(tmpdir, data_name), os.path.join(directory, data_name))
        else:
            onnx.save_model(model, tmp_model)
        os.replace(tmp_model, p)
    except LLCError:
        raise
    except Exception as exc:
        raise LLCError(f"{path}: cannot write the model ({_first_line(exc)}); check disk space and permissions") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


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
