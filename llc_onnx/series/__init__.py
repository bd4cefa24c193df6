"""FP = xINT: series expansion of weights into low-bit basis terms, W ≈ Σ_t s_t·Q_t.

* :mod:`.expansion`  one weight: :func:`expand_weight` -> :class:`SeriesWeight`; AbelianAdd/Mul, identity, inverse;
* :mod:`.model`      a model: :class:`SeriesModel` (node -> expansion), basis models, truncation, :func:`expand_model`;
* :mod:`.packing`    the stored layout: terms stacked along the reduction axis, MatMulNBits bytes;
* :mod:`.data_free`  fixed bits and T for every node, no data: :func:`data_free`.

The ONNX rewrite is :mod:`llc_onnx.passes.series`.
"""

from llc_onnx.series.data_free import SeriesRewrite, data_free, write_series
from llc_onnx.series.expansion import (
    SERIES_BITS,
    SeriesWeight,
    abelian_add,
    abelian_mul,
    default_block_size,
    expand_options,
    expand_weight,
    identity,
    inverse,
)
from llc_onnx.series.model import (
    SeriesModel,
    expand_model,
    expand_node,
    model_add,
    model_identity,
    model_inverse,
    model_mul,
)
from llc_onnx.series.packing import StackedTerms, pack_nbits, stack_terms, stacked_nbytes, unpack_nbits

__all__ = [
    "SERIES_BITS", "SeriesWeight", "SeriesModel", "SeriesRewrite", "StackedTerms",
    "expand_weight", "expand_options", "expand_node", "expand_model", "data_free", "write_series",
    "abelian_add", "abelian_mul", "identity", "inverse",
    "model_add", "model_mul", "model_identity", "model_inverse",
    "default_block_size", "stack_terms", "stacked_nbytes", "pack_nbits", "unpack_nbits",
]
