"""Latency of each (node, format) on the target runtime, cached in a table, and predicted end-to-end latency.

Method: **micro-benchmarks of one-unit models.** For every compressible node the *unit* is the node plus the
epilogue ORT fuses into it (a single-consumer chain of up to two of ``Add`` with a constant, ``Relu``,
``Clip``), cut out of the model with its real input shape at the given batch: a one-input model that
the target's own :meth:`~llc_onnx.targets.base.Target.rewrite` turns into each format (the same code path as
the shipped model), run in the target's session. Each variant's time is the median over ``rounds`` rounds,
the variants of one unit timed in interleaved blocks (so a shared, drifting machine slows them alike; see
:func:`time_sessions`), with
the 25–75 % range and min–max as spread; rounds are short (≥ 1 ms) and many (31), so that some of them
run uncontended on a shared machine. The input is the node's real activation at that batch (captured
from one run of the FP32 model), so calibrated W8A8 parameters and data-dependent paths are realistic.

Prediction: ``T(plan) = T_fp32 + Σ_nodes (t_unit[node, format] − t_unit[node, float])`` with ``T_fp32``
the FP32 model measured once end to end, same session settings, each term from the fastest round by default
(``statistic="min"``; on this shared 2-core machine, load ~7, medians of the same model drifted 2–4× between
calls while minima stayed within ~20 %); ``statistic="median"`` uses the medians. Bounds add the per-unit
spread.

Why not ablation on the whole model (swap one node, time the whole model): each entry would cost a full
model run per repeat and its delta is the small difference of two large noisy numbers on a shared machine.
What a unit cannot see: cross-node effects — consecutive W8A8 units share one Q/DQ pair (each unit pays its
own input Q and output DQ), ORT drops the NHWC transposes between consecutive QLinearConvs, caches warm
differently. Measured on the bundled example (ORT CPU, 2 threads, load ~8 on 2 shared cores, minima of 31
rounds), predicted vs measured end-to-end: batch 1 −7 % … +14 % (fc1 MatMulNBits-4 0.97× vs 1.03× FP32;
all-W8A8 1.89× vs 1.62×); batch 64 −5 % (fc W8A8 0.99× vs 0.96×), −27 % (conv2+fc W8A8 1.06× vs 1.34×),
+57 % (all-W8A8 4.0× vs 2.4×: consecutive QLinearConvs share Q/DQ and transposes). tests/test_targets_latency.py
checks the agreement loosely.

Cache: :class:`LatencyTable` is JSON, keyed by the model's bytes, the target, ONNX Runtime's version, the CPU,
the thread count and the input shapes (``--cache DIR`` keeps ``latency-<key>.json``); a run measures only
the entries missing from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx import helper, numpy_helper

from llc_onnx.atomic import write_bytes_atomic
from llc_onnx.calib.activation_ranges import qparams
from llc_onnx.compressible import CompressibleNode, find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.model_io import infer_shapes
from llc_onnx.targets.base import FLOAT, Format, GraphContext, NodePlan, Target
from llc_onnx.targets.plans import quantize_for

__all__ = [
    "LatencyTable",
    "Prediction",
    "Timing",
    "measure_end_to_end",
    "measure_latency_table",
    "table_key",
    "time_sessions",
    "unit_model",
]

_EPILOGUE = ("Add", "Relu", "Clip")


@dataclass(frozen=True)
class Timing:
    """Per-run latency in milliseconds: median over rounds, the 25–75 % range and min–max, rounds count."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    rounds: int

    @staticmethod
    def of(samples_ms: Sequence[float]) -> Timing:
        a = np.asarray(samples_ms, dtype=np.float64)
        return Timing(float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75)),
                      float(a.min()), float(a.max()), int(a.size))


@dataclass(frozen=True)
class Prediction:
    """Predicted end-to-end latency of a plan at one batch: ``ms`` with the range ``[lo_ms, hi_ms]``."""

    ms: float
    lo_ms: float
    hi_ms: float
    fp32_ms: float

    @property
    def fraction(self) -> float:
        """Predicted latency as a fraction of FP32's (what ``--latency-budget`` bounds)."""
        return self.ms / self.fp32_ms


