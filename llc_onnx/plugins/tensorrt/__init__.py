"""TensorRT: plugin definitions for the weight-only formats TensorRT cannot express, ONNX conversion, engines.

* :mod:`.convert`  ``MatMulNBits`` / series nodes -> plugin nodes (``plugin_namespace`` / ``plugin_version``),
  4-bit -> ``DequantizeLinear`` + ``MatMul`` (TensorRT's native weight-only INT4); no TensorRT needed;
* :mod:`.plugins`  ``tensorrt.plugin`` registrations whose ``aot_impl`` returns the Triton-compiled PTX, so the
  engine runs without Python; registered lazily by :func:`~.plugins.register_plugins`;
* :mod:`.engine`   :func:`~.engine.build_engine` (strongly typed) and :func:`~.engine.compare_engine`.

Importing this package never imports ``tensorrt``.
"""

from .convert import PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, Conversion, to_tensorrt

__all__ = ["to_tensorrt", "Conversion", "PLUGIN_DOMAIN", "PLUGIN_NAMESPACE", "PLUGIN_VERSION"]
