"""Quantizers: symmetric weight quantization with loss-aware (LLC) rounding, activation fake-quant."""

from llc_onnx.quant.activations import (
    ActivationQuant,
    activation_scale,
    dynamic_uint8_fake_quant,
    fake_quant_activation,
)
from llc_onnx.quant.weights import (
    QuantizedWeight,
    WeightQuantSpec,
    conv_matrix_shape,
    dominated_levels,
    is_matrix_layout,
    qrange,
    quantize_weight,
    weight_nbytes,
)

__all__ = [
    "ActivationQuant",
    "QuantizedWeight",
    "WeightQuantSpec",
    "activation_scale",
    "conv_matrix_shape",
    "dominated_levels",
    "dynamic_uint8_fake_quant",
    "is_matrix_layout",
    "fake_quant_activation",
    "qrange",
    "quantize_weight",
    "weight_nbytes",
]