def time_sessions(sessions: Mapping[str, object], feeds: Mapping[str, np.ndarray], *, rounds: int = 31,
                  warmup: int = 3, min_round_s: float = 0.001, max_seconds: float | None = None,
                  min_rounds: int = 3, blocks: int = 3, settle: int = 2) -> dict[str, Timing]:
    """Time ``sessions`` on ``feeds`` in interleaved **blocks**: ``blocks`` times in turn, each session runs
    ``settle`` untimed times and then its share of the ``rounds`` (a round: ``inner`` runs, ``inner`` set once
    so a round of the slowest lasts ≥ ``min_round_s``; a sample is the mean per-run time). ``max_seconds``:
    stop after the block that passes this much wall time, once ``min_rounds`` rounds per session are done (a
    large model at a large batch: 31 rounds of seconds each would take minutes).

    Why blocks, not one round of each session in turn: a deployed session runs alone. Right after another
    session ran, ONNX Runtime's intra-op threads of that one still spin (``session.intra_op.allow_spinning``,
    on by default) and its weights fill the caches. Measured on this 2-core machine (EfficientNet-Lite0, FP32
    against its W8A8 plan, fastest rounds): alone 4.99 / 2.76 ms at batch 1 (1.81×) and 160 / 87 ms at batch 32
    (1.84×); alternating every run, FP32 slowed to 6.7–13 ms and 200 ms and the speed-up read anywhere from
    1.4× to 2.5× at batch 1 and 1.55–1.7× at batch 32; in blocks of ten runs after two settling runs,
    1.82–1.86× and 1.90–2.03× over three repeats. Blocks still spread a drifting machine's load over every
    session."""
    if not sessions:
        return {}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    slowest = 0.0
    for s in sessions.values():
        t0 = time.perf_counter()
        s.run(None, feeds)
        slowest = max(slowest, time.perf_counter() - t0)
    inner = max(1, int(math.ceil(min_round_s / max(slowest, 1e-7))))
    if max_seconds is not None:   # as many rounds as fit the time (at least min_rounds), spread over the blocks
        per_round = slowest * inner * len(sessions)
        rounds = max(min(int(rounds), int(min_rounds)), min(int(rounds), int(max_seconds / max(per_round, 1e-9))))
    blocks = max(1, min(int(blocks), int(rounds)))
    per_block = [int(rounds) // blocks + (1 if b < int(rounds) % blocks else 0) for b in range(blocks)]
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    for b, n in enumerate(per_block):
        for k, s in sessions.items():
            for _ in range(int(settle)):
                s.run(None, feeds)
            for _ in range(n):
                t0 = time.perf_counter()
                for _ in range(inner):
                    s.run(None, feeds)
                samples[k].append((time.perf_counter() - t0) / inner * 1e3)
        done = sum(per_block[:b + 1])
        if max_seconds is not None and done >= min_rounds and time.perf_counter() - start > max_seconds:
            break
    return {k: Timing.of(v) for k, v in samples.items()}


def measure_end_to_end(target: Target, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                       threads: int = 0, rounds: int = 31, others: Mapping[str, onnx.ModelProto] | None = None
                       ) -> dict[str, Timing]:
    """End-to-end latency of ``model`` (key ``"model"``) and of ``others`` (e.g. compressed models),
    interleaved, in the target's session with ``threads`` intra-op threads."""
    settings = target.session()
    sessions = {"model": settings.make_session(model, intra_op_num_threads=threads)}
    for k, m in (others or {}).items():
        sessions[k] = settings.make_session(m, intra_op_num_threads=threads)
    return time_sessions(sessions, feeds, rounds=rounds)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(model: onnx.ModelProto, target: Target, threads: int,
              shapes: Mapping[str, Mapping[str, Sequence[int]]]) -> str:
    """Cache key of a latency table: model bytes, target, ORT version, CPU, threads, input shapes."""
    import onnxruntime as ort

    from ..model_io import update_digest

    h = hashlib.sha256()
    update_digest(h, model)
    meta = {"target": target.name, "ort": ort.__version__, "cpu": _cpu_name(), "threads": int(threads),
            "shapes": {b: {k: list(v) for k, v in sorted(s.items())} for b, s in sorted(shapes.items())},
            "version": 1}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:24]


