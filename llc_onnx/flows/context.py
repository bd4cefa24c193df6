"""Everything a compression flow works on, loaded once: the prepared model, its compressible nodes, the
interpreter, the task loss, the disjoint calibration / held-out splits and the float model's losses on both.

The calibration split is itself cut, by whole batches, into two disjoint parts:

* ``fit_data``      the gradients that *choose* things (LLC rounding directions, the low-rank α step);
* ``measure_data``  the gradients that *predict* (Σ g·δ) and the per-candidate loss measurements.

A rounding chosen from a gradient always looks good on the samples that gradient came from (its gain is
fitted, in-sample); measured on other samples it shows its real effect, which is what the held-out split will
see. Both parts together are still one pass over the calibration data. With a single calibration batch the two
parts coincide and the report says the measurements are in-sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..calib.data import Dataset, load_dataset, load_split, split_dataset
from ..calib.gradients import GradientPass, collect_gradients
from ..calib.losses import TaskLoss
from ..calib.noise import LossSamples, measure, measure_base
from ..compressible import CompressibleNode, find_compressible
from ..errors import LLCError
from ..interpreter import TorchGraph
from ..model_io import load_model, prepare_model
from ..ort_eval import Evaluation, evaluate
from ..progress import StageTimer


def snapshot_bytes() -> int:
    """Memory for measurement snapshots, all measure batches together: ``LLC_ONNX_SNAPSHOT_BYTES`` or 2 GiB.
    Beyond it snapshots are thinned (measurements then start a little earlier; results are the same)."""
    try:
        return int(os.environ.get("LLC_ONNX_SNAPSHOT_BYTES", 2 << 30))
    except ValueError:
        raise LLCError(f"LLC_ONNX_SNAPSHOT_BYTES={os.environ['LLC_ONNX_SNAPSHOT_BYTES']!r}: "
                       "a number of bytes, e.g. 1000000000") from None


@dataclass
class FlowContext:
    model_path: str
    model: onnx.ModelProto  # prepared (opset, names, shapes); the input file is never touched
    nodes: list[CompressibleNode]
    skipped: list[tuple[str, str]]
    graph: TorchGraph
    loss: TaskLoss
    calib: Dataset
    held: Dataset
    fit_data: Dataset  # calibration batches whose gradients choose roundings / α
    measure_data: Dataset  # disjoint calibration batches: predictions and measured ΔL
    calib_fp: Evaluation
    held_fp: Evaluation
    timer: StageTimer
    _weights: dict[str, np.ndarray] = field(default_factory=dict)
    _base: LossSamples | None = None
    _snapshots: list | None = None  # per measure batch: interpreter.Snapshots of the unmodified run
    _float_bytes: int | None = None  # a later stage keeps the original model's float bytes as its reference

    def base(self) -> LossSamples:
        """Per-sample losses of the unmodified model on ``measure_data`` (interpreter), computed once, with the
        snapshots that let :meth:`measure` recompute only from the perturbed node on."""
        if self._base is None:
            per_batch = snapshot_bytes() // max(1, len(self.measure_data.batches))
            self._base, self._snapshots = measure_base(self.graph, self.measure_data, self.loss,
                                                       [n.name for n in self.nodes], per_batch)
        return self._base

    def measure(self, weight_fns: dict | None = None, input_fns: dict | None = None) -> LossSamples:
        """Per-sample losses on ``measure_data`` with these hooks (``calib.noise.measure``), starting each
        batch at the snapshot before the first hooked node: a candidate near the output costs a fraction of
        a forward pass."""
        self.base()
        return measure(self.graph, self.measure_data, self.loss, weight_fns, input_fns, snapshots=self._snapshots)

    def node(self, name: str) -> CompressibleNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def weight_array(self, node: CompressibleNode) -> np.ndarray:
        """The node's float weight as float64 (ONNX layout), cached."""
        if node.weight not in self._weights:
            self._weights[node.weight] = self.graph.params[node.weight].detach().to(torch.float64).cpu().numpy()
        return self._weights[node.weight]

    def gradients(self, act_candidates=None, progress=None) -> tuple[GradientPass, GradientPass]:
        """(fit, measure) gradient passes over the two calibration parts — one pass over the calibration data
        in all. The measure pass needs only the mean gradient (and the activation-noise predictions); with a
        single calibration batch both are the same pass."""
        in_sample = self.fit_data is self.measure_data
        measure_pass = collect_gradients(self.graph, self.measure_data, self.loss, self.nodes, act_candidates,
                                         progress, magnitudes=in_sample)
        if in_sample:
            return measure_pass, measure_pass
        return collect_gradients(self.graph, self.fit_data, self.loss, self.nodes, None, progress), measure_pass

    def float_bytes(self) -> int:
        """Float32 bytes of the compressible nodes' weights (a shared weight counted once per node); for a
        later stage (``derive_context``) those of the original model, so budgets and reductions stay relative
        to what the user gave."""
        if self._float_bytes is None:
            self._float_bytes = sum(4 * self.weight_array(n).size for n in self.nodes)
        return self._float_bytes

    def measurement_info(self) -> dict:
        """Which calibration batches chose (fit) and which judged (measure), for the report."""
        return {"fit": self.fit_data.source, "measure": self.measure_data.source,
                "fit_samples": self.fit_data.n_samples, "measure_samples": self.measure_data.n_samples,
                "in_sample": self.fit_data is self.measure_data}

    def sweep_point(self, budget: float, model: onnx.ModelProto, nbytes: int) -> dict:
        held = evaluate(model, self.held, self.loss)
        return {"budget": budget, "bytes": nbytes, "held_loss": held.loss, "held_metrics": held.metrics}


