"""Tensor conventions of the interpreter: ONNX element types in torch, numpy -> torch, small conversions.

Float tensors run in the graph's dtype (float32 or float64) whatever their ONNX float type; integer types map
to the nearest torch integer type (unsigned 16/32/64 widened to signed, INT4/INT2 to int8). Shape tensors are
small int64 tensors, read as Python ints (:func:`as_ints`) only where an op needs static sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..axes import norm_axis  # noqa: F401 - the ops import it from here
from ..errors import LLCError

Tensor = torch.Tensor

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
INT_TYPES = {
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.UINT16: torch.int32,
    onnx.TensorProto.UINT32: torch.int64,
    onnx.TensorProto.UINT64: torch.int64,
    onnx.TensorProto.INT4: torch.int8,
    onnx.TensorProto.UINT4: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.INT2: torch.int8,
    onnx.TensorProto.UINT2: torch.uint8,
}


def np_to_torch(arr: np.ndarray, float_dtype: torch.dtype, device) -> Tensor:
    """A numpy array as a torch tensor on ``device``: floats in ``float_dtype``, integers as themselves."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" or arr.dtype.name in ("bfloat16", "float16") or "float" in arr.dtype.name:
        # float32 and narrower convert to float32 exactly: no float64 copy (twice the weight) on the way
        wide = float_dtype == torch.float64 or arr.dtype.itemsize > 4
        return torch.from_numpy(np.array(arr, dtype=np.float64 if wide else np.float32, order="C")).to(
            device=device, dtype=float_dtype)
    if arr.dtype == np.bool_:
        return torch.from_numpy(np.array(arr, order="C")).to(device)
    if arr.dtype.kind in "iu":
        if arr.dtype in (np.uint16, np.uint32, np.uint64):
            arr = arr.astype(np.int64)
        return torch.from_numpy(np.array(arr, order="C")).to(device)
    # int4/uint4/int2 (ml_dtypes) and friends
    if "int" in arr.dtype.name:
        return torch.from_numpy(np.array(arr, dtype=np.int16, order="C")).to(device)
    raise LLCError(f"tensor of dtype {arr.dtype}: not supported by the llc-onnx interpreter")


def as_ints(t: Tensor | None) -> list[int] | None:
    """A shape-like tensor as a list of Python ints (None stays None)."""
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def scalar(t: Tensor) -> Any:
    """The first element of ``t`` as a Python number."""
    return t.reshape(-1)[0].item()


def is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def attr_value(attr: onnx.AttributeProto) -> Any:
    """An attribute as a Python value (tensors as numpy, strings decoded; graphs as the proto itself)."""
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return attr
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [s.decode("utf-8") for s in v]
    return v