@dataclass
class LatencyTable:
    """Measured latencies. ``units[batch][node][format name]`` and ``end_to_end[batch]`` are Timings."""

    key: str
    target: str
    threads: int
    meta: dict = field(default_factory=dict)
    end_to_end: dict[str, Timing] = field(default_factory=dict)
    units: dict[str, dict[str, dict[str, Timing]]] = field(default_factory=dict)

    def unit(self, batch: str, node: str, fmt: Format | str) -> Timing:
        name = fmt if isinstance(fmt, str) else fmt.name
        try:
            return self.units[batch][node][name]
        except KeyError:
            raise LLCError(f"latency table: no measurement of node '{node}' as {name} at batch '{batch}'; "
                           "measure it first (measure_latency_table)") from None

    def delta_ms(self, batch: str, node: str, fmt: Format | str, *, statistic: str = "min") -> float:
        """Latency change of writing ``node`` as ``fmt`` instead of float (negative: faster)."""
        q, f = self.unit(batch, node, fmt), self.unit(batch, node, FLOAT)
        return (q.median_ms - f.median_ms) if statistic == "median" else (q.min_ms - f.min_ms)

    def predict(self, choice: Mapping[str, Format | str], batch: str, *, statistic: str = "min") -> Prediction:
        """End-to-end prediction for ``choice`` (node -> format; nodes not named stay float), from the
        ``statistic`` of each timing: ``"min"`` (default: load on a shared machine only ever adds time, so the
        fastest round is the best estimate of the latency on a dedicated one) or ``"median"``. The range adds
        the per-unit 25/75 % deltas (min: the min..median deltas)."""
        if batch not in self.end_to_end:
            raise LLCError(f"latency table: no end-to-end FP32 measurement at batch '{batch}'")
        if statistic not in ("median", "min"):
            raise LLCError(f"latency prediction: statistic '{statistic}' is unknown; use median or min")
        pick = (lambda t: t.median_ms) if statistic == "median" else (lambda t: t.min_ms)
        lo_of = (lambda t: t.q25_ms) if statistic == "median" else (lambda t: t.min_ms)
        hi_of = (lambda t: t.q75_ms) if statistic == "median" else (lambda t: t.median_ms)
        e2e = pick(self.end_to_end[batch])
        ms, lo, hi = e2e, e2e, e2e
        for node, fmt in choice.items():
            name = fmt if isinstance(fmt, str) else fmt.name
            if name == "float":
                continue
            f, q = self.unit(batch, node, FLOAT), self.unit(batch, node, name)
            ms += pick(q) - pick(f)
            lo += lo_of(q) - hi_of(f)
            hi += hi_of(q) - lo_of(f)
        return Prediction(ms=ms, lo_ms=lo, hi_ms=hi, fp32_ms=e2e)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"key": self.key, "target": self.target, "threads": self.threads, "meta": self.meta,
                "end_to_end": {b: asdict(t) for b, t in self.end_to_end.items()},
                "units": {b: {n: {f: asdict(t) for f, t in fs.items()} for n, fs in ns.items()}
                          for b, ns in self.units.items()}}

    @staticmethod
    def from_dict(d: dict) -> LatencyTable:
        return LatencyTable(key=d["key"], target=d["target"], threads=int(d["threads"]), meta=dict(d.get("meta", {})),
                            end_to_end={b: Timing(**t) for b, t in d["end_to_end"].items()},
                            units={b: {n: {f: Timing(**t) for f, t in fs.items()} for n, fs in ns.items()}
                                   for b, ns in d["units"].items()})

    def save(self, path: str | os.PathLike) -> None:
        write_bytes_atomic(os.fspath(path), json.dumps(self.to_dict(), indent=1, sort_keys=True).encode())

    @staticmethod
    def load(path: str | os.PathLike) -> LatencyTable:
        try:
            with open(path) as f:
                return LatencyTable.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LLCError(f"{path}: not a readable latency table ({exc}); delete it to re-measure") from None


