"""Build a strongly typed TensorRT engine from a compressed ONNX model and compare it with ONNX Runtime.

:func:`build_engine` converts the model (:func:`~.convert.to_tensorrt`), registers the plugins, parses it with
TensorRT's ONNX parser into a *strongly typed* network (every tensor keeps the ONNX type; no precision
flags), adds one optimization profile for dynamic inputs and writes the serialized plan atomically.
:func:`compare_engine` runs the plan and the original ONNX (ONNX Runtime, CPU) on the same held-out batches
and reports both losses, the max / mean absolute difference of the loss output and the engine's latency.
Both need ``tensorrt`` (≥ 10.8, with ``tensorrt.plugin``), ``triton`` and a CUDA build of torch (I/O
buffers); without them they raise one LLCError saying what to install.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from ...atomic import write_bytes_atomic
from ...calib.data import Dataset
from ...calib.losses import LossTotals, TaskLoss
from ...errors import LLCError
from ...model_io import load_model, save_model
from ...ort_eval import Evaluation, OutputDiff, evaluate
from .convert import to_tensorrt
from .plugins import import_tensorrt, register_plugins


@dataclass
class EngineComparison:
    reference: Evaluation     # ONNX Runtime on the ONNX model
    engine: Evaluation        # TensorRT on the plan
    max_abs_diff: float       # over every element of the loss output
    mean_abs_diff: float
    n: int
    latency_ms: float         # median per batch (synchronized), TensorRT


def _torch_cuda():
    import torch

    if not torch.cuda.is_available():
        raise LLCError("TensorRT engine: torch sees no CUDA device (needed for the engine's I/O buffers); run on a "
                       "machine with an NVIDIA GPU and a CUDA build of torch")
    return torch


def _dynamic_inputs(network) -> list:
    return [network.get_input(i) for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)]


def build_engine(onnx_path: str, plan_path: str, *, input_shapes: dict[str, tuple] | None = None,
                 int4: str = "native", workspace_bytes: int | None = None, optimization_level: int = 3) -> dict:
    """Build ``plan_path`` from ``onnx_path``. ``input_shapes``: graph input -> ``(min, opt, max)`` shapes for
    inputs with dynamic dimensions (required when there are any). Returns what was built (plugins, native INT4
    nodes, build seconds, plan bytes)."""
    trt, _ = import_tensorrt()
    register_plugins()
    conv = to_tensorrt(load_model(onnx_path), int4=int4)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.trt.onnx")
        save_model(conv.model, path)
        ok = parser.parse_from_file(path)
    if not ok:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LLCError(f"{onnx_path}: TensorRT's ONNX parser failed ({errs.splitlines()[0] if errs else 'no detail'}); "
                       "check the ops against TensorRT's support matrix")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(optimization_level)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    dyn = _dynamic_inputs(network)
    if dyn:
        missing = [t.name for t in dyn if not input_shapes or t.name not in input_shapes]
        if missing:
            raise LLCError(f"{onnx_path}: inputs {', '.join(missing)} have dynamic dimensions; give "
                           "input_shapes={name: (min, opt, max)} for each")
        profile = builder.create_optimization_profile()
        for t in dyn:
            lo, opt, hi = input_shapes[t.name]
            profile.set_shape(t.name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LLCError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    write_bytes_atomic(plan_path, bytes(plan))
    return {"plugins": dict(conv.plugins), "native_int4": conv.native_int4,
            "seconds": time.perf_counter() - t0, "bytes": os.path.getsize(plan_path)}


class EngineSession:
    """A deserialized plan that runs numpy feeds on the GPU (torch tensors as I/O buffers)."""

    def __init__(self, plan_path: str):
        trt, _ = import_tensorrt()
        register_plugins()
        self.torch = _torch_cuda()
        self.trt = trt
        with open(plan_path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise LLCError(f"{plan_path}: not a TensorRT plan for this TensorRT version / GPU; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _dtype(self, name: str):
        """torch dtype of an I/O tensor (``trt.nptype`` has no bfloat16)."""
        trt, torch = self.trt, self.torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        dt = self.engine.get_tensor_dtype(name)
        if dt not in table:
            raise LLCError(f"TensorRT engine: tensor '{name}' has type {dt}, not supported for I/O here")
        return table[dt]

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Outputs as numpy and the synchronized wall time (s) of the execution."""
        torch = self.torch
        keep = []
        for name in self.inputs:
            if name not in feeds:
                raise LLCError(f"TensorRT engine: input '{name}' missing from the data")
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda().to(self._dtype(name))
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise LLCError("TensorRT engine: execution failed (see the TensorRT log)")
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        return {k: v.float().cpu().numpy() for k, v in outs.items()}, secs


def compare_engine(onnx_path: str, plan_path: str, dataset: Dataset, loss: TaskLoss, *, warmup: int = 1
                   ) -> EngineComparison:
    """Held-out comparison of the plan with ONNX Runtime on the ONNX model (the same batches)."""
    ref = evaluate(onnx_path, dataset, loss)
    sess = EngineSession(plan_path)
    if loss.output not in sess.outputs:
        raise LLCError(f"{plan_path}: output '{loss.output}' is not an engine output ({', '.join(sess.outputs)})")
    from ...ort_eval import make_session

    ort_sess = make_session(onnx_path)
    for _ in range(max(0, warmup)):
        sess.run(dataset.batches[0].inputs)
    totals, times, diff = LossTotals(loss), [], OutputDiff()
    for i, batch in enumerate(dataset.batches):
        labels = loss.batch_labels(batch, f"{dataset.source}[batch {i}]")
        outs, secs = sess.run(batch.inputs)
        times.append(secs)
        y = outs[loss.output]
        diff.add(y, ort_sess.run([loss.output], batch.inputs)[0])
        totals.add(y, labels, batch.size)
    mean, metrics = totals.mean()
    eng = Evaluation(loss=mean, metrics=metrics, n=totals.n, seconds=float(sum(times)))
    return EngineComparison(reference=ref, engine=eng, max_abs_diff=diff.max, mean_abs_diff=diff.mean, n=totals.n,
                            latency_ms=1e3 * statistics.median(times))
