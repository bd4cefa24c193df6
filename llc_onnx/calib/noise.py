"""Loss under a perturbation, applied inside the interpreter (no ONNX rewrite).

``measure_loss(graph, data, loss, weight_fns={node: f})`` evaluates  L(W + δ)  with  W' = f(W)  for the
chosen nodes (and  x' = g(x)  for ``input_fns``); the difference to the unperturbed loss is the *measured*
ΔL the solvers compare with the first-order prediction Σ g·δ.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..interpreter import TorchGraph
from .data import Dataset
from .gradients import Progress, _feeds, _labels
from .losses import TaskLoss

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def constant(value: torch.Tensor) -> TensorFn:
    """A weight hook that replaces the weight by ``value`` (e.g. a dequantized or factored weight)."""
    return lambda _w: value


@torch.no_grad()
def measure_loss(graph: TorchGraph, dataset: Dataset, loss: TaskLoss,
                 weight_fns: dict[str, TensorFn] | None = None, input_fns: dict[str, TensorFn] | None = None,
                 progress: Progress = None) -> float:
    """Mean task loss over ``dataset`` with the given hooks applied (forward only)."""
    total, n = 0.0, 0
    for batch in dataset.batches:
        outs, _ = graph.run(_feeds(graph, batch, False), weight_fns=weight_fns, input_fns=input_fns,
                            outputs=[loss.output])
        s, c = loss.terms(outs[loss.output], _labels(batch, graph.device))
        total += float(s)
        n += int(c)
        if progress:
            progress(1)
    if n == 0:
        raise ValueError("no loss terms in the data (all labels ignored?)")
    return total / n
