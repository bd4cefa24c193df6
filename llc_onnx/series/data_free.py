"""Data-free series compression (the paper's setting): fixed bits and T for every compressible node, no data.

``data_free(model, bits=4, terms=2)`` prepares the model (``model_io.prepare_model``), expands the weight of
every node ``find_compressible`` lists into ``terms`` b-bit terms (:func:`llc_onnx.series.expand_model`) and
writes them with :class:`llc_onnx.passes.series.SeriesPass`. The input model is not modified.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from llc_onnx.compressible import find_compressible
from llc_onnx.model_io import prepare_model
from llc_onnx.series.model import SeriesModel, expand_model

__all__ = ["SeriesRewrite", "data_free", "write_series"]


@dataclass(frozen=True, eq=False)
class SeriesRewrite:
    model: onnx.ModelProto                 # the rewritten model
    series: SeriesModel                    # the expansion it holds (truncate/basis/add for other models)
    skipped: tuple[tuple[str, str], ...]   # (node, reason) of MatMul/Gemm/Conv nodes left float
    nbytes: int                            # stored bytes of all terms (codes + scales)


def write_series(prepared: onnx.ModelProto, series: SeriesModel, *, form: str = "standard", function: bool = True,
                 order: int | None = None) -> onnx.ModelProto:
    """The prepared model with ``series`` written in (``order``: truncate every node at τ terms)."""
    from llc_onnx.passes.series import apply_series

    if order is not None:
        series = series.truncate(order)
    weights = {k: w for k, w in series.weights.items() if w.order > 0}
    return apply_series(prepared, weights, form=form, function=function)


def data_free(model: onnx.ModelProto, *, bits: int = 4, terms: int | Mapping[str, int] = 2,
              block_size: int | None | str = "default", scale_method: str = "mse", form: str = "standard",
              function: bool = True) -> SeriesRewrite:
    """Expand every compressible node into ``terms`` ``bits``-bit terms and write the model (module doc)."""
    prepared = prepare_model(model)
    series = expand_model(prepared, bits=bits, terms=terms, block_size=block_size, scale_method=scale_method)
    _, skipped = find_compressible(prepared)
    out = write_series(prepared, series, form=form, function=function)
    return SeriesRewrite(model=out, series=series, skipped=tuple(skipped), nbytes=series.nbytes())
