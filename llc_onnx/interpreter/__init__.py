"""ONNX -> PyTorch interpreter: measure the loss and its gradients on the ONNX graph itself.

* :mod:`.graph`     :class:`TorchGraph` (run, hooks, capture, snapshots);
* :mod:`.registry`  :func:`register_op` and the entry-point group for third-party ops;
* :mod:`.tensors`   dtype conventions (floats run in float32 or float64, CPU or CUDA);
* :mod:`.ops`       the built-in ops, one module per family.
"""

from . import ops  # noqa: F401  (registers the built-in ops)
from .graph import Snapshots, Subgraph, TorchGraph, unsupported_nodes
from .registry import ENTRY_POINT_GROUP, OpContext, load_plugins, lookup, register_op, register_ops, supported_ops

__all__ = ["TorchGraph", "Subgraph", "Snapshots", "unsupported_nodes", "register_op", "register_ops", "lookup",
           "supported_ops", "load_plugins", "OpContext", "ENTRY_POINT_GROUP"]