def create_context(model_path: str, data: str, loss: TaskLoss | None = None, *, held: str | None = None,
                   holdout: float = 0.5, seed: int = 0, batch_size: int = 64, measure_samples: int | None = None,
                   opset: int = 21, nodes: list[str] | None = None, loss_factory=None) -> FlowContext:
    """Load and prepare everything a flow needs; ``loss_factory(model)`` builds the loss when not given."""
    timer = StageTimer()
    with timer.stage("load"):
        model = prepare_model(load_model(model_path), opset=opset)
        found, skipped = find_compressible(model)
        if nodes:
            unknown = sorted(set(nodes) - {n.name for n in found})
            if unknown:
                raise LLCError(f"{model_path}: --nodes names {unknown[0]!r}, which is not a compressible node; "
                               f"run 'llc-onnx inspect {model_path}' to list them")
            found = [n for n in found if n.name in set(nodes)]
        if not found:
            raise LLCError(f"{model_path}: no compressible node (MatMul/Gemm/Conv with a constant weight); "
                           "nothing to compress")
        _require_float32(model, found, model_path)
        if loss is None:
            loss = loss_factory(model)
        if held is not None:
            calib, held_ds = load_split(data, held, model, batch_size=batch_size)
        else:
            calib, held_ds = split_dataset(load_dataset(data, model, batch_size=batch_size), holdout, seed)
        graph = TorchGraph(model, dtype=torch.float32)
    fit, measure = fit_measure_split(calib, measure_samples, seed)
    with timer.stage("baseline"):
        calib_fp = evaluate(model, calib, loss)
        held_fp = evaluate(model, held_ds, loss)
    return FlowContext(model_path, model, found, skipped, graph, loss, calib, held_ds, fit, measure, calib_fp,
                       held_fp, timer)


def _require_float32(model: onnx.ModelProto, nodes: list[CompressibleNode], path: str) -> None:
    """Sizes, scales and measurements assume float32 weights; say so instead of writing a model whose
    weights differ from the ones measured."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for n in nodes:
        if types.get(n.weight, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            dtype = onnx.TensorProto.DataType.Name(types[n.weight])
            raise LLCError(f"{path}: node '{n.name}' has a {dtype} weight '{n.weight}'; llc-onnx compresses float32 "
                           "models: re-export or convert it to float32 first")


def derive_context(ctx: FlowContext, model: onnx.ModelProto) -> FlowContext:
    """A context for a further stage on ``model`` (e.g. quantizing low-rank factors): same data and loss, and
    the *original* float model's losses as the reference every stage is verified against."""
    found, skipped = find_compressible(model)
    return FlowContext(ctx.model_path, model, found, skipped, TorchGraph(model, dtype=ctx.graph.dtype), ctx.loss,
                       ctx.calib, ctx.held, ctx.fit_data, ctx.measure_data, ctx.calib_fp, ctx.held_fp, StageTimer(),
                       _float_bytes=ctx.float_bytes())


def fit_measure_split(calib: Dataset, measure_samples: int | None = None, seed: int = 0
                      ) -> tuple[Dataset, Dataset]:
    """(fit, measure): whole batches of ``calib`` in a seeded random order go to the measure part — half of
    them, or as many as hold ``measure_samples`` samples — and the rest to the fit part (at least one batch
    each; both keep the source order). A one-batch split gives the same batch to both (in-sample)."""
    batches = calib.batches
    if len(batches) < 2:
        return calib, calib
    order = np.random.default_rng(seed).permutation(len(batches))
    if measure_samples is None:
        k = (len(batches) + 1) // 2
    else:
        k, count = 0, 0
        while k < len(batches) - 1 and count < measure_samples:
            count += batches[order[k]].size
            k += 1
        k = max(k, 1)
    chosen = set(order[:k].tolist())
    measure = Dataset(batches=[b for i, b in enumerate(batches) if i in chosen],
                      source=f"{calib.source} (measure part: {k} of {len(batches)} batches)")
    fit = Dataset(batches=[b for i, b in enumerate(batches) if i not in chosen],
                  source=f"{calib.source} (fit part: {len(batches) - k} of {len(batches)} batches)")
    return fit, measure
