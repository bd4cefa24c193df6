"""A model as a sum of isomorphic basis models: the series expansion at the three granularities of the paper.

* **tensor**: each node's :class:`SeriesWeight` has its own number of terms T;
* **layer**: each node's (bits, T) is chosen (later, by the solver) from expansions at several bit-widths;
  truncation gives every T ≤ T_max of one expansion for free;
* **model**: :meth:`SeriesModel.basis` ``(t)`` is the isomorphic model holding term t of every node (nodes with
  fewer terms hold none), and the model is the :func:`model_add` (AbelianAdd) of its basis models. A model
  truncated at order τ (:meth:`SeriesModel.truncate`) keeps the first τ terms of every node: a valid, smaller
  model, so one expansion gives a progressive family.

The node-wise algebra (AbelianAdd, AbelianMul, identity, inverse) is the one of
:mod:`llc_onnx.series.expansion`, applied to every node; two models add when they expand the same nodes with
the same layouts. Since every basis model depends only on the residuals of its own nodes, nodes can be expanded
in any order or in parallel and the results combined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from llc_onnx.compressible import CompressibleNode, find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.series.expansion import SeriesWeight, abelian_add, abelian_mul, expand_weight, identity

__all__ = ["SeriesModel", "expand_model", "expand_node", "model_add", "model_mul", "model_identity", "model_inverse"]


@dataclass(frozen=True, eq=False)
class SeriesModel:
    """Node name -> :class:`SeriesWeight` (the series plan of a model; nodes absent stay float)."""

    weights: Mapping[str, SeriesWeight]

    @property
    def order(self) -> int:
        """The largest number of terms of any node (0 for an empty model)."""
        return max((w.order for w in self.weights.values()), default=0)

    def basis(self, t: int) -> SeriesModel:
        """Basis model t: term t of every node that has one (an isomorphic model with T = 1 per node)."""
        if not 0 <= t < max(self.order, 1):
            raise LLCError(f"series model: basis {t} does not exist (order {self.order})")
        return SeriesModel({k: (w.term(t) if t < w.order else identity(w)) for k, w in self.weights.items()})

    def truncate(self, order: int) -> SeriesModel:
        """Every node keeps its first min(order, T_node) terms."""
        if order < 0:
            raise LLCError(f"series model: order={order} must be ≥ 0")
        return SeriesModel({k: w.truncate(min(order, w.order)) for k, w in self.weights.items()})

    def dequant(self, order: int | None = None) -> dict[str, np.ndarray]:
        """Node name -> the float weight the (truncated) model computes."""
        return {k: w.dequant(None if order is None else min(order, w.order)) for k, w in self.weights.items()}

    def nbytes(self, order: int | None = None) -> int:
        """Stored bytes of all nodes' terms (each distinct expansion counted once; see ``SeriesWeight.nbytes``)."""
        seen: dict[int, int] = {}
        for w in self.weights.values():
            seen[id(w)] = w.nbytes(None if order is None else min(order, w.order))
        return sum(seen.values())

    def residual_norms(self) -> dict[str, tuple[float, ...]]:
        return {k: w.residual_norms for k, w in self.weights.items()}

    def same_terms(self, other: SeriesModel) -> bool:
        return self.weights.keys() == other.weights.keys() and all(
            w.same_terms(other.weights[k]) for k, w in self.weights.items())

    def __add__(self, other: SeriesModel) -> SeriesModel:
        return model_add(self, other)

    def __mul__(self, c: float) -> SeriesModel:
        return model_mul(c, self)

    __rmul__ = __mul__

    def __neg__(self) -> SeriesModel:
        return model_inverse(self)


def model_add(a: SeriesModel, b: SeriesModel) -> SeriesModel:
    """AbelianAdd of two expansions of the same graph: node-wise concatenation of the terms."""
    if a.weights.keys() != b.weights.keys():
        only = sorted(set(a.weights) ^ set(b.weights))
        raise LLCError(f"series model add: the models expand different nodes (e.g. '{only[0]}'); "
                       "add expansions of the same graph")
    return SeriesModel({k: abelian_add(w, b.weights[k]) for k, w in a.weights.items()})


def model_mul(c: float, a: SeriesModel) -> SeriesModel:
    """AbelianMul: every scale of every node times c."""
    return SeriesModel({k: abelian_mul(c, w) for k, w in a.weights.items()})


def model_identity(like: SeriesModel) -> SeriesModel:
    """The empty expansion of every node of ``like`` (value 0)."""
    return SeriesModel({k: identity(w) for k, w in like.weights.items()})


def model_inverse(a: SeriesModel) -> SeriesModel:
    return model_mul(-1.0, a)


def expand_model(model: onnx.ModelProto, *, bits: int = 4, terms: int | Mapping[str, int] = 2,
                 block_size: int | None | str = "default", scale_method: str = "mse",
                 nodes: Iterable[str] | None = None) -> SeriesModel:
    """Expand the weight of every compressible node of a prepared model (``model_io.prepare_model``; node names
    as ``find_compressible`` gives them) into ``terms`` b-bit terms (data-free: no calibration data).
    ``terms`` may be a dict node -> T (tensor granularity). ``nodes`` restricts the expansion to those nodes.
    Nodes sharing one initializer in the same layout share one expansion (stored once)."""
    found, _ = find_compressible(model)
    by_name = {n.name: n for n in found}
    if nodes is not None:
        wanted = list(dict.fromkeys(nodes))
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise LLCError(f"node '{missing[0]}': not a compressible node of the model; see 'llc-onnx inspect'")
        found = [by_name[n] for n in wanted]
    inits = {t.name: t for t in model.graph.initializer}
    cache: dict[tuple, SeriesWeight] = {}
    out: dict[str, SeriesWeight] = {}
    for node in found:
        t = terms.get(node.name) if isinstance(terms, Mapping) else terms
        if t is None:
            continue
        key = (node.weight, node.out_axis, node.reduce_axis, int(t))
        if key not in cache:
            cache[key] = expand_node(numpy_helper.to_array(inits[node.weight]), node, bits=bits, terms=int(t),
                                     block_size=block_size, scale_method=scale_method)
        out[node.name] = cache[key]
    return SeriesModel(out)


def expand_node(w: np.ndarray, node: CompressibleNode, *, bits: int, terms: int,
                block_size: int | None | str = "default", scale_method: str = "mse",
                rounding: str = "nearest", grad: np.ndarray | None = None) -> SeriesWeight:
    """:func:`expand_weight` with the node's axes; errors name the node."""
    try:
        return expand_weight(w, bits=bits, terms=terms, out_axis=node.out_axis, reduce_axis=node.reduce_axis,
                             block_size=block_size, scale_method=scale_method, rounding=rounding, grad=grad)
    except LLCError as exc:
        raise LLCError(f"node '{node.name}': {exc}") from None
