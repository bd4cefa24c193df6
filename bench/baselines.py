"""Baseline compressors the benchmark compares llc-onnx with, on the same splits and size accounting.

ONNX Runtime's own quantizers (what a user of ONNX Runtime gets, written by ONNX Runtime):

* :func:`ort_int8`   ``quantize_static``: QDQ, per-channel symmetric INT8 weights, INT8 activations (MinMax
  calibration over the calibration split).
* :func:`ort_weight_only`  ``matmul_nbits_quantizer`` on the MatMul nodes with a constant weight (Conv / Gemm
  are not covered by it): ``default`` (affine blocks, symmetric or not), ``rtn``, ``gptq`` (ONNX Runtime's
  copy of Intel Neural Compressor's; on its calibration reader) and ``hqq`` (float zero points), 4-bit at a
  block size, the MatMulNBits nodes written with ``accuracy_level`` 4 — the level at which ONNX Runtime's CPU
  runs them fast, as llc-onnx's ``ort-cpu`` target does.

Mixed-precision allocations (:func:`allocation`): the *same* formats the target offers llc-onnx, the same
quantizers (nearest rounding: neither method has LLC rounding), the same grouped knapsack
(``flows.quantize.Solver``) at the same byte budget, the same rewrite, and the **same validation back-off**
(``verify.select_plan`` on the same validation split, with the same alternative uniform plans, margin and
rounds). Only the per-candidate cost differs:

* HAWQ-V2 (:func:`hawq_traces`, :func:`hawq_costs`): cost of format f of node i = ½·tr(H_ii)/n_i·‖δ_if‖², the
  average Hessian eigenvalue times the weight-noise energy. tr(H_ii) by Hutchinson's estimator
  (``solvers.hessian.hutchinson_trace``: Rademacher probes, one over all nodes per sample as HAWQ-V2, or one
  per node where the model has few nodes; or ``deflated_trace``: per node, a Lanczos basis counted exactly and
  deflated probes for the rest, the same unbiased trace at a far lower variance) in rounds of probes
  until every node's standard error is ≤ ``rel_se`` of its trace or ``max_probes`` is reached; a trace below
  its standard error then is **clamped** to it (a curvature that cannot be told from zero counts as one
  standard error, whatever the sign of its estimate: never free, and a noisy small positive estimate is not
  cheaper than a noisy negative one). Weight noise only: activation quantizers are not seen.
  Where H_ii is indefinite at the trained weights (MiniLM: traces near 0 against their spread, some clearly
  negative) no number of probes gives a stable positive trace, and HAWQ-V2's premise — a positive-definite
  block at a minimum — fails. :func:`gauss_newton_traces` then gives the same cost with tr(GGN_ii), the
  Gauss-Newton part of H_ii (PSD; what HAWQ's analysis assumes of H near a minimum), estimated with labels
  drawn from the model (``calib.fisher.fisher_traces``: one forward and backward per batch for every node,
  each sample's ‖∇_W ℓ_s‖² ≥ 0, standard error over samples or ``groups`` clusters) — the trace FIT (Zandonati
  et al., 2023) uses with the data's labels.
* AutoQuantize (:func:`autoquant_scores`), NVIDIA ModelOpt's gradient score in output space: for node i and
  format f, score = Σ_batches Σ_elements (∂L_b/∂y_i)² · (y_i,f − y_i)², L_b the mean loss of batch b, y_i the
  node's float output and y_i,f its output with the format's weight *and* activation quantizers (the hooks
  the written node applies), on the float model's own input to the node — a Fisher (squared-gradient)
  approximation of the second-order loss change. As ModelOpt, a format never scores worse than a smaller one
  of the same node (score_f ← min(score_f, score of the next smaller)).

:func:`uniform_svd` is plain truncated SVD with one rank fraction for every node, the largest whose total
parameter count does not exceed a target (the llc compact low-rank result).

Sizes: :func:`weight_bytes` counts, in any produced model, the bytes of the constant weights of MatMul / Gemm /
Conv / MatMulNBits nodes, through DequantizeLinear (quantized values packed at their bit width + scales + zero
points when stored). Biases are not counted (llc's reports do not count them either).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from llc_onnx.model_io import tensor_nbytes

WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "MatMulNBits": 1, "MatMulInteger": 1, "ConvInteger": 1}


class NotApplicable(Exception):
    """The method does not apply to this model (the row says why)."""


# ----------------------------------------------------------------------------------------- sizes
def weight_bytes(model: onnx.ModelProto) -> tuple[int, int]:
    """(bytes, number of weight-bearing nodes): constant weights of MatMul/Gemm/Conv (through
    DequantizeLinear and layout ops) and MatMulNBits (B + scales + zero points)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:  # Constant nodes count like initializers
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits.setdefault(n.output[0], n.attribute[0].t)

    def const_bytes(name: str, depth: int = 0) -> int | None:
        if name in inits:
            return tensor_nbytes(inits[name])
        p = producers.get(name)
        if p is None or depth > 4:
            return None
        if p.op_type == "DequantizeLinear":
            parts = [const_bytes(i, depth + 1) for i in p.input if i]
            return None if any(x is None for x in parts) else sum(parts)
        if p.op_type in ("Transpose", "Reshape", "Identity", "Cast"):
            return const_bytes(p.input[0], depth + 1)
        return None

    total, count = 0, 0
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        if n.op_type in ("MatMulInteger", "ConvInteger"):
            # quantize_dynamic's operator form: int8 weight W_quantized, its zero point (input 3) and the
            # per-channel scale W_scale that a Mul after the node applies
            w = n.input[1]
            if w not in inits:
                continue
            b = tensor_nbytes(inits[w]) + (tensor_nbytes(inits[n.input[3]]) if len(n.input) > 3 and
                                           n.input[3] in inits else 0)
            scale = w.removesuffix("_quantized") + "_scale"
            b += tensor_nbytes(inits[scale]) if w.endswith("_quantized") and scale in inits else 0
        elif n.op_type == "MatMulNBits":
            b = sum(tensor_nbytes(inits[i]) for i in n.input[1:4] if i and i in inits and i != n.input[0])
        else:
            b = const_bytes(n.input[1])
            if b is None:
                continue
        total += b
        count += 1
    return total, count


