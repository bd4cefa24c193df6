"""Run a compressed ONNX model on a device through the interpreter, the weight-only nodes on the kernels.

:func:`run_model` fuses the series patterns (:mod:`.series`), registers the weight-only interpreter ops
(:mod:`.interpreter_ops`), builds ``TorchGraph(model, device=device)`` and runs every batch of a dataset:
``MatMulNBits`` and ``SeriesMatMulNBits`` nodes go to ``llc_onnx::matmul_nbits`` / ``llc_onnx::series_matmul``
(Triton on CUDA, the torch reference on CPU), everything else to the interpreter's torch ops. It reports the
task loss and metrics (as ``ort_eval.evaluate`` does), the median latency of one batch and the throughput;
the first ``warmup`` passes over the first batch (Triton compile + autotune) are not timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..calib.data import Dataset
from ..calib.losses import LossTotals, TaskLoss
from ..errors import LLCError
from ..interpreter import TorchGraph
from .interpreter_ops import register_interpreter_ops
from .series import SERIES_OP, fuse_series


@dataclass
class DeviceRun:
    """What :func:`run_model` measured."""

    loss: float
    metrics: dict[str, float]
    n: int                          # samples
    device: str
    latency_ms: float               # median wall time of one batch (synchronized), ms
    throughput: float               # samples per second over the timed batches
    seconds: float                  # total timed wall time
    nodes: dict[str, int] = field(default_factory=dict)   # op type -> count of weight-only nodes run
    kernels: dict[str, str] = field(default_factory=dict)  # op type -> what ran it


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, or LLCError when it is CUDA and none is usable."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLCError(f"device '{device}': torch sees no CUDA device (torch {torch.__version__}, "
                       f"CUDA build: {torch.version.cuda or 'no'}); run on a machine with an NVIDIA GPU and a "
                       "CUDA build of torch, or use device 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise LLCError(f"device '{device}': not supported; use 'cpu' or 'cuda'")
    return dev


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model the runner executes (series fused) and the count of weight-only nodes by op type."""
    register_interpreter_ops()
    fused = fuse_series(model)
    counts: dict[str, int] = {}
    for n in fused.graph.node:
        if n.op_type in ("MatMulNBits", SERIES_OP):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return fused, counts


def implementations(dev: torch.device, counts: dict[str, int]) -> dict[str, str]:
    """What runs each weight-only op type on ``dev``: "triton", "torch reference", or the module of another
    interpreter implementation of MatMulNBits (the built-in contrib op, which runs the kernels only once it
    calls :func:`llc_onnx.plugins.triton.dispatch.matmul_nbits`)."""
    from ..interpreter import lookup
    from .interpreter_ops import matmul_nbits_op
    from .series import MS_DOMAIN
    from .triton.ops import triton_available

    ours = "triton" if dev.type == "cuda" and triton_available() else "torch reference"
    out = {}
    for op in counts:
        if op == "MatMulNBits" and lookup(op, MS_DOMAIN, 1) is not matmul_nbits_op:
            out[op] = f"interpreter op {lookup(op, MS_DOMAIN, 1).__module__}"
        else:
            out[op] = ours
    return out


def run_model(model: onnx.ModelProto, dataset: Dataset, loss: TaskLoss, *, device: str = "cuda",
              warmup: int = 1) -> DeviceRun:
    """Loss, metrics, latency and throughput of ``model`` on ``dataset`` executed on ``device``."""
    dev = check_device(device)
    fused, counts = prepare(model)
    graph = TorchGraph(fused, device=dev)
    if loss.output not in graph.output_names:
        listed = ", ".join(repr(o) for o in graph.output_names)
        raise LLCError(f"model: output '{loss.output}' is not a graph output; available outputs: {listed}; "
                       "pick one with --output")
    if not dataset.batches:
        raise LLCError(f"{dataset.source}: no batches to run")
    kernels = implementations(dev, counts)

    def forward(batch):
        feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in batch.inputs.items()}
        with torch.inference_mode():
            out, _ = graph.run(feeds, outputs=[loss.output])
        return out[loss.output]

    for _ in range(max(0, warmup)):
        forward(dataset.batches[0])
    _sync(dev)
    totals, times = LossTotals(loss), []
    for i, batch in enumerate(dataset.batches):
        labels = loss.batch_labels(batch, f"{dataset.source}[batch {i}]")
        t0 = time.perf_counter()
        y = forward(batch)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        totals.add(y.detach().float().cpu().numpy(), labels, batch.size)
    mean, metrics = totals.mean()
    n, secs = totals.n, float(sum(times))
    return DeviceRun(loss=mean, metrics=metrics, n=n, device=str(dev), latency_ms=1e3 * statistics.median(times),
                     throughput=n / secs if secs > 0 else float("inf"), seconds=secs, nodes=counts, kernels=kernels)
