"""Deployment-side API: check a model against a target's rules, run it on a device, build a TensorRT engine.
The CLI commands ``check``, ``run`` and ``engine`` are thin views of :func:`check`, :func:`run` and
:func:`engine` (re-exported by :mod:`llc_onnx.api`); nothing here prints.

* :func:`check` ``target="tensorrt"``: every violation of TensorRT's explicit-quantization rules with the node
  name (:func:`llc_onnx.targets.check_tensorrt`). ``target="ort-cpu"``: how ONNX Runtime's CPU provider runs
  each MatMul/Gemm/Conv (and ``MatMulNBits``) of the model — read from the graph ORT itself optimizes
  (``optimized_model_filepath``), not predicted: the kernel each node ends up in, integer or float, and a
  violation for every node whose weight is stored quantized but that ORT runs in float (a weight-only
  ``DequantizeLinear`` it does not fuse: the weight is dequantized on every run, slower than FP32) and every
  2/8-bit ``MatMulNBits`` at accuracy level 0 (the float path, 15-38× slower than FP32 at batch 1 here).
* :func:`run`: :func:`llc_onnx.plugins.runner.run_model` — loss, metrics, latency, throughput of the model
  executed by the llc-onnx interpreter on ``device`` (on CUDA the weight-only nodes run the Triton kernels;
  on CPU their torch reference: a correctness run, not ONNX Runtime's speed).
* :func:`engine`: :func:`llc_onnx.plugins.tensorrt.engine.build_engine`, then, with data,
  :func:`~llc_onnx.plugins.tensorrt.engine.compare_engine` (loss and max |Δ| against ONNX Runtime).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass, field

import onnx

from .errors import LLCError

__all__ = ["CheckResult", "RunResult", "EngineResult", "check", "run", "engine", "CHECK_TARGETS",
           "INTEGER_OPS"]

CHECK_TARGETS = ("tensorrt", "ort-cpu")

#: ops of ONNX Runtime's optimized CPU graph that compute in integers (or low-bit weights)
INTEGER_OPS = frozenset({
    "QLinearConv", "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QLinearMatMul",
    "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QAttention", "DynamicQuantizeLSTM", "NhwcMaxPool"})
_WEIGHTED = ("Conv", "MatMul", "Gemm", "ConvTranspose")
_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_quant)+$")


@dataclass
class CheckResult:
    """What :func:`check` found: ``violations`` ({node, rule, message}); for ort-cpu also ``nodes`` (how ORT
    runs each weighted node: {node, op_type, weight, kernel, integer}) and ``optimized_ops`` (op type counts
    of ORT's optimized graph)."""

    model: str
    target: str
    violations: list[dict]
    rules: dict[str, str] = field(default_factory=dict)
    nodes: list[dict] = field(default_factory=list)
    optimized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _load(model) -> tuple[onnx.ModelProto, str]:
    from .api import load

    return load(model)


def check(model, *, target: str = "ort-cpu", threads: int = 0) -> CheckResult:
    """Check ``model`` against ``target``'s rules (module doc). ``threads``: ORT intra-op threads of the
    ort-cpu session whose optimized graph is read."""
    if target not in CHECK_TARGETS:
        raise LLCError(f"--target {target}: check knows {', '.join(CHECK_TARGETS)}")
    proto, source = _load(model)
    if target == "tensorrt":
        from .targets.tensorrt import RULES, check_tensorrt

        found = check_tensorrt(proto)
        return CheckResult(source, target, [{"node": v.node, "rule": v.rule, "message": v.message} for v in found],
                           dict(RULES))
    return _check_ort_cpu(proto, source, threads)


ORT_CPU_RULES = {
    "float-dq": "a node whose weight is stored quantized runs in an integer kernel (a DequantizeLinear that ORT "
                "does not fuse dequantizes the weight on every run, in float: slower than FP32)",
    "mnb-level0": "2/8-bit MatMulNBits carries accuracy_level=4 (at level 0 ORT runs the float path, 15-38x "
                  "slower than FP32 at batch 1)",
}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_format(node: onnx.NodeProto, producers: dict, inits: set) -> str:
    if node.op_type == "MatMulNBits":
        return f"MatMulNBits {_attr(node, 'bits', 4)}-bit, accuracy_level {_attr(node, 'accuracy_level', 0)}"
    if node.op_type == "MatMulInteger":
        x = producers.get(node.input[0])
        per_run = x is not None and x.op_type == "DynamicQuantizeLinear"
        return "int8 weight, activations quantized per run (dynamic W8A8)" if per_run else "integer MatMul"
    if len(node.input) < 2:
        return "-"
    w = node.input[1]
    if w in inits:
        return "float"
    p = producers.get(w)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
        x = producers.get(node.input[0])
        act = x is not None and x.op_type == "DequantizeLinear" and x.input[0] not in inits
        return "Q/DQ weight + activation (W8A8)" if act else "Q/DQ weight-only"
    return "computed"


def _check_ort_cpu(proto: onnx.ModelProto, source: str, threads: int) -> CheckResult:
    import collections

    from .targets import get_target

    settings = get_target("ort-cpu").session()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        settings.make_session(proto, intra_op_num_threads=threads, optimized_model_path=path)
        opt = onnx.load(path)
    kernels: dict[str, list[str]] = {}
    for n in opt.graph.node:
        kernels.setdefault(_ORT_SUFFIX.sub("", n.name), []).append(n.op_type)
    inits = {t.name for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes, violations = [], []
    for i, n in enumerate(proto.graph.node):
        if n.op_type not in (*_WEIGHTED, "MatMulNBits", "MatMulInteger"):
            continue
        name = n.name or f"{n.op_type}_{i}"
        fmt = _weight_format(n, producers, inits)
        ran = kernels.get(n.name, [])
        kernel = "/".join(dict.fromkeys(ran)) if ran else "fused into another node"
        integer = any(k in INTEGER_OPS for k in ran)
        if n.op_type == "MatMulNBits":
            bits, level = _attr(n, "bits", 4), _attr(n, "accuracy_level", 0)
            integer = level == 4 or (bits == 4 and level != 0)
            if bits in (2, 8) and level == 0:
                violations.append({"node": name, "rule": "mnb-level0", "message": f"{bits}-bit MatMulNBits at "
                                   "accuracy_level 0 runs ORT's float path; write accuracy_level=4"})
        elif fmt.startswith("Q/DQ") and not integer:
            violations.append({"node": name, "rule": "float-dq",
                               "message": f"{n.op_type} with a {fmt} weight runs as {kernel} (float): the "
                                          "DequantizeLinear is not fused; rewrite it for --target ort-cpu "
                                          "(MatMulNBits or W8A8 with uint8 activations)"})
        nodes.append({"node": name, "op_type": n.op_type, "weight": fmt, "kernel": kernel, "integer": integer})
    ops = dict(sorted(collections.Counter(n.op_type for n in opt.graph.node).items()))
    return CheckResult(source, "ort-cpu", violations, dict(ORT_CPU_RULES), nodes, ops)


# ------------------------------------------------------------------------------------------ run
@dataclass
class RunResult:
    """:class:`llc_onnx.plugins.runner.DeviceRun` as plain data, with what executed it."""

    model: str
    data: str
    loss_kind: str
    output: str
    device: str
    executor: str
    loss: float
    metrics: dict[str, float]
    n_samples: int
    batch_size: int
    latency_ms: float
    throughput: float
    seconds: float
    nodes: dict[str, int]
    kernels: dict[str, str]
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _task_loss(proto: onnx.ModelProto, source: str, loss: str | None, output: str | None):
    from .calib.losses import make_loss
    from .flows.context import _default_loss_kind
    from .ort_eval import resolve_output

    out = resolve_output(proto, output, source)
    kind = loss or _default_loss_kind(proto, out)
    return make_loss(kind, out), kind, out


def run(model, data, *, device: str = "cpu", loss: str | None = None, output: str | None = None,
        batch_size: int = 64, warmup: int = 1) -> RunResult:
    """Run ``model`` on ``data`` on ``device`` through the llc-onnx interpreter (weight-only nodes on the
    Triton kernels on CUDA): loss, metrics, median batch latency, throughput. A CUDA device without a GPU
    is an LLCError."""
    from .calib.data import load_dataset
    from .plugins.runner import check_device, run_model

    dev = check_device(device)                 # before any loading: a missing GPU is said first
    if warmup < 0:
        raise LLCError(f"--warmup {warmup}: must be ≥ 0")
    proto, source = _load(model)
    task, kind, out = _task_loss(proto, source, loss, output)
    ds = load_dataset(data, proto, batch_size=batch_size)
    res = run_model(proto, ds, task, device=str(dev), warmup=warmup)
    if dev.type == "cpu":
        executor = "llc-onnx interpreter (torch, CPU)"
        note = ("ran in the llc-onnx interpreter on CPU, weight-only nodes by their torch reference: a check of "
                "the numbers, not a deployment latency; for ONNX Runtime's CPU latency use 'llc-onnx compare'")
    else:
        executor = "llc-onnx interpreter (torch, CUDA) with the Triton kernels"
        note = ""
    return RunResult(source, getattr(ds, "source", str(data)), kind, out, res.device, executor, res.loss,
                     dict(res.metrics), res.n, ds.batches[0].size if ds.batches else 0, res.latency_ms,
                     res.throughput, res.seconds, dict(res.nodes), dict(res.kernels), note)


# ------------------------------------------------------------------------------------------ engine
@dataclass
class EngineResult:
    model: str
    plan: str
    built: dict                       # build_engine's summary (plugins, native INT4 nodes, seconds, bytes)
    comparison: dict | None = None    # compare_engine on the data: losses, max/mean |Δ|, latency

    def to_dict(self) -> dict:
        return asdict(self)


def _profile(proto: onnx.ModelProto, ds) -> dict[str, tuple]:
    """(min, opt, max) shapes of the inputs with dynamic dims: the data's first batch as opt and max, its
    dynamic dims at 1 as min."""
    from .calib.data import model_inputs

    out = {}
    first = ds.batches[0].inputs
    for spec in model_inputs(proto):
        shape = getattr(spec, "shape", None)
        if shape is None or spec.name not in first:
            continue
        full = tuple(int(x) for x in first[spec.name].shape)
        if all(isinstance(d, int) and d > 0 for d in shape):
            continue
        lo = tuple(1 if not (isinstance(d, int) and d > 0) else int(d) for d in shape)
        out[spec.name] = (lo, full, full)
    return out


def engine(model: str, plan: str, *, data=None, loss: str | None = None, output: str | None = None,
           batch_size: int = 64, int4: str = "native") -> EngineResult:
    """Build the TensorRT plan ``plan`` from the ONNX file ``model`` and, with ``data``, compare it with ONNX
    Runtime. Raises an LLCError saying what to install when TensorRT (with ``tensorrt.plugin``) is missing."""
    from .plugins.tensorrt.plugins import import_tensorrt

    if not isinstance(model, (str, os.PathLike)):
        raise LLCError("engine: give the model as a file path (TensorRT's parser reads the file)")
    model = os.fspath(model)
    if not os.path.isfile(model):
        raise LLCError(f"{model}: no such file; give the path of the .onnx model")
    plan = os.fspath(plan)
    if os.path.abspath(plan) == os.path.abspath(model):
        raise LLCError(f"-o {plan}: would overwrite the model; choose another path for the plan")
    if not os.path.isdir(os.path.dirname(os.path.abspath(plan))):
        raise LLCError(f"-o {plan}: directory '{os.path.dirname(os.path.abspath(plan))}' does not exist")
    if int4 not in ("native", "plugin"):
        raise LLCError(f"--int4 {int4}: use native (TensorRT's INT4 weight-only GEMM) or plugin")
    import_tensorrt()                           # one line saying what to install, before any work
    from .plugins.tensorrt.engine import build_engine, compare_engine

    proto, source = _load(model)
    ds = task = None
    if data is not None:
        from .calib.data import load_dataset

        task, _, _ = _task_loss(proto, source, loss, output)
        ds = load_dataset(data, proto, batch_size=batch_size)
    shapes = _profile(proto, ds) if ds is not None else None
    built = build_engine(model, plan, input_shapes=shapes, int4=int4)
    comparison = None
    if ds is not None:
        c = compare_engine(model, plan, ds, task)
        comparison = {"n_samples": c.n, "output": task.output, "loss_kind": task.name,
                      "onnxruntime": {"loss": c.reference.loss, "metrics": dict(c.reference.metrics)},
                      "tensorrt": {"loss": c.engine.loss, "metrics": dict(c.engine.metrics)},
                      "max_abs_diff": c.max_abs_diff, "mean_abs_diff": c.mean_abs_diff, "latency_ms": c.latency_ms}
    return EngineResult(source, plan, built, comparison)