# ---------------------------------------------------------------------------------------- ORT INT8
class NpzReader:
    """onnxruntime ``CalibrationDataReader`` over the batches of a :class:`llc_onnx.calib.data.Dataset`."""

    def __init__(self, dataset):
        self._batches = [dict(b.inputs) for b in dataset.batches]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return iter(self._batches)

    def __deepcopy__(self, memo):
        return NpzReader.__new__(NpzReader)._init_from(self._batches)

    def _init_from(self, batches):
        self._batches = batches
        self._it = iter(batches)
        return self


def ort_int8(model_path: str, calib_dataset, out_path: str) -> dict:
    """quantize_static: QDQ, per-channel symmetric int8 weights, int8 activations, MinMax."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    info = {}
    with tempfile.TemporaryDirectory() as d:
        pre = os.path.join(d, "pre.onnx")
        big = os.path.getsize(model_path) > 1_500_000_000
        try:
            quant_pre_process(model_path, pre, save_as_external_data=big)
            src = pre
            info["pre_process"] = "quant_pre_process"
        except Exception as exc:  # shape inference can fail on exported LMs; quantize the model as is
            src = model_path
            info["pre_process"] = f"skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        quantize_static(src, out_path, NpzReader(calib_dataset), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                        extra_options={"WeightSymmetric": True})
    return info


def ort_int8_dynamic(model_path: str, out_path: str) -> dict:
    """quantize_dynamic: MatMulInteger with per-channel symmetric int8 weights, activations quantized at run
    time (DynamicQuantizeLinear, one uint8 scale per tensor per run) — ONNX Runtime's recommendation for
    transformer models, where static activation ranges clip the outliers. ONNX Runtime writes it in operator
    form (no QDQ variant exists for dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    big = os.path.getsize(model_path) > 1_500_000_000
    quantize_dynamic(model_path, out_path, weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=big)
    return {"weight_type": "int8", "per_channel": True}


# ------------------------------------------------------------------------------- ORT weight-only 4-bit
ORT_WEIGHT_ONLY = ("default", "rtn", "gptq", "hqq")


def matmul_weight_nodes(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def ort_weight_only(model_path: str, out_path: str, algo: str = "default", block_size: int = 32,
                    symmetric: bool = True, calib_dataset=None, accuracy_level: int | None = 4) -> dict:
    """ONNX Runtime's ``MatMulNBitsQuantizer`` with algorithm ``algo`` (module doc), 4-bit, ``block_size``.
    Returns {"covered": [...], "total_matmul": k, "algo": ...}; NotApplicable without a constant-weight MatMul.
    ``accuracy_level`` is written on every MatMulNBits node (None: left as ONNX Runtime writes it)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    model = onnx.load(model_path)
    mm = matmul_weight_nodes(model)
    if not mm:
        raise NotApplicable("no MatMul with a constant weight (ONNX Runtime's weight-only quantizers rewrite "
                            "MatMul nodes only; Conv/Gemm stay float)")
    if algo == "default":
        cfg = mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=4,
                                              accuracy_level=accuracy_level)
    elif algo == "rtn":
        cfg = mq.RTNWeightOnlyQuantConfig()
    elif algo == "gptq":
        if calib_dataset is None:
            raise ValueError("gptq needs calib_dataset")
        cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=NpzReader(calib_dataset))
    elif algo == "hqq":
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    else:
        raise ValueError(f"unknown ONNX Runtime weight-only algorithm {algo!r}; one of {ORT_WEIGHT_ONLY}")
    q = mq.MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                accuracy_level=accuracy_level, algo_config=cfg)
    try:
        q.process()
    except Exception as exc:  # e.g. 1.31's asymmetric GPTQ/RTN with an odd number of blocks per column
        raise RuntimeError(f"ONNX Runtime's {algo} quantizer failed: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}") from None
    out = q.model.model if hasattr(q.model, "model") else q.model
    covered = [n.name for n in out.graph.node if n.op_type == "MatMulNBits"]
    if covered and not any(o.domain == "com.microsoft" for o in out.opset_import):
        # 1.31's RTN quantizer writes MatMulNBits without importing its domain (a model onnx.checker refuses;
        # ONNX Runtime itself loads it): add the import, as its other quantizers do
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    if accuracy_level is not None:
        for n in out.graph.node:
            if n.op_type == "MatMulNBits":
                kept = [a for a in n.attribute if a.name != "accuracy_level"]
                del n.attribute[:]
                n.attribute.extend(kept)
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", int(accuracy_level)))
    big = out.ByteSize() > 1_500_000_000
    onnx.save(out, out_path, save_as_external_data=big)
    return {"covered": covered, "total_matmul": len(mm), "algo": algo, "block_size": block_size,
            "symmetric": symmetric if algo in ("default", "rtn", "gptq") else False,
            "accuracy_level": accuracy_level}


# ------------------------------------------------------------------------------------ allocation setup
def baseline_context(model_path: str, calib: str, test: str, *, batch_size: int, measure_samples: int | None,
                     target: str, budget: float = 0.25, threads: int = 0):
    """The ``FlowContext`` ``llc-onnx optimize <model> --data calib --held test --target T`` builds, with
    nearest rounding: the same calibration / validation / test splits (same seeds), the same target, formats
    and verdict session. ``budget`` only marks the context as a budget run (no lossless node bound)."""
    from llc_onnx.config import DataConfig, DeviceConfig, OptimizeConfig, QuantConfig, TargetConfig
    from llc_onnx.flows.context import create_context
    from llc_onnx.model_io import load_model

    config = OptimizeConfig(data=DataConfig(batch_size=batch_size, measure_samples=measure_samples),
                            quant=QuantConfig(rounding="nearest", budget=budget),
                            target=TargetConfig(name=target, measure_latency=False),
                            device=DeviceConfig(threads=threads))
    return create_context(load_model(model_path), calib, config, source=model_path, held=test)


@dataclass
class Quantized:
    """Every offered (node, format) quantized with nearest rounding (the codes the rewrite writes), with
    ‖δ‖² and the byte count the solver uses."""

    formats: object  # flows.quantize.Formats
    weights: dict = field(default_factory=dict)  # (node, format name) -> compact QuantizedWeight
    delta_sq: dict = field(default_factory=dict)  # (node, format name) -> ‖δ‖²
    nbytes: dict = field(default_factory=dict)  # (node, format name) -> bytes
    rel_noise: dict = field(default_factory=dict)  # (node, format name) -> ‖δ‖/‖W‖
    seconds: float = 0.0


def quantize_all(ctx) -> Quantized:
    """Stage 0 of the allocation baselines: the target's formats and every candidate's quantized weight."""
    from llc_onnx.flows.quantize import offered_formats

    t0 = time.perf_counter()
    formats = offered_formats(ctx)
    out = Quantized(formats)
    cfg = ctx.config.quant
    for node in ctx.nodes:
        w = ctx.weight_array(node)
        wn = float(np.linalg.norm(w)) or 1.0
        for fmt in formats.offers[node.name].formats:
            key = (node.name, fmt.name)
            if fmt.kind == "float":
                out.delta_sq[key], out.nbytes[key], out.rel_noise[key] = 0.0, 4 * w.size, 0.0
                continue
            qw = nearest(w, node, fmt, cfg.scale)
            delta = qw.dequant.astype(np.float64) - w
            d2 = float((delta * delta).sum())
            nbytes = int(fmt.nbytes(node))
            if fmt.kind == "qdq" and fmt.bits == 2 and fmt.activations == "int8" and node.op_type == "MatMul":
                nbytes += -(-w.size // 4)  # as flows.quantize.measure_candidate: stored as INT4 there
            out.weights[key] = dataclasses.replace(qw, q=qw.q.astype(np.int8 if qw.bits <= 8 else np.int16),
                                                   dequant=None)
            out.delta_sq[key], out.nbytes[key], out.rel_noise[key] = d2, nbytes, math.sqrt(d2) / wn
    out.seconds = time.perf_counter() - t0
    return out


def nearest(w: np.ndarray, node, fmt, scale_method: str = "mse"):
    """``node``'s weight in ``fmt``'s layout and scales (as ``flows.roundings.Rounder.spec``), nearest rounding."""
    from llc_onnx.quant import WeightQuantSpec, quantize_weight

    spec = WeightQuantSpec(bits=int(fmt.code_bits or fmt.bits), block_size=fmt.block_size, scale_method=scale_method,
                           rounding="nearest")
    return quantize_weight(w, spec, node.out_axis, node.reduce_axis)


def dequant(qw, shape) -> np.ndarray:
    """q · scale (float32, as ``quantize_weight`` computes ``dequant``) in the weight's ``shape``: per channel
    along ``axis``, or blocked along ``axis`` (also the ``[O, R]`` matrix layout of a blocked Conv)."""
    q = np.asarray(qw.q, dtype=np.float32)
    s = np.asarray(qw.scale, dtype=np.float32)
    if qw.block_size is None:
        bshape = [1] * q.ndim
        bshape[qw.axis] = -1
        return (q * s.reshape(bshape)).reshape(shape)
    s = np.repeat(s, qw.block_size, axis=qw.axis)
    s = np.take(s, np.arange(q.shape[qw.axis]), axis=qw.axis)
    return (q * s).reshape(shape)


# ------------------------------------------------------------------------------------------ HAWQ-V2
def hawq_traces(ctx, *, probes: int = 16, max_probes: int = 128, rel_se: float = 0.1, max_batches: int | None = 1,
                seed: int = 0, per_node: bool = False, deflate: int = 0) -> dict[str, dict]:
    """Per-node Hutchinson trace of the calibration loss in rounds of ``probes`` probes (round r uses seed
    ``seed + r``) until every node's pooled standard error is ≤ ``rel_se`` × |trace| or ``max_probes`` probes
    were used. Per node: {"trace", "se", "probes", "sensitivity", "clamped", "stable"}: ``sensitivity`` = trace,
    or its standard error where the trace is ≤ 0 (module doc; never a non-positive sensitivity). ``per_node``: a
    separate probe per node (no cross terms: a far lower variance for m second backward passes per probe —
    the cheaper way to a stable trace on models with few nodes; measured on the Fashion-MNIST CNN, 16 probes:
    relative SE 8–22 % per node against 12–180 % with joint probes, at 3× the time). ``deflate`` = k > 0: per
    node, the trace of the k-step Lanczos basis exactly and the rest by deflated probes
    (``solvers.hessian.deflated_trace``, Hutch++'s idea; rounds per node, each node stops at its own target) —
    the same unbiased tr(H_ii), with the top of the spectrum no longer in the variance."""
    from llc_onnx.solvers.hessian import deflated_trace, hutchinson_trace

    if deflate:
        t0, passes = time.perf_counter(), [0]

        def progress(k: int) -> None:      # a pass over every running node takes minutes on a large model
            passes[0] += k
            print(f"[hawq] trace pass {passes[0]} ({deflate} Lanczos, then rounds of {probes} probes): "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

        est = deflated_trace(ctx.graph, ctx.calib, ctx.loss, ctx.nodes, steps=deflate, probes=probes,
                             max_probes=max_probes, rel_se=rel_se, seed=seed, max_batches=max_batches,
                             keep_graphs=True, progress=progress)
        out = sensitivities({n: (e.trace, e.se) for n, e in est.items()}, {n: e.probes for n, e in est.items()},
                            rel_se)
        for n, e in est.items():
            out[n].update(steps=e.steps, krylov=e.krylov, exact=e.exact)
        return out
    rounds: list[dict[str, tuple[float, float]]] = []
    while True:
        rounds.append(hutchinson_trace(ctx.graph, ctx.calib, ctx.loss, ctx.nodes, n_samples=probes,
                                       seed=seed + len(rounds), max_batches=max_batches, per_node=per_node))
        pooled = {n: (float(np.mean([r[n][0] for r in rounds])),
                      float(math.sqrt(sum(r[n][1] ** 2 for r in rounds)) / len(rounds))) for n in rounds[0]}
        stable = all(se <= rel_se * abs(tr) for tr, se in pooled.values())
        if stable or (len(rounds) + 1) * probes > max_probes:
            break
    return sensitivities(pooled, len(rounds) * probes, rel_se)


def gauss_newton_traces(ctx, *, max_batches: int | None = None, draws: int = 1, rel_se: float = 0.1,
                        seed: int = 0) -> dict[str, dict]:
    """Per node tr(GGN_ii) of the calibration loss (module doc) over the first ``max_batches`` calibration
    batches (None: all), each sample's squared gradient norm averaged over ``draws`` label draws, as
    :func:`sensitivities` reads it ("probes" = the independent units: samples, or clusters of the data's
    ``groups``); a trace is 0 only where the loss cannot see the node."""
    from llc_onnx.calib.data import Dataset
    from llc_onnx.calib.fisher import fisher_traces

    used = ctx.calib.batches if max_batches is None else ctx.calib.batches[:max_batches]
    t0 = time.perf_counter()
    got = fisher_traces(ctx.model, ctx.graph, Dataset(used, ctx.calib.source), ctx.loss, ctx.nodes, seed=seed,
                        draws=draws)
    print(f"[hawq] Gauss-Newton traces of {len(got)} nodes from {sum(b.size for b in used)} samples × {draws} "
          f"label draws: {time.perf_counter() - t0:.0f} s", flush=True)
    out = sensitivities({n: (t.trace, t.se) for n, t in got.items()}, {n: t.samples for n, t in got.items()},
                        rel_se)
    for n, t in got.items():
        out[n].update(curvature="gauss-newton", sampled=t.sampled, draws=t.draws)
    return out


def sensitivities(pooled: dict[str, tuple[float, float]], probes, rel_se: float = 0.1) -> dict[str, dict]:
    """node -> {"trace", "se", "probes", "sensitivity", "clamped", "stable"} from pooled (trace, SE) and the
    probes used (one count, or node -> count): the sensitivity is max(trace, SE) (at least 1e-12 × the largest
    trace) — a trace that cannot be told from zero counts as one standard error, whether its estimate came out
    positive or not, so no node's noise is free, and a noisy small positive estimate is not cheaper than a noisy
    negative one. ``clamped``: the SE was used (trace < SE). A stable trace (SE ≤ ``rel_se`` × trace) is used
    as is."""
    positive = [tr for tr, _ in pooled.values() if tr > 0]
    floor = 1e-12 * max(positive) if positive else 1e-12
    out = {}
    for n, (tr, se) in pooled.items():
        clamped = tr < se or tr <= 0
        out[n] = {"trace": tr, "se": se, "probes": probes[n] if isinstance(probes, dict) else probes,
                  "sensitivity": max(se, floor) if clamped else tr, "clamped": clamped,
                  "stable": se <= rel_se * abs(tr)}
    return out


def hawq_costs(quantized: Quantized, traces: dict[str, dict], numel: dict[str, int]) -> dict[tuple, float]:
    """HAWQ-V2: cost(i, f) = ½ · sensitivity_i / n_i · ‖δ_if‖²."""
    return {(n, f): 0.5 * traces[n]["sensitivity"] / numel[n] * d2 for (n, f), d2 in quantized.delta_sq.items()}


# ------------------------------------------------------------------------------------- AutoQuantize
def unit_model(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """The one-node model of compressible node ``node_name``: its activation input as the graph input, its
    constant inputs (initializers, Constant nodes) kept, its first output as the graph output."""
    from onnx import helper

    nodes = {n.name: n for n in model.graph.node}
    n = nodes[node_name]
    inits = {t.name: t for t in model.graph.initializer}
    consts = {o: c for c in model.graph.node if c.op_type == "Constant" for o in c.output}
    keep_inits, keep_nodes, x = [], [], None
    for i in n.input:
        if not i:
            continue
        if i in inits:
            keep_inits.append(inits[i])
        elif i in consts:
            keep_nodes.append(consts[i])
        elif x is None:
            x = i
    g = helper.make_graph([*keep_nodes, n], f"unit_{node_name}",
                          [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)], keep_inits)
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def autoquant_scores(ctx, quantized: Quantized, *, max_batches: int | None = None) -> dict[tuple, float]:
    """ModelOpt AutoQuantize's gradient score of every (node, format) (module doc), on the first
    ``max_batches`` calibration batches. Two passes per batch: forward + backward for ∂L_b/∂y of every
    node (a zero tensor added to each node's output carries the gradient), then a forward in which each node's
    input is fed to its one-node model with the format's hooks to get y_f − y."""
    from llc_onnx.calib.gradients import _feeds, _labels
    from llc_onnx.calib.noise import constant
    from llc_onnx.interpreter import TorchGraph
    from llc_onnx.targets.base import input_hook, output_hook

    graph, loss, nodes = ctx.graph, ctx.loss, ctx.nodes
    formats = quantized.formats
    ctx.restore_weights()  # the one-node models take their weights from the model (a large one's are held)
    units = {n.name: TorchGraph(unit_model(ctx.model, n.name), dtype=graph.dtype, device=graph.device) for n in nodes}
    unit_in = {n.name: units[n.name].input_names[0] for n in nodes}
    unit_out = {n.name: units[n.name].output_names[0] for n in nodes}
    plans = {}  # (node, format) -> (weight shape, input hook, output hook); weights dequantized when used
    for n in nodes:
        shape = ctx.weight_array(n).shape
        for fmt in formats.offers[n.name].formats:
            if fmt.kind == "float":
                continue
            plan = formats.plan(n.name, fmt)
            plans[(n.name, fmt.name)] = (shape, input_hook(plan), output_hook(plan))
    scores = {k: 0.0 for k in plans}
    batches = ctx.calib.batches if max_batches is None else ctx.calib.batches[:max_batches]
    for batch in batches:
        zs: dict[str, torch.Tensor] = {}

        def tap(name):
            def f(y):
                z = torch.zeros_like(y, requires_grad=True)
                zs[name] = z
                return y + z
            return f

        with torch.enable_grad():
            outs, _ = graph.run(_feeds(graph, batch, False), output_fns={n.name: tap(n.name) for n in nodes},
                                outputs=[loss.output])
            s, count = loss.terms(outs[loss.output], _labels(batch, loss, graph.device))
            names = [n.name for n in nodes if n.name in zs]
            grads = torch.autograd.grad(s / max(int(count), 1), [zs[k] for k in names], allow_unused=True)
        g2 = {k: (None if g is None else (g.detach().to(torch.float64) ** 2)) for k, g in zip(names, grads)}
        del outs, zs, grads
        xs: dict[str, torch.Tensor] = {}

        def keep_x(name):
            def f(x):
                xs[name] = x
                return x
            return f

        def score(name):
            def f(y):
                x, gg = xs.pop(name), g2.get(name)
                if gg is None:
                    return y
                for fmt in formats.offers[name].formats:
                    key = (name, fmt.name)
                    if key not in plans:
                        continue
                    shape, ih, oh = plans[key]
                    w = torch.as_tensor(dequant(quantized.weights[key], shape), dtype=graph.dtype, device=graph.device)
                    res, _ = units[name].run({unit_in[name]: x}, weight_fns={name: constant(w)},
                                             input_fns={name: ih} if ih else None,
                                             output_fns={name: oh} if oh else None, outputs=[unit_out[name]])
                    d = res[unit_out[name]].to(torch.float64) - y.to(torch.float64)
                    scores[key] += float((gg * d * d).sum())
                return y
            return f

        with torch.no_grad():
            graph.run(_feeds(graph, batch, False), input_fns={n.name: keep_x(n.name) for n in nodes},
                      output_fns={n.name: score(n.name) for n in nodes}, outputs=[loss.output])
    return scores


# ------------------------------------------------------------------------------- allocation + selection
def monotone(costs: dict[tuple, float], quantized: Quantized, nodes) -> dict[tuple, float]:
    """ModelOpt's rule: walking a node's formats from fewest bits up, a format never costs more than the one
    below it (cost ← min(cost, cost below)); float costs 0."""
    from llc_onnx.flows.quantize import format_bits

    out = dict(costs)
    for n in nodes:
        fmts = sorted(quantized.formats.offers[n.name].formats,
                      key=lambda f: (f.kind == "float", format_bits(f), quantized.nbytes[(n.name, f.name)]))
        prev = math.inf
        for f in fmts:
            k = (n.name, f.name)
            out[k] = 0.0 if f.kind == "float" else min(out[k], prev)
            prev = out[k]
    return out


@dataclass
class Allocation:
    model: onnx.ModelProto
    levels: dict[str, str]  # node -> chosen format name
    selection: object  # verify.Selection
    budget_bytes: int
    solver_plan: dict[str, str]  # node -> format of the solver's (first) plan
    seconds: float


def allocation(ctx, quantized: Quantized, costs: dict[tuple, float], budget: float, name: str) -> Allocation:
    """The knapsack at ``budget`` × float bytes over ``costs`` (flows.quantize.Solver: same ladders, same
    dominance rule), then ``verify.select_plan`` on the validation split with the solver's plan first and the
    uniform plans after it — the selection llc-onnx's quantization flow runs (module doc)."""
    from llc_onnx.flows.quantize import Solver
    from llc_onnx.solvers.cost_model import Candidate, CostTable
    from llc_onnx.verify import select_plan

    t0 = time.perf_counter()
    cands = []
    for n in ctx.nodes:
        for fmt in quantized.formats.offers[n.name].formats:
            k = (n.name, fmt.name)
            c = float(costs[k])
            cands.append(Candidate(n.name, fmt.name, quantized.nbytes[k], c, None, quantized.rel_noise[k], True, c,
                                   reference=fmt.kind == "float"))
    table = CostTable.from_candidates(cands)
    solver = Solver(ctx, table, quantized.formats)
    budget_bytes = int(budget * ctx.float_bytes())
    primary = solver.solve(budget_bytes, 1.0)
    plans = [(name, primary)] + solver.uniform_plans(ctx.config.quant.levels())
    ladders = solver.ladders

    def build(choice: dict[str, int]) -> onnx.ModelProto:
        node_plans = {}
        for n, i in choice.items():
            cand = ladders[n][i]
            fmt = quantized.formats.by_level[(n, cand.level)]
            node_plans[n] = quantized.formats.plan(n, fmt, quantized.weights.get((n, cand.level)))
        return ctx.target.rewrite(ctx.model, node_plans).model

    crit = ctx.config.criterion
    ctx.restore_weights()  # the plans are written from the model's weights (a large model's are held until here)
    sel = select_plan(build, ladders, plans, lambda m: ctx.evaluate(m, ctx.val, samples=True), ctx.val_fp,
                      crit.verdict_tolerance(ctx.objective), crit.max_rounds, budget_bytes, None, crit.margin_z)
    return Allocation(sel.model, {n: ladders[n][i].level for n, i in sel.choice.items()}, sel, budget_bytes,
                      {n: ladders[n][i].level for n, i in primary.items()}, time.perf_counter() - t0)


def selection_summary(sel) -> dict:
    """What a row reports of a selection: back-off rounds, whether the solver's plan passed, the plan kept,
    and every plan measured on the validation split."""
    return {"backoff_rounds": sum(t.name.startswith("back-off") for t in sel.trials),
            "first_plan_passed": bool(sel.first_plan_passed), "chosen_plan": sel.trial.name,
            "plans": [t.to_dict() for t in sel.trials]}


# -------------------------------------------------------------------------------------- uniform SVD
def svd_rank(k: int, n: int, frac: float) -> int | None:
    """Rank of fraction ``frac`` of min(K, N) (at least 1); None when it saves no parameters."""
    r = max(1, int(math.floor(frac * min(k, n))))
    return r if r * (k + n) < k * n else None


def svd_params(shapes: dict[str, tuple[int, int]], frac: float) -> tuple[int, dict[str, int | None]]:
    total, ranks = 0, {}
    for name, (k, n) in shapes.items():
        r = svd_rank(k, n, frac)
        ranks[name] = r
        total += k * n if r is None else r * (k + n)
    return total, ranks


def match_uniform_fraction(shapes: dict[str, tuple[int, int]], target_params: int, steps: int = 4000
                           ) -> tuple[float, int, dict[str, int | None]] | None:
    """The largest uniform rank fraction whose total parameters (factored nodes r·(K+N), the others K·N)
    are ≤ ``target_params``: (fraction, params, ranks), or None when even rank 1 everywhere is too big."""
    best = None
    for i in range(1, steps + 1):
        f = i / steps
        p, ranks = svd_params(shapes, f)
        if p <= target_params and (best is None or p >= best[1]):
            best = (f, p, ranks)
    return best


def uniform_svd(model: onnx.ModelProto, nodes, weights: dict[str, np.ndarray], ranks: dict[str, int | None]
                ) -> onnx.ModelProto:
    """Plain truncated-SVD factors (singular values split evenly) at ``ranks``, via llc's low-rank pass."""
    from llc_onnx.passes.lowrank import apply_lowrank
    from llc_onnx.solvers.rank_search import matrix_view

    factors = {}
    for node in nodes:
        r = ranks.get(node.name)
        if r is None:
            continue
        m = matrix_view(np.asarray(weights[node.name], dtype=np.float64), node)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        root = np.sqrt(s[:r])
        factors[node.name] = ((u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32))
    return apply_lowrank(model, factors)


def matrix_shape(node) -> tuple[int, int]:
    """(K, N) of the node's matrix view (Conv: I·kh·kw × O)."""
    s = node.weight_shape
    if node.op_type == "Conv":
        return int(np.prod(s[1:])), int(s[0])
    return (int(s[0]), int(s[1])) if node.out_axis == 1 else (int(s[1]), int(s[0]))


__all__ = ["NotApplicable", "weight_bytes", "ort_int8", "ort_weight_only", "ORT_WEIGHT_ONLY", "baseline_context",
           "quantize_all", "Quantized", "nearest", "dequant", "hawq_traces", "sensitivities", "hawq_costs", "unit_model", "autoquant_scores",
           "monotone", "allocation", "Allocation", "selection_summary", "uniform_svd", "match_uniform_fraction",
           "svd_params", "svd_rank", "matrix_shape"]

