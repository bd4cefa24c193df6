"""Loss under a perturbation, applied inside the interpreter (no ONNX rewrite).

``measure(graph, data, loss, weight_fns={node: f})`` evaluates the loss with  W' = f(W)  for the chosen nodes
(and  x' = g(x)  for ``input_fns``), keeping every sample's loss. Against the unperturbed run on the same
samples this gives the *measured* ΔL the solvers compare with the first-order prediction Σ g·δ, and its
paired standard error: with per-sample differences e_i = s'_i − s_i (loss sums of sample i) over m samples
and N = Σ n_i loss terms,

    ΔL = Σ e_i / N,        SE(ΔL) = sqrt(m · var(e)) / N.

SE is what separates a real gain from calibration noise: held-out data sees a different sample of the same
per-sample effects, so a ΔL within a few SE of 0 may have either sign there. The "samples" are the loss's units
(``TaskLoss.unit_terms``): one per sample, and for the LM loss spans of 64 predicted tokens, so that one long
sequence still gives a standard error.

Correlated units (augmented views of one photo, spans of one document) make that SE too small. When the data
has ``groups`` (one id per sample, ``calib.data``), the SE is cluster-robust: with E_g = Σ_{i∈g} e_i over the
G groups,  SE(ΔL) = sqrt(G · var(E_g)) / N  — the same formula with groups as the independent units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import LLCError
from ..interpreter import Snapshots, TorchGraph
from .data import Dataset
from .gradients import Progress, _feeds, _labels
from .losses import TaskLoss

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def constant(value: torch.Tensor) -> TensorFn:
    """A weight hook that replaces the weight by ``value`` (e.g. a dequantized or factored weight)."""
    return lambda _w: value


@dataclass
class LossSamples:
    """Per-unit loss sums and term counts of one evaluation, with each unit's group (cluster) when the data
    has groups."""

    sums: np.ndarray
    counts: np.ndarray
    groups: np.ndarray | None = None

    @property
    def mean(self) -> float:
        return float(self.sums.sum() / self.counts.sum())

    def delta(self, base: "LossSamples") -> tuple[float, float]:
        """(ΔL, SE(ΔL)) of this run against ``base`` on the same samples (see module doc)."""
        return paired_delta(self.sums - base.sums, float(base.counts.sum()), base.groups)

    def se(self) -> float:
        """Standard error of :attr:`mean` (clustered by group when there are groups)."""
        n = float(self.counts.sum())
        return paired_delta(self.sums - self.counts * self.mean, n, self.groups)[1]


def paired_delta(e: np.ndarray, n: float, groups: np.ndarray | None = None) -> tuple[float, float]:
    """(Σe/N, SE): SE over independent units, or over the group sums E_g when ``groups`` is given."""
    if groups is not None:
        _, inv = np.unique(groups, return_inverse=True)
        e = np.bincount(inv, weights=e)
    se = float(np.sqrt(len(e) * e.var(ddof=1)) / n) if len(e) > 1 else 0.0
    return float(e.sum() / n) if n else 0.0, se


def _samples(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, run_batch, progress: Progress = None
             ) -> LossSamples:
    """Per-unit loss sums over ``dataset``; ``run_batch(i, feeds)`` returns batch i's loss output."""
    sums, counts, groups = [], [], []
    for bi, batch in enumerate(dataset.batches):
        out, labels = run_batch(bi, _feeds(graph, batch, False)), _labels(batch, loss, graph.device)
        for i in range(out.shape[0]):
            for s, c in loss.unit_terms(out[i:i + 1], labels[i:i + 1]):
                sums.append(s)
                counts.append(c)
                if batch.groups is not None:
                    groups.append(int(batch.groups[i]))
        if progress:
            progress(1)
    if not sum(counts):
        raise LLCError(f"{dataset.source}: no loss terms (every label is the ignore index?); "
                       "the data needs labelled samples")
    return LossSamples(np.asarray(sums), np.asarray(counts, dtype=np.float64),
                       np.asarray(groups, dtype=np.int64) if dataset.has_groups else None)


@torch.no_grad()
def measure(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, weight_fns: dict[str, TensorFn] | None = None,
            input_fns: dict[str, TensorFn] | None = None, progress: Progress = None,
            snapshots: list[Snapshots] | None = None, output_fns: dict[str, TensorFn] | None = None) -> LossSamples:
    """Per-sample losses over ``dataset`` with the given hooks applied (forward only). ``snapshots`` (one per
    batch, from :func:`measure_base`) let each run start at the first hooked node."""
    def run_batch(bi, feeds):
        outs, _ = graph.run(feeds, weight_fns=weight_fns, input_fns=input_fns, output_fns=output_fns,
                            outputs=[loss.output], resume=snapshots[bi] if snapshots else None)
        return outs[loss.output]

    return _samples(graph, dataset, loss, run_batch, progress)


@torch.no_grad()
def measure_base(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, at: list[str],
                 max_bytes: int | None = None) -> tuple[LossSamples, list[Snapshots]]:
    """The unhooked :func:`measure`, keeping per batch the values live just before each node of ``at``
    (``TorchGraph.snapshot``, at most ``max_bytes`` per batch): a later measurement that perturbs node k
    then recomputes only from k on. The same numbers as without snapshots, bit for bit."""
    snaps: list[Snapshots] = []

    def run_batch(bi, feeds):
        outs, snap = graph.snapshot(feeds, at, outputs=[loss.output], max_bytes=max_bytes)
        snaps.append(snap)
        return outs[loss.output]

    return _samples(graph, dataset, loss, run_batch), snaps


def measure_loss(graph: TorchGraph, dataset: Dataset, loss: TaskLoss, weight_fns: dict[str, TensorFn] | None = None,
                 input_fns: dict[str, TensorFn] | None = None, progress: Progress = None) -> float:
    """Mean task loss over ``dataset`` with the given hooks applied."""
    return measure(graph, dataset, loss, weight_fns, input_fns, progress).mean
