"""The public pipeline: :func:`optimize`, :func:`inspect`, :func:`compare`. No printing, no argparse: the CLI
is a thin view of these functions.

:func:`expand` is the data-free series expansion (fixed bits and terms, no data; ``flows.series``).

``model`` is a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified); ``data`` is a path
(``.npz``, a directory of ``.npz`` batches, ``module:attr``), a :class:`~llc_onnx.calib.data.Dataset`, an
ONNX Runtime ``CalibrationDataReader`` or an iterable of dicts of arrays (see ``calib.data``).

:func:`optimize` runs, for each method of ``config.method`` in order: the method's flow (measure, solve —
``flows/``), plan selection on the validation split (``verify.select_plan``), and at the end the one-shot
verdict on the test split (``verify.verdict``). It writes ``out`` only when the model is verified (or
``config.criterion.allow_loss_increase``), after every check has passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np
import onnx

from .config import OptimizeConfig
from .errors import LLCError
from .memory import release
from .progress import Progress, Silent, StageTimer
from .result import NodeDecision, OptimizeResult, SplitResult, StageResult

from .deploy import check, engine, run  # noqa: E402,F401 - the deployment commands' API (deploy.py)

__all__ = ["optimize", "inspect", "compare", "expand", "CompareResult", "load", "check", "run", "engine"]

log = logging.getLogger(__name__)


def load(model) -> tuple[onnx.ModelProto, str]:
    """(ModelProto, source label) for a path, a ModelProto (copied) or an onnx_ir.Model."""
    from .model_io import load_model

    if isinstance(model, (str, os.PathLike)):
        return load_model(model), os.fspath(model)
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m, "model"
    try:
        import onnx_ir as ir

        if isinstance(model, ir.Model):
            return ir.serde.serialize_model(model), "model"
    except ImportError:  # pragma: no cover - onnx-ir is a dependency
        pass
    raise LLCError(f"model: {type(model).__name__} is not a model; give a path, an onnx.ModelProto or an "
                   "onnx_ir.Model")


def _check_output_path(out: str, source: str) -> None:
    """Validate-before-write: refuse an output that would overwrite the input or has no directory."""
    if os.path.abspath(out) == os.path.abspath(source):
        raise LLCError(f"-o {out}: would overwrite the input model; choose another output path")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise LLCError(f"-o {out}: directory '{directory}' does not exist; create it first")


@contextlib.contextmanager
def _torch_one_thread():
    """torch (the interpreter's measurements and gradients, the losses) on one thread inside the block: its
    reductions (the batch sums of weight gradients, loss sums) are split by thread count and round
    differently with 1 or 2 threads, which can move a rounding decision; on one thread the result does not
    depend on the machine or on ``device.threads``, which drives ONNX Runtime only."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_method(ctx, stage: str):
    """Run one stage of ``config.stages``: ``lowrank``, or the knapsack over ``quant`` / ``series`` /
    ``quant+series`` (``flows.quantize`` reads the families from ``config.method``)."""
    from .flows import lowrank, quantize

    return lowrank.run(ctx) if stage == "lowrank" else quantize.run(ctx)


def _sweep_points(ctx, outcome) -> list[dict]:
    """The solver's plan at each ``quant.sweep`` budget, measured on the validation split."""
    from .verify import plan_bytes

    points = []
    for frac, choice, note in outcome.sweep:
        if choice is None:
            points.append({"budget": frac, "bytes": None, "val_loss": None, "note": note})
            continue
        ev = ctx.evaluate(outcome.build(choice), ctx.val)
        points.append({"budget": frac, "bytes": plan_bytes(outcome.ladders, choice), "val_loss": ev.loss,
                       "val_metrics": ev.metrics})
    return points


def _stage(ctx, outcome, tolerance: float):
    """(StageResult, chosen model, its validation Evaluation)."""
    from .solvers.cost_model import plan_costs
    from .verify import select_plan

    crit = ctx.config.criterion
    with ctx.timer.stage("validate"), ctx.progress.task("measuring plans on validation",
                                                        len(outcome.plans) + crit.max_rounds) as advance:
        sel = select_plan(outcome.build, outcome.ladders, outcome.plans,
                          lambda m: ctx.evaluate(m, ctx.val, samples=True), ctx.val_fp, tolerance, crit.max_rounds,
                          outcome.max_bytes, advance, crit.margin_z, outcome.admissible)
        release()  # the plans' models and sessions are gone: give their memory back before the next stage
    sweep = []
    if outcome.sweep:
        with ctx.timer.stage("sweep"):
            sweep = _sweep_points(ctx, outcome)
    chosen = {n: outcome.ladders[n][i] for n, i in sel.choice.items()}
    if outcome.notes is not None:
        ctx.notes.extend(outcome.notes(sel.choice))
    nodes = [NodeDecision.of(node, chosen[node.name]) for node in ctx.nodes]
    # how much of the plan kept (not only the solver's first) rests on measured gains
    costs = {**plan_costs(list(chosen.values()), outcome.settings.get("gain_credit", 1.0)), "plan": sel.trial.name}
    stage = StageResult(outcome.method, nodes, [c for g in outcome.table.groups.values() for c in g], sel.trials,
                        sel.trial.name, sel.first_plan_passed, costs, ctx.float_bytes(),
                        sum(c.nbytes for c in chosen.values()), dict(ctx.timer.seconds), outcome.settings,
                        ctx.measurement_info(), outcome.cache, outcome.search, sweep, outcome.frontier)
    return stage, sel.model, sel.val


def optimize(model, data, config: OptimizeConfig | None = None, *, held=None, val=None, out: str | None = None,
             progress: Progress | None = None) -> OptimizeResult | None:
    """Compress ``model`` on ``data`` under ``config`` and give the verdict on the test split (module doc).
    ``held``: explicit test data (else ``config.data.holdout`` of ``data``); ``val``: explicit validation data
    (else ``config.data.val_fraction`` of the calibration data); ``out``: where to write the model when it is
    verified. Raises :class:`~llc_onnx.errors.LLCError` on bad input, before any output is written. torch runs
    on one thread meanwhile (:func:`_torch_one_thread`): the same inputs give the same bytes whatever
    ``config.device.threads`` (ONNX Runtime's intra-op threads) is. With several ranks (``device.workers``,
    torchrun: ``flows.parallel``) a rank other than 0 returns None once the measurements are done."""
    with _torch_one_thread():
        return _optimize(model, data, config, held=held, val=val, out=out, progress=progress)


def _optimize(model, data, config: OptimizeConfig | None = None, *, held=None, val=None, out: str | None = None,
              progress: Progress | None = None) -> OptimizeResult:
    from .flows.context import create_context, derive_context
    from .verify import verdict

    from .flows import parallel

    config = config or OptimizeConfig()
    if parallel.needs_launch(config):  # several workers: set up the ranks, each comes back here
        return parallel.optimize(optimize, model, data, config, held=held, val=val, out=out, progress=progress)
    progress = progress or Silent()
    # a path is read by create_context and a proto is not copied (neither is modified): the run holds one
    # prepared copy of a large model, not two
    proto, source = (os.fspath(model), os.fspath(model)) if isinstance(model, (str, os.PathLike)) else \
        (model, "model") if isinstance(model, onnx.ModelProto) else load(model)
    if out is not None:
        _check_output_path(out, source)
    if config.cache_dir:
        from .flows.cost_cache import ensure_directory

        ensure_directory(config.cache_dir)
    ctx = create_context(proto, data, config, source=source, held=held, val=val, progress=progress)
    del proto  # the run reads ctx.model (a prepared copy): do not hold a large model twice
    if config.target.latency_batches:
        from .flows.latency import feeds_at

        feeds_at(ctx)  # a batch size the data cannot make fails here, before any measurement
    tolerance = config.criterion.verdict_tolerance(ctx.objective)
    first = ctx
    stages: list[StageResult] = []
    current = None  # each stage's output (not ctx.model: a reference here would keep the full proto alive while
    #                 the interpreter holds the weights, FlowContext.hold_weights)
    for i, method in enumerate(config.stages):
        if i and set(stages[-1].levels) <= {"full", "float"}:
            # the previous stage kept every node: the next works on the same model and context (its
            # measurements, and any cache entry, are the original model's), with a fresh stage timer
            ctx = dataclasses.replace(ctx, timer=StageTimer())
        elif i:
            done, ctx = ctx, derive_context(ctx, current)
            done.release_interpreter()  # the previous stage measures nothing more (its model's weights, 0.65 GB
            #                             on SmolLM2, would otherwise stay through every later stage)
            if done is not first:
                done.drop_model()
        outcome = _run_method(ctx, method)
        if i == len(config.stages) - 1:
            ctx.release_interpreter()  # the last stage's measurements are done: validation and test run in ORT
            if parallel.world()[0] != 0:  # (0 in a plain process)
                return None  # a worker's share ends here: what follows only repeats rank 0's (flows.parallel)
        stage, current, val_c = _stage(ctx, outcome, tolerance)
        stages.append(stage)
        outcome = None  # its build closure holds every plan's codes (quantize.CodeMemo): gone before the next step
    from .ort_eval import SessionInput, evaluate

    # the final and the float model as ONNX Runtime reads them: a large one written to files once for every
    # session below (the float weights the interpreter still holds streamed into them one at a time)
    cur_in, ref_in = SessionInput(current), SessionInput(first.model, held=first.held_data())
    if not isinstance(ref_in.source, onnx.ModelProto):  # written as files: no later step reads the float proto
        for c in (first, ctx):
            c.drop_model()
    parked = None
    if not isinstance(cur_in.source, onnx.ModelProto):  # written as files: its data waits in files meanwhile
        from .model_io import ParkedData

        parked, current = ParkedData(current), None
    release()
    with first.timer.stage("calibration check"):
        calib_c = first.evaluate(cur_in.source, first.calib, samples=True)
    with first.timer.stage("test"):  # the test split, once: nothing below chooses anything
        final = verdict(cur_in.source, ref_in.source, first.test, first.evaluate, tolerance)
        task_extra = {}
        if first.task_loss is not None and first.task_test is not None:
            ref_t = evaluate(ref_in.source, first.task_test, first.task_loss, session=first.session)
            cmp_t = evaluate(cur_in.source, first.task_test, first.task_loss, session=first.session)
            task_extra = {"task_loss": {"name": first.task_loss.name, "reference": ref_t.loss,
                                        "compressed": cmp_t.loss, "reference_metrics": ref_t.metrics,
                                        "compressed_metrics": cmp_t.metrics}}
    notes = list(first.notes)
    d, se = calib_c.samples.delta(first.calib_fp.samples)
    adapted = first.objective == "task" and d < -2 * se
    if adapted:
        notes.append(f"adapted to the calibration data: the compressed calibration loss is {-d:.4g} below float "
                     f"(> 2 standard errors, {se:.2g}); the gain may not carry over to other data — the test split "
                     "and --objective fidelity say more")
    unchanged = stages[-1].compressed_bytes >= stages[0].reference_bytes  # the float model: nothing to time
    if config.target.w8a8_codes == 8 and any(str(n.level).startswith("w8a8") for st in stages for n in st.nodes):
        notes.append("W8A8 nodes use full-range int8 weight codes (--w8a8-codes 8): exact on x86 CPUs with "
                     "AVX512-VNNI/AVX-VNNI and on ARM64 only; on other x86 CPUs ONNX Runtime's int8 kernels saturate "
                     "(recorded in the model's metadata, llc_onnx.w8a8_codes)")
    if unchanged:
        notes.append("nothing was compressed: no candidate's measured loss change fits the criterion; try a "
                     "budget, a smaller margin_z, or other levels")
    splits = {
        "calibration": SplitResult("calibration", "chose: fit part chose roundings, measure part measured costs",
                                   first.calib_fp.n, first.calib.source, first.calib_fp, calib_c,
                                   {"fit": first.fit_data.n_samples, "measure": first.measure_data.n_samples,
                                    "in_sample": first.in_sample, "delta_se": se, "adapted": adapted}),
        "validation": SplitResult("validation", "steered: plans measured jointly, back-off", first.val_fp.n,
                                  first.val.source, first.val_fp, val_c,
                                  {"same_as_calibration": first.val is first.calib}),
        "test": SplitResult("test", "verdict: evaluated once, on the final model", final.reference.n,
                            first.test.source, final.reference, final.compressed, task_extra),
    }
    seconds: dict[str, float] = dict(first.timer.seconds)
    for st in stages[1:]:
        for k, v in st.seconds.items():
            seconds[f"{st.method}: {k}"] = v
    target = {"name": config.target.name, "session": first.session.description}
    if (config.target.measure_latency and not unchanged and first.session.settings is not None
            and first.session.settings.available()):
        from .flows.latency import budget_batches, end_to_end

        with first.timer.stage("latency"):
            levels = {n.node: n.level for n in stages[-1].nodes} if len(stages) == 1 else None
            target["latency"] = end_to_end(ctx, ref_in.source, cur_in.source, levels)
        slower = {b: r["speedup"] for b, r in target["latency"].items() if r.get("speedup") and r["speedup"] < 1}
        if slower:
            notes.append("the compressed model ran slower than the float model here ("
                         + ", ".join(f"{v:.2f}x at batch {b}" for b, v in slower.items())
                         + "): smaller, not faster; --latency-budget 1.0 asks for a plan timed no slower than the float "
                           "model (choices then depend on timings on this machine)")
        budget = config.target.latency_budget
        over = {b: 1.0 / target["latency"][b]["speedup"] for b in budget_batches(ctx)
                if target["latency"].get(b, {}).get("speedup")}
        over = {b: f for b, f in over.items() if budget is not None and f > budget}
        if over:
            lat_batch, frac = max(over.items(), key=lambda kv: kv[1])
            notes.append(f"the kept plan ran {frac:.2f}× the float model's latency at batch {lat_batch} here, "
                         f"over the latency budget {budget:g} (validation back-off raised nodes to finer formats, "
                         "or the timing moved between the fit and this measurement)")
        seconds["latency"] = first.timer.seconds["latency"]
    cur_in.close()
    ref_in.close()
    if parked is not None:
        current = parked.restore()
    result = OptimizeResult(current, source, config, first.objective, first.loss.name, tolerance, final.verified,
                            splits, stages, target, first.skipped, notes, seconds)
    if out is not None and (result.verified or config.criterion.allow_loss_increase):
        result.save(out, force=True)
    return result


def inspect(model) -> dict:
    """Plain-data description of a model: opset, IR version, inputs/outputs, the compressible nodes, the
    nodes skipped and why, and the ops the interpreter cannot run (``unsupported``), before any work."""
    from .compressible import inspect_model
    from .interpreter import unsupported_nodes

    proto, source = load(model)
    info = {"model": source, **inspect_model(proto)}
    info["unsupported"] = [{"node": k, "op_type": op, "domain": dom or "ai.onnx"}
                           for k, op, dom in unsupported_nodes(proto)]
    return info


@dataclass
class CompareResult:
    """Both models on the same data in ONNX Runtime."""

    output: str
    loss: str
    n: int
    reference: dict  # {"model", "loss", "metrics", "weight_bytes", "seconds"}
    candidate: dict
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    latency: dict | None = None  # batch -> both models' latency and throughput (compare_latency)

    @property
    def passed(self) -> bool:
        return bool(self.candidate["loss"] <= self.reference["loss"] + self.tolerance)

    def to_dict(self) -> dict:
        r, c = self.reference, self.candidate
        names = list(r["metrics"])
        return {"output": self.output, "loss_kind": self.loss, "n_samples": self.n, "reference": r, "candidate": c,
                "delta": {"loss": c["loss"] - r["loss"],
                          "metrics": {k: c["metrics"][k] - r["metrics"][k] for k in names},
                          "weight_bytes": c["weight_bytes"] - r["weight_bytes"],
                          "weight_ratio": c["weight_bytes"] / r["weight_bytes"] if r["weight_bytes"] else None},
                "max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff,
                "tolerance": self.tolerance, "passed": self.passed, "latency": self.latency}


def compare_latency(reference, candidate, dataset, *, threads: int = 0, rounds: int = 31,
                    max_seconds: float = 30.0) -> dict:
    """Latency and throughput of both models in the same ONNX Runtime session settings (CPU provider, default
    graph optimizations, ``threads`` intra-op threads), timed in interleaved blocks
    (``targets.latency.time_sessions``; ms per run as the fastest round and the median) at batch 1 and at the data's
    batch (its first batch; only that one when the model's batch is fixed). At most ``rounds`` rounds per
    batch, fewer (at least 3) once ``max_seconds`` of timing have passed; the rounds done are reported."""
    from .ort_eval import SessionConfig, make_session
    from .targets.latency import time_sessions

    cfg = SessionConfig(threads=threads)
    sessions = {"reference": make_session(reference, cfg), "candidate": make_session(candidate, cfg)}
    first = dataset.batches[0]
    feeds = {str(first.size): dict(first.inputs)}
    if first.size != 1 and not dataset.fixed_batch:
        feeds = {"1": {k: v[:1] for k, v in first.inputs.items()}, **feeds}
    out = {}
    for label, f in feeds.items():
        t = time_sessions(sessions, f, rounds=rounds, max_seconds=max_seconds, min_rounds=min(3, rounds))
        r, c = t["reference"], t["candidate"]
        out[label] = {"reference_ms": r.min_ms, "candidate_ms": c.min_ms, "reference_median_ms": r.median_ms,
                      "candidate_median_ms": c.median_ms, "speedup": r.min_ms / c.min_ms if c.min_ms else None,
                      "reference_throughput": int(label) / r.min_ms * 1e3,
                      "candidate_throughput": int(label) / c.min_ms * 1e3, "rounds": r.rounds, "threads": threads}
    return out


def compare(reference, candidate, data, *, loss: str | None = None, output: str | None = None,
            tolerance: float = 0.0, batch_size: int = 64, threads: int = 0, progress: bool = False,
            latency: bool = True, rounds: int = 31) -> CompareResult:
    """Run both models on ``data`` in ONNX Runtime: loss, metrics, max/mean |Δ output|, weight bytes, and
    (``latency``) both models' latency and throughput in the same session settings (:func:`compare_latency`)."""
    from .calib.data import load_dataset, validate_dataset
    from .calib.losses import make_loss
    from .flows.context import _default_loss_kind
    from .model_io import initializer_bytes
    from .ort_eval import SessionConfig, compare_models, resolve_output

    if not (isinstance(tolerance, (int, float)) and np.isfinite(tolerance) and tolerance >= 0):
        raise LLCError(f"--tolerance {tolerance}: must be ≥ 0")
    if latency and not (isinstance(rounds, int) and rounds >= 1):
        raise LLCError(f"--rounds {rounds}: must be an integer ≥ 1")
    ref, ref_src = load(reference)
    cand, cand_src = load(candidate)
    out_name = resolve_output(ref, output, ref_src)
    resolve_output(cand, out_name, cand_src)
    kind = loss or _default_loss_kind(ref, out_name)
    task = make_loss(kind, out_name)
    ds = load_dataset(data, ref, batch_size=batch_size)
    validate_dataset(ds, cand)
    cmp = compare_models(reference if isinstance(reference, (str, os.PathLike)) else ref,
                         candidate if isinstance(candidate, (str, os.PathLike)) else cand, ds, task,
                         session=SessionConfig(threads=threads), progress=progress)

    def side(src, e, nbytes):
        return {"model": src, "loss": e.loss, "metrics": dict(e.metrics), "weight_bytes": nbytes, "seconds": e.seconds}

    lat = compare_latency(reference if isinstance(reference, (str, os.PathLike)) else ref,
                          candidate if isinstance(candidate, (str, os.PathLike)) else cand, ds, threads=threads,
                          rounds=rounds) if latency else None
    return CompareResult(out_name, kind, cmp.n, side(ref_src, cmp.reference, initializer_bytes(ref)),
                         side(cand_src, cmp.candidate, initializer_bytes(cand)), cmp.max_abs_diff,
                         cmp.mean_abs_diff, float(tolerance), lat)


def expand(model, *, bits: int = 4, terms: int = 2, order: int | None = None, block_size: int | None | str = "default",
           scale: str = "mse", form: str = "standard", data=None, loss: str | None = None, output: str | None = None,
           tolerance: float = 0.0, batch_size: int = 64, threads: int = 0, out: str | None = None):
    """Data-free series expansion (the FP = xINT paper's setting): every compressible node's weight as ``terms``
    ``bits``-bit basis terms W ≈ Σ_t s_t·Q_t (blocks of ``block_size`` along the reduction axis; default 32 for
    2/4 bits, per channel for 8), written truncated at ``order`` (default all) in ``form``. No data is used to
    build it; with ``data`` the written model is compared with ``model`` in ONNX Runtime (:func:`compare`).
    Returns a :class:`~llc_onnx.flows.series.ExpandResult`; writes ``out`` when given (the data's verdict does
    not stop the write: nothing was chosen on it; the model's metadata records it)."""
    from .flows.series import data_free_expansion

    proto, source = load(model)
    if out is not None:
        _check_output_path(out, source)
    res = data_free_expansion(proto, bits=bits, terms=terms, order=order, block_size=block_size,
                              scale_method=scale, form=form, source=source)
    if data is not None:
        res.comparison = compare(proto, res.model, data, loss=loss, output=output, tolerance=tolerance,
                                 batch_size=batch_size, threads=threads)
    if out is not None:
        res.save(out)
    return res