# ----------------------------------------------------------------------------- units
def _epilogue(ctx: GraphContext, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    chain: list[onnx.NodeProto] = []
    out = node.output[0]
    for _ in range(2):
        user = ctx.only_consumer(out)
        if user is None or user.op_type not in _EPILOGUE or user.domain not in ("", "ai.onnx"):
            break
        others = [t for t in user.input if t and t != out]
        if user.op_type == "Add" and (len(others) != 1 or others[0] not in ctx.inits):
            break
        if user.op_type == "Clip" and any(t not in ctx.inits for t in others):
            break
        chain.append(user)
        out = user.output[0]
    return chain


def unit_model(model: onnx.ModelProto, node: str, input_shape: Sequence[int], *,
               context: GraphContext | None = None) -> onnx.ModelProto:
    """The one-input model of ``node`` and its fused epilogue (see module docstring), input shape fixed."""
    ctx = context or GraphContext(model)
    if node not in ctx.nodes:
        raise LLCError(f"node '{node}': not in the model's main graph")
    n = ctx.nodes[node]
    nodes = [n, *_epilogue(ctx, n)]
    x = n.input[0]
    needed = {t for m in nodes for t in m.input if t and t in ctx.inits}
    inits = [ctx.model.graph.initializer[i] for i, t in enumerate(ctx.model.graph.initializer) if t.name in needed]
    elem = onnx.TensorProto.FLOAT
    for vi in (*model.graph.input, *model.graph.value_info):
        if vi.name == x:
            elem = vi.type.tensor_type.elem_type
    g = helper.make_graph([_copy(m) for m in nodes], f"unit_{node}",
                          [helper.make_tensor_value_info(x, elem, list(input_shape))],
                          [helper.make_tensor_value_info(nodes[-1].output[0], elem, None)], [_copy(t) for t in inits])
    m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = infer_shapes(m)
        out = next(v for v in inferred.graph.value_info if v.name == nodes[-1].output[0])
        m.graph.output[0].CopyFrom(out)
    except (StopIteration, Exception):  # noqa: BLE001 - an output without a shape still runs
        m.graph.output[0].type.tensor_type.shape.SetInParent()
    return m


def _copy(proto):
    c = type(proto)()
    c.CopyFrom(proto)
    return c


def _capture(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], tensors: Iterable[str], settings,
             threads: int) -> dict[str, np.ndarray]:
    """Values of intermediate ``tensors`` in one FP32 run (extra graph outputs)."""
    m = _copy(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    wanted = list(dict.fromkeys(tensors))
    try:
        vis = infer_shapes(model).graph.value_info
        types = {v.name: v.type.tensor_type.elem_type for v in vis}
    except Exception:  # noqa: BLE001 - float is the usual activation type
        types = {}
    for t in wanted:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, types.get(t) or onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every tensor
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    vals = dict(zip(names, sess.run(None, dict(feeds))))
    vals.update({k: np.asarray(v) for k, v in feeds.items()})
    return {t: vals[t] for t in wanted if t in vals}


def _unit_plans(target: Target, unit: onnx.ModelProto, node: CompressibleNode, fmt: Format,
                w: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> dict[str, NodePlan]:
    weight = quantize_for(fmt, node, w)
    inp = out = None
    if fmt.kind == "w8a8" and not fmt.dynamic:
        dtype = fmt.activations
        inp = qparams((float(x.min()), float(x.max())), dtype)
        if fmt.output:
            out = qparams((float(y.min()), float(y.max())), dtype)
    return {node.name: NodePlan(format=fmt, weight=weight, input=inp, output=out)}


def measure_latency_table(
    target: Target,
    model: onnx.ModelProto,
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    formats: Mapping[str, Sequence[Format]],
    *,
    threads: int = 0,
    rounds: int = 31,
    table: LatencyTable | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LatencyTable:
    """Measure (or complete) the latency table of ``model`` on ``target``.

    ``feeds``: batch label (e.g. ``"1"``, ``"32"``) -> one feed dict at that batch. ``formats``: node ->
    the formats to measure (e.g. an :class:`~llc_onnx.targets.base.Offer`'s ``formats``; float is always
    measured). With ``cache_dir`` the table is read from / written to ``latency-<key>.json`` there."""
    shapes = {b: {k: tuple(np.asarray(v).shape) for k, v in f.items()} for b, f in feeds.items()}
    key = table_key(model, target, threads, shapes)
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(os.fspath(cache_dir), f"latency-{key}.json")
        if table is None and os.path.exists(path):
            table = LatencyTable.load(path)
    if table is None or table.key != key:
        import onnxruntime as ort

        table = LatencyTable(key=key, target=target.name, threads=int(threads),
                             meta={"ort": ort.__version__, "cpu": _cpu_name(), "rounds": int(rounds),
                                   "shapes": {b: {k: list(v) for k, v in s.items()} for b, s in shapes.items()},
                                   "method": "one-unit micro-benchmarks, interleaved medians"})
    settings = target.session()
    nodes = {n.name: n for n in find_compressible(model)[0]}
    for name in formats:
        if name not in nodes:
            raise LLCError(f"node '{name}': not a compressible node; measure latencies of find_compressible() nodes")
    ctx = GraphContext(model)
    inits = {t.name: t for t in model.graph.initializer}
    for batch, batch_feeds in feeds.items():
        if batch not in table.end_to_end:
            table.end_to_end[batch] = measure_end_to_end(target, model, batch_feeds, threads=threads,
                                                         rounds=rounds)["model"]
        have = table.units.setdefault(batch, {})
        todo = {}
        for n, fmts in formats.items():               # float is re-timed beside anything missing
            missing = [f for f in fmts if f.kind != "float" and f.name not in have.get(n, {})]
            if missing or FLOAT.name not in have.get(n, {}):
                todo[n] = [FLOAT, *missing]
        if not todo:
            continue
        units = {n: [ctx.nodes[n], *_epilogue(ctx, ctx.nodes[n])] for n in todo}
        wanted = [ctx.nodes[n].input[0] for n in todo] + [u[-1].output[0] for u in units.values()]
        wanted += [ctx.nodes[n].output[0] for n in todo]
        values = _capture(model, batch_feeds, wanted, settings, threads)
        for name, fmts in todo.items():
            proto = ctx.nodes[name]
            x = values.get(proto.input[0], batch_feeds.get(proto.input[0]))
            if x is None:
                raise LLCError(f"node '{name}': its input '{proto.input[0]}' could not be captured")
            unit = unit_model(model, name, x.shape, context=ctx)
            w = numpy_helper.to_array(inits[nodes[name].weight])
            sessions = {}
            for fmt in fmts:
                if fmt.kind == "float":
                    m = unit
                else:
                    y_name = target.tensors_to_calibrate(unit, name, fmt)[1] if fmt.kind == "w8a8" else None
                    y = values.get(y_name) if y_name else None
                    m = target.rewrite(unit, _unit_plans(target, unit, nodes[name], fmt, w, x, y)).model
                sessions[fmt.name] = settings.make_session(m, intra_op_num_threads=threads)
            timings = time_sessions(sessions, {proto.input[0]: x}, rounds=rounds)
            have.setdefault(name, {}).update(timings)
        if path is not None:
            table.save(path)
    if path is not None:
        table.save(path)
    return table
