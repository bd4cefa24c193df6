"""The methods of the benchmark: one small function per row, registered in :data:`METHODS`.

A method gets the :class:`Bench` of one model (paths, splits, the FP32 model, shared state) and the row
dict; it fills the row (notes, selection, result summary) and returns the path of the model it produced, or
raises :class:`~bench.baselines.NotApplicable` (row "n/a") or :class:`Refused` (row "refused": llc-onnx said
no, with its one-line reason — e.g. a flag not wired in yet). ``bench.run`` then judges every produced model
the same way (test split once, in the row's target session), counts its bytes and times it.

Families (the rows' ``family``): ``fp32``, ``ort`` (ONNX Runtime's quantizers), ``llc`` (llc-onnx, any
target), ``alloc`` (HAWQ-V2 / AutoQuantize / CET-cost allocations on the qdq target), ``round`` (CET rounding
rows), ``series`` (FP = xINT rows), ``lowrank`` and ``svd``. Row keys are stable; ``--methods`` selects by
key prefix.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench import baselines as B
from bench import llc as LLC

ALLOC_TARGET = "qdq"  # the allocation comparison: every level offered to every node (weight-only)
BUDGETS = (0.25, 0.15, 0.10)


class Refused(Exception):
    """llc-onnx refused the run (exit 2: bad input or an option it does not have yet) — its one-line reason."""


@dataclass
class Bench:
    """One benchmark model as every method sees it."""

    m: object  # bench.models.BenchModel
    quick: bool
    args: object
    calib: Path
    test: Path
    work: Path
    fp_path: Path
    fp_model: object
    nodes: list
    fp_bytes: int
    evaluator: object
    state: dict = field(default_factory=dict)  # shared between rows: contexts, traces, scores, results
    rows: dict = field(default_factory=dict)  # key -> finished row (rows that read other rows' results)

    @property
    def measure_samples(self) -> int | None:
        return self.m.ms(self.quick)

    def out(self, key: str) -> Path:
        p = self.work / f"{key}.onnx"
        if p.exists():
            p.unlink()
        return p


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    family: str
    fn: Callable[[Bench, dict], Path | None]
    target: str = "ort-cpu"  # the session the row's model is judged (and timed) in
    issue: str = ""  # the issue the row reports for
    latency: bool = False  # timed against FP32 (rows whose target is ort-cpu)


# ------------------------------------------------------------------------------------------ llc-onnx
def llc_method(extra: list[str], *, cache: str | None = None, check: Callable | None = None, val: bool = False):
    """A row that runs ``llc-onnx optimize <model> --data calib --held test <extra>``. ``cache``: runs with
    the same candidate settings share measurements (``--cache``); the reused seconds are added to the row.
    ``val``: the model's separate validation file steers back-off (``--val``; the whole calibration file then
    fits and measures)."""
    def fn(b: Bench, row: dict) -> Path | None:
        out = b.out(row["key"])
        args = list(extra) + list(b.m.lowrank_args if "--mode" in extra and "compact" in extra else [])
        if val:
            if b.m.val_path is None or b.quick:
                raise B.NotApplicable("needs the model's separate validation file (not in --quick)")
            args += ["--val", str(b.m.val_path())]
        if cache:
            args += ["--cache", str(b.work / f"cache_{cache}")]
        cmd = LLC.command(b.m.model_path(), b.calib, b.test, out, b.m.batch_size, b.measure_samples, args)
        res = LLC.run(cmd, b.work / f"{row['key']}.json", b.args.llc_timeout)
        row["command"], row["seconds"] = res["command"], res["seconds"]
        if "error" in res:
            if res["exit"] == 2:
                raise Refused(res["error"].removeprefix("error: "))
            raise RuntimeError(f"exit {res['exit']}: {res['error']}")
        s = LLC.summarize(res["result"])
        row["llc"] = s
        row["result_json"] = str(b.work / f"{row['key']}.json")
        row["verified"] = s["verified"]
        row["objective"] = s["objective"]
        row["report_bytes"] = s["bytes"]
        reused = LLC.cached_seconds(s)
        if reused:
            row["seconds"] += reused
            row.setdefault("notes", []).append(f"{reused:.0f} s of cached measurements reused, counted in the time")
        last = s["stages"][-1]
        row["selection"] = {"backoff_rounds": sum(st["backoff_rounds"] for st in s["stages"]),
                            "first_plan_passed": all(st["first_plan_passed"] for st in s["stages"]),
                            "chosen_plan": "; ".join(f"{st['method']}: {st['chosen_plan']}" for st in s["stages"])
                            if len(s["stages"]) > 1 else last["chosen_plan"],
                            "plans": [p for st in s["stages"] for p in st["plans"]]}
        row["levels"] = last["levels"]
        for note in s["notes"]:
            row.setdefault("notes", []).append(note)
        if check is not None and out.exists():
            check(b, row, out)
        return out if out.exists() else None
    return fn


def llc_at_row_size(of: str, extra: list[str], *, cache: str | None = None):
    """``llc_method(extra + ["--budget", r])`` where r is row ``of``'s measured weight bytes / FP32 bytes (this
    run's row, else the previous run's): llc-onnx at exactly a baseline's size (issue 15: "at ORT INT4
    block-32's size")."""
    def fn(b: Bench, row: dict) -> Path | None:
        from bench.run import previous_row

        ref = b.rows.get(of)
        if ref is None or ref.get("status") != "ok" or not ref.get("bytes"):
            ref = previous_row(b.m.name, of, b.quick)
        if ref is None or not ref.get("bytes"):
            raise B.NotApplicable(f"needs the {of} row (its weight bytes are the budget)")
        ratio = int(ref["bytes"]) / b.fp_bytes
        budget = f"{ratio:.6f}"
        row.setdefault("notes", []).append(f"budget {budget} = {of}'s {int(ref['bytes']):,} B / FP32 {b.fp_bytes:,} B")
        return llc_method(list(extra) + ["--budget", budget], cache=cache)(b, row)
    return fn


def llc_at_bench_batches(extra: list[str], *, cache: str | None = None):
    """``llc_method(extra + ["--latency-batches", "1,N"])`` with the model's bench batches (batch 1 and the
    larger batch of the latency columns): the latency budget holds at every batch the row is judged at."""
    def fn(b: Bench, row: dict) -> Path | None:
        sizes = ",".join(str(n) for n in b.m.latency_batches())
        return llc_method(list(extra) + ["--latency-batches", sizes], cache=cache)(b, row)
    return fn


def check_tensorrt(b: Bench, row: dict, path: Path) -> None:
    """Issue 12's done-when: ``llc_onnx.targets.check_tensorrt`` on the written model; violations listed."""
    from llc_onnx.model_io import load_model
    from llc_onnx.targets import check_tensorrt as check

    v = check(load_model(str(path)))
    row["tensorrt_check"] = [{"node": x.node, "rule": x.rule, "message": x.message} for x in v]
    row.setdefault("notes", []).append(
        "TensorRT checker: passes (0 violations)" if not v else
        f"TensorRT checker: **{len(v)} violation(s)**: " + "; ".join(f"{x.node}: {x.rule}" for x in v[:5]))


# ----------------------------------------------------------------------------------------- FP32 / ORT
def fp32(b: Bench, row: dict) -> Path:
    row["seconds"] = 0.0
    return b.fp_path


def ort_int8(b: Bench, row: dict) -> Path:
    from llc_onnx.calib.data import load_dataset

    t0 = time.perf_counter()
    out = b.out(row["key"])
    ds = load_dataset(str(b.calib), b.fp_model, batch_size=b.m.batch_size)
    row["info"] = B.ort_int8(str(b.fp_path), ds, str(out))
    row["seconds"] = time.perf_counter() - t0
    row["notes"] = ["quantize_static QDQ: per-channel symmetric INT8 weights, INT8 activations (MinMax over the "
                    "whole calibration file); no validation step"]
    return out


def ort_int8_dynamic(b: Bench, row: dict) -> Path:
    t0 = time.perf_counter()
    out = b.out(row["key"])
    row["info"] = B.ort_int8_dynamic(str(b.fp_path), str(out))
    row["seconds"] = time.perf_counter() - t0
    row["notes"] = ["quantize_dynamic: MatMulInteger, per-channel symmetric INT8 weights, activations quantized "
                    "at run time (one uint8 scale per tensor per run; ONNX Runtime's recommendation for "
                    "transformers); no calibration, no validation step"]
    return out


def ort_weight_only(algo: str, block: int, symmetric: bool = True):
    def fn(b: Bench, row: dict) -> Path:
        from llc_onnx.calib.data import load_dataset

        if block not in b.m.ort_blocks:
            raise B.NotApplicable(f"block {block} not benchmarked for this model (ort_blocks {b.m.ort_blocks})")
        t0 = time.perf_counter()
        out = b.out(row["key"])
        ds = load_dataset(str(b.calib), b.fp_model, batch_size=b.m.batch_size) if algo == "gptq" else None
        info = B.ort_weight_only(str(b.fp_path), str(out), algo, block, symmetric, ds)
        row["seconds"] = time.perf_counter() - t0
        row["info"] = {k: v for k, v in info.items() if k != "covered"} | {"covered": len(info["covered"])}
        row["notes"] = [f"{len(info['covered'])} of {info['total_matmul']} MatMul nodes rewritten; "
                        f"{len(b.nodes) - len(info['covered'])} other compressible nodes stay FP32; "
                        f"MatMulNBits accuracy_level 4; no validation step"]
        return out
    return fn


# --------------------------------------------------------------------------------- allocation baselines
def _alloc_state(b: Bench) -> dict:
    """The shared part of the allocation baselines: the context llc-onnx's qdq run builds (same splits),
    every candidate quantized (nearest rounding). Its seconds are counted in every allocation row."""
    st = b.state.setdefault("alloc", {})
    if "ctx" not in st:
        t0 = time.perf_counter()
        st["ctx"] = B.baseline_context(str(b.m.model_path()), str(b.calib), str(b.test), batch_size=b.m.batch_size,
                                       measure_samples=b.measure_samples, target=ALLOC_TARGET)
        st["quantized"] = B.quantize_all(st["ctx"])
        st["seconds"] = time.perf_counter() - t0
    return st


def _hawq(b: Bench, curvature: str = "hessian") -> dict:
    st = _alloc_state(b)
    key = "hawq" if curvature == "hessian" else "hawq_gn"
    if key not in st:
        ctx = st["ctx"]
        t0 = time.perf_counter()
        if curvature == "hessian":
            mb = b.m.quick_hessian_batches if b.quick else b.m.hessian_batches
            traces = B.hawq_traces(ctx, probes=b.m.hutchinson_probes, max_probes=b.m.hutchinson_max_probes,
                                   max_batches=mb, per_node=b.m.hutchinson_per_node,
                                   deflate=b.m.hutchinson_deflate)
        else:
            mb = b.m.gauss_newton_batches
            traces = B.gauss_newton_traces(ctx, max_batches=mb, draws=b.m.gauss_newton_draws)
        numel = {n.name: int(np.prod(n.weight_shape)) for n in ctx.nodes}
        costs = B.monotone(B.hawq_costs(st["quantized"], traces, numel), st["quantized"], ctx.nodes)
        used = ctx.calib.batches if mb is None else ctx.calib.batches[:mb]
        st[key] = {"costs": costs, "traces": traces, "seconds": time.perf_counter() - t0,
                   "samples": sum(x.size for x in used)}
    return st[key]


def _autoquant(b: Bench) -> dict:
    st = _alloc_state(b)
    if "autoquant" not in st:
        ctx = st["ctx"]
        t0 = time.perf_counter()
        scores = B.autoquant_scores(ctx, st["quantized"], max_batches=b.m.score_batches)
        full = {k: scores.get(k, 0.0) for k in st["quantized"].delta_sq}
        used = ctx.calib.batches if b.m.score_batches is None else ctx.calib.batches[:b.m.score_batches]
        st["autoquant"] = {"costs": B.monotone(full, st["quantized"], ctx.nodes), "seconds": time.perf_counter() - t0,
                           "samples": sum(x.size for x in used)}
    return st["autoquant"]


def alloc_method(kind: str, budget: float):
    def fn(b: Bench, row: dict) -> Path:
        from llc_onnx.model_io import save_model

        got = (_hawq(b) if kind == "hawq" else _hawq(b, "gauss-newton") if kind == "hawq_gn" else
               _autoquant(b))
        st = b.state["alloc"]
        ctx = st["ctx"]
        a = B.allocation(ctx, st["quantized"], got["costs"], budget, kind)
        out = b.out(row["key"])
        save_model(a.model, str(out))
        row["seconds"] = st["seconds"] + got["seconds"] + a.seconds
        row["selection"] = B.selection_summary(a.selection)
        row["levels"] = _count(a.levels.values())
        row["budget_bytes"] = a.budget_bytes
        row["objective"] = "task"
        row["validation"] = {"n": ctx.val.n_samples, "reference": ctx.val_fp.loss, "source": ctx.val.source}
        notes = [f"budget {a.budget_bytes:,} B; solver's plan: " + ", ".join(
            f"{k}×{v}" for k, v in _count(a.solver_plan.values()).items())]
        if kind == "hawq":
            tr = got["traces"]
            used = sorted({v["probes"] for v in tr.values()})
            probes = str(used[0]) if len(used) == 1 else f"{used[0]}–{used[-1]}"
            unstable = sum(not v["stable"] for v in tr.values())
            clamped = sum(v["clamped"] for v in tr.values())
            how = (f"a {b.m.hutchinson_deflate}-step Lanczos basis per node counted exactly + {probes} deflated "
                   "Rademacher probes per node" if b.m.hutchinson_deflate else
                   f"{probes} Rademacher probes ({'one per node' if b.m.hutchinson_per_node else 'joint'})")
            notes.append(f"tr(H_ii) from {how} on {got['samples']} calibration samples; "
                         f"{unstable} of {len(tr)} traces with SE > 10 % of the trace; {clamped} "
                         "trace(s) below their SE (≤ 0 or noisy) counted as their SE")
            row["traces"] = tr
        elif kind == "hawq_gn":
            tr = got["traces"]
            unstable = sum(not v["stable"] for v in tr.values())
            units = sorted({v["probes"] for v in tr.values()})
            draws = next(iter(tr.values()))["draws"]
            notes.append(f"tr(GGN_ii) (Gauss-Newton, labels drawn from the model, {draws} draw(s) per sample) from "
                         f"{got['samples']} calibration samples ({units[0]} independent units); {unstable} of "
                         f"{len(tr)} traces with SE > 10 % of the trace; "
                         f"{sum(v['clamped'] for v in tr.values())} below their SE, counted as their SE")
            row["traces"] = tr
        else:
            notes.append(f"scores from {got['samples']} calibration samples")
        row["notes"] = notes
        return out
    return fn


def _count(levels) -> dict[str, int]:
    out: dict[str, int] = {}
    for lv in levels:
        out[lv] = out.get(lv, 0) + 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------- series (issue 13)
def series_data_free(bits: int, terms: int):
    def fn(b: Bench, row: dict) -> Path:
        from llc_onnx.model_io import save_model
        from llc_onnx.series import data_free

        t0 = time.perf_counter()
        res = data_free(b.fp_model, bits=bits, terms=terms, form="standard")
        out = b.out(row["key"])
        save_model(res.model, str(out))
        row["seconds"] = time.perf_counter() - t0
        row["report_bytes"] = int(res.nbytes)
        rel = [r / w.weight_norm for w in res.series.weights.values() for r in w.residual_norms[-1:]]
        row["notes"] = [f"data-free: every node {terms} term(s) of {bits} bits (no data, no validation); "
                        f"median relative residual ‖R_T‖/‖W‖ {float(np.median(rel)):.3g}"
                        + ("; not expanded: " + ", ".join(f"{k} ×{v}" for k, v in Counter(
                            r for _, r in res.skipped).most_common()) if res.skipped else "")]
        row["objective"] = None
        return out
    return fn


# ------------------------------------------------------------------------------- low-rank and plain SVD
def svd_uniform(b: Bench, row: dict) -> Path:
    from llc_onnx.model_io import save_model

    from bench.run import previous_row

    t0 = time.perf_counter()
    compact = b.rows.get("llc_lr_compact")
    if compact is not None and compact.get("status") == "ok" and compact.get("report_bytes"):
        compact_bytes = compact["report_bytes"]
    else:
        prev = previous_row(b.m.name, "llc_lr_compact", b.quick)
        if prev is None or prev.get("report_bytes") is None:
            raise B.NotApplicable("needs the llc low-rank compact result (its parameter count is the target)")
        compact_bytes = prev["report_bytes"]
    target = compact_bytes // 4
    factorable = [n for n in b.nodes if n.group == 1]  # grouped Conv cannot be factored, by llc or here
    target -= sum(int(np.prod(n.weight_shape)) for n in b.nodes if n.group != 1)
    weights = {n.name: _init(b.fp_model, n.weight) for n in factorable}
    shapes = {n.name: B.matrix_shape(n) for n in factorable}
    match = B.match_uniform_fraction(shapes, target)
    if match is None:
        raise B.NotApplicable(f"even rank 1 everywhere exceeds the target of {target} parameters")
    frac, params, ranks = match
    if all(r is None for r in ranks.values()):
        raise B.NotApplicable(f"the target ({target} params) is the unfactored size: no node factored")
    out = b.out(row["key"])
    save_model(B.uniform_svd(b.fp_model, factorable, weights, ranks), str(out))
    row["seconds"] = time.perf_counter() - t0
    row["notes"] = [f"rank fraction {frac:.4f} of min(K,N); {params} params vs target {target}; "
                    f"{sum(r is not None for r in ranks.values())}/{len(b.nodes)} nodes factored; no validation step"]
    return out


def _init(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t).astype(np.float64)
    raise KeyError(name)


# ------------------------------------------------------------------------------------------ registry
#: every blocked level offered at blocks 32 and 128, one chosen per node (issue 15's sizes between ORT b32 and b128);
#: levels 4, 8 and float and GPTQ rounding only (the prior of --rounding auto), which halves the candidates twice:
#: on 2 cores the default ladder at two block sizes measured SmolLM2 for hours
#: two workers (``--workers 2``): the candidate stage 1.83x faster on 2 cores, the same bytes (issue 15)
MIXB = ["--block-size", "32,128", "--bits", "4,8,float", "--auto-roundings", "gptq", "--workers", "2"]
#: MIXB with 2-bit levels too: issue 15's 0.125× (below the 4-bit block-128 floor) needs nodes under 4 bits
MIXB2 = ["--block-size", "32,128", "--bits", "2,4,8,float", "--auto-roundings", "gptq", "--workers", "2"]


def _methods() -> list[Method]:
    ms = [Method("fp32", "FP32", "fp32", fp32, latency=True),
          Method("ort_int8", "ORT INT8 QDQ (quantize_static)", "ort", ort_int8, issue="12", latency=True),
          Method("ort_dyn8", "ORT INT8 dynamic (quantize_dynamic)", "ort", ort_int8_dynamic, issue="12",
                 latency=True)]
    for algo, block, sym, label in (("default", 32, True, "default sym"), ("rtn", 32, True, "RTN sym"),
                                    ("gptq", 32, False, "GPTQ asym"), ("hqq", 32, False, "HQQ"),
                                    ("default", 128, True, "default sym"), ("hqq", 128, False, "HQQ")):
        ms.append(Method(f"ort_w4_{algo}_b{block}", f"ORT MatMulNBits 4-bit {label} b{block}", "ort",
                         ort_weight_only(algo, block, sym), issue="9/15", latency=True))
    cpu = ["--target", "ort-cpu"]
    ms += [Method("llc_cpu_lossless", "llc ort-cpu lossless", "llc", llc_method(cpu, cache="cpu"), issue="12",
                  latency=True),
           Method("llc_cpu_b25", "llc ort-cpu budget 0.25", "llc", llc_method(cpu + ["--budget", "0.25"], cache="cpu"),
                  issue="12", latency=True),
           Method("llc_cpu_at_ortw4", "llc ort-cpu at ORT 4-bit b32's size", "llc",
                  llc_at_row_size("ort_w4_default_b32", cpu, cache="cpu"), issue="15", latency=True),
           Method("llc_cpu_lat50", "llc ort-cpu latency budget 0.5", "llc",
                  llc_method(cpu + ["--latency-budget", "0.5"], cache="cpu"), issue="12", latency=True),
           Method("llc_cpu_lat66", "llc ort-cpu lossless, latency budget 0.66 (1.5× throughput)", "llc",
                  llc_method(cpu + ["--latency-budget", "0.66"], cache="cpu"), issue="12", latency=True),
           # 8-bit levels only: W8A8 MatMuls are what ORT CPU runs fast at sequence shapes (3.3-3.8x FP32 at 256
           # rows, MatMulNBits 0.9-1.4x), and a smaller ladder keeps a SmolLM2 run short on 2 cores
           Method("llc_cpu_w8_lat66", "llc ort-cpu lossless, 8-bit levels, latency budget 0.66", "llc",
                  llc_method(cpu + ["--bits", "8,float", "--latency-budget", "0.66"], cache="cpu_w8"), issue="12",
                  latency=True),
           # the same with a margin for timing noise: the fit and a later timing of one model differ by ~5-8 %
           Method("llc_cpu_w8_lat60", "llc ort-cpu lossless, 8-bit levels, latency budget 0.6", "llc",
                  llc_method(cpu + ["--bits", "8,float", "--latency-budget", "0.6"], cache="cpu_w8"), issue="12",
                  latency=True),
           # the budget held at both batches the bench times (--latency-batches): at batch 4 × 256 tokens
           # (1,024 rows per MatMul) the integer kernels gain less than at batch 1, so a plan fitted at the
           # calibration batch alone fell short there (SmolLM2: 1.55x at batch 1, 1.38x at batch 4)
           Method("llc_cpu_w8_lat60_bb", "llc ort-cpu lossless, 8-bit levels, latency budget 0.6 at both bench "
                  "batches", "llc", llc_at_bench_batches(cpu + ["--bits", "8,float", "--latency-budget", "0.6"],
                                                         cache="cpu_w8"), issue="12", latency=True),
           # with a latency budget ort-cpu also offers dynamic W8A8 (--w8a8-activations auto): 2.4-2.5x FP32 on
           # SmolLM2 with every MatMul dynamic, so a tighter budget than 0.6 may hold losslessly
           Method("llc_cpu_w8_lat45_bb", "llc ort-cpu lossless, 8-bit levels, latency budget 0.45 at both bench "
                  "batches", "llc", llc_at_bench_batches(cpu + ["--bits", "8,float", "--latency-budget", "0.45"],
                                                         cache="cpu_w8"), issue="12", latency=True),
           # MiniLM at batch 1: the fastest plan (every MatMul dynamic W8A8) measured 0.653x FP32's latency in the
           # latency fit, so 0.6 is refused there
           Method("llc_cpu_w8_lat70_bb", "llc ort-cpu lossless, 8-bit levels, latency budget 0.7 at both bench "
                  "batches", "llc", llc_at_bench_batches(cpu + ["--bits", "8,float", "--latency-budget", "0.7"],
                                                         cache="cpu_w8"), issue="12", latency=True),
           # the same with full-range codes (VNNI CPUs; refused elsewhere), as ORT's quantize_dynamic writes them
           Method("llc_cpu_c8_w8_lat70_bb", "llc ort-cpu lossless, 8-bit levels, 8-bit W8A8 codes, latency budget "
                  "0.7 at both bench batches", "llc",
                  llc_at_bench_batches(cpu + ["--w8a8-codes", "8", "--bits", "8,float", "--latency-budget", "0.7"],
                                       cache="cpu_c8w8"), issue="12", latency=True),
           # full-range W8A8 codes (VNNI CPUs; refused elsewhere) with percentile activation ranges: on the
           # Fashion-MNIST ResNet, every Conv W8A8, calibration file only: +0.0012 CE (7-bit, min-max) -> +0.0001
           Method("llc_cpu_c8p_lossless", "llc ort-cpu lossless, 8-bit W8A8 codes, percentile ranges", "llc",
                  llc_method(cpu + ["--w8a8-codes", "8", "--calibration", "percentile"], cache="cpu_c8p"), issue="12",
                  latency=True),
           Method("llc_cpu_c8p_lat66", "llc ort-cpu lossless, 8-bit W8A8 codes, percentile ranges, latency budget "
                  "0.66", "llc", llc_method(cpu + ["--w8a8-codes", "8", "--calibration", "percentile",
                                                   "--latency-budget", "0.66"], cache="cpu_c8p"), issue="12",
                  latency=True),
           Method("llc_cpu_c8p_lat66_bb", "llc ort-cpu lossless, 8-bit W8A8 codes, percentile ranges, latency "
                  "budget 0.66 at both bench batches", "llc",
                  llc_at_bench_batches(cpu + ["--w8a8-codes", "8", "--calibration", "percentile",
                                              "--latency-budget", "0.66"], cache="cpu_c8p"), issue="12",
                  latency=True),
           Method("llc_cpu_fid_lossless", "llc ort-cpu lossless, fidelity objective", "llc",
                  llc_method(cpu + ["--objective", "fidelity"], cache="cpu_fid"), issue="9", latency=True),
           Method("llc_cpu_fid_at_ortw4", "llc ort-cpu at ORT 4-bit b32's size, fidelity objective", "llc",
                  llc_at_row_size("ort_w4_default_b32", cpu + ["--objective", "fidelity"], cache="cpu_fid"),
                  issue="15", latency=True),
           Method("llc_cpu_fid48_lossless", "llc ort-cpu lossless, fidelity objective (4,8,float; GPTQ)", "llc",
                  llc_method(cpu + ["--objective", "fidelity", "--bits", "4,8,float", "--auto-roundings", "gptq"],
                             cache="cpu_fid48"), issue="9", latency=True),
           Method("llc_cpu_mixb_at_ortw4b128", "llc ort-cpu blocks 32,128 (4,8,float; GPTQ) at ORT 4-bit b128's size", "llc",
                  llc_at_row_size("ort_w4_default_b128", cpu + MIXB, cache="cpu_mixb"), issue="15", latency=True),
           Method("llc_cpu_mixb_at_ortw4", "llc ort-cpu blocks 32,128 (4,8,float; GPTQ) at ORT 4-bit b32's size", "llc",
                  llc_at_row_size("ort_w4_default_b32", cpu + MIXB, cache="cpu_mixb"), issue="15", latency=True),
           Method("llc_cpu_mixb_b20", "llc ort-cpu blocks 32,128 (4,8,float; GPTQ) budget 0.2", "llc",
                  llc_method(cpu + MIXB + ["--budget", "0.2"], cache="cpu_mixb"), issue="15", latency=True),
           # the same with MiniLM's separate 4,096-tweet validation file (--val)
           Method("llc_cpu_mixb_b20_val", "llc ort-cpu blocks 32,128 (4,8,float; GPTQ) budget 0.2, separate "
                  "validation file", "llc", llc_method(cpu + MIXB + ["--budget", "0.2"], cache="cpu_mixb_val",
                                                       val=True), issue="15", latency=True),
           Method("llc_cpu_mixb2_b125", "llc ort-cpu blocks 32,128 (2,4,8,float; GPTQ) budget 0.125", "llc",
                  llc_method(cpu + MIXB2 + ["--budget", "0.125"], cache="cpu_mixb2"), issue="15", latency=True),
           # issue 15's "MiniLM VERIFIED lossless at ≤ 0.20×": the qdq target's lossless plan was 0.213× (−0.0012)
           Method("llc_qdq_b20", "llc qdq budget 0.2", "llc", llc_method(["--target", "qdq", "--budget", "0.2"],
                                                                       cache="qdq"), target="qdq", issue="15"),
           # the same with a validation split 8x larger (MiniLM: 4,096 separate tweets; SE of a plan's difference
           # ~0.004 where 512 tweets gave ~0.009 and passed a +0.005 plan by chance)
           Method("llc_qdq_b20_val", "llc qdq budget 0.2, separate validation file", "llc",
                  llc_method(["--target", "qdq", "--budget", "0.2"], cache="qdq_val", val=True), target="qdq",
                  issue="15"),
           Method("llc_trt_lossless", "llc tensorrt lossless", "llc",
                  llc_method(["--target", "tensorrt"], cache="trt", check=check_tensorrt), target="tensorrt",
                  issue="12"),
           Method("llc_qdq_lossless", "llc qdq lossless", "llc", llc_method(["--target", "qdq"], cache="qdq"),
                  target="qdq", issue="9"),
           Method("llc_qdq_fid_lossless", "llc qdq lossless, fidelity objective", "llc",
                  llc_method(["--target", "qdq", "--objective", "fidelity"], cache="qdq_fid"), target="qdq",
                  issue="9")]
    for bud in BUDGETS:
        k = f"b{int(round(bud * 100))}"
        qb = ["--target", "qdq", "--budget", str(bud)]
        ms += [Method(f"llc_qdq_{k}", f"llc qdq budget {bud:g}", "llc", llc_method(qb, cache="qdq"), target="qdq",
                      issue="9/14"),
               Method(f"llc_qdq_fid_{k}", f"llc qdq budget {bud:g}, fidelity objective", "llc",
                      llc_method(qb + ["--objective", "fidelity"], cache="qdq_fid"), target="qdq", issue="9/15"),
               Method(f"hawq_{k}", f"HAWQ-V2 budget {bud:g}", "alloc", alloc_method("hawq", bud), target="qdq",
                      issue="9/14"),
               Method(f"hawqgn_{k}", f"HAWQ-V2 (Gauss-Newton traces) budget {bud:g}", "alloc",
                      alloc_method("hawq_gn", bud), target="qdq", issue="9"),
               Method(f"autoquant_{k}", f"AutoQuantize (ModelOpt score) budget {bud:g}", "alloc",
                      alloc_method("autoquant", bud), target="qdq", issue="9"),
               Method(f"cet_cost_{k}", f"CET cost allocation budget {bud:g}", "alloc",
                      llc_method(qb + ["--cost", "cet"], cache="qdq_cet"), target="qdq", issue="14")]
    for bits in (4, 2):
        for rounding in ("nearest", "llc", "gptq", "cet"):
            # every node at int{bits} (the only level; --budget 1: no lossless bound can drop it)
            extra = ["--target", "qdq", "--bits", str(bits), "--budget", "1", "--rounding", rounding]
            if rounding == "llc":
                extra += ["--llc-radius", "1"]  # LLC rounding on every node (the default stops at 5 % noise)
            ms.append(Method(f"round_{rounding}_int{bits}", f"uniform int{bits}, {rounding} rounding", "round",
                             llc_method(extra), target="qdq", issue="14"))
    for bits, terms in ((8, 1), (4, 1), (4, 2), (4, 3), (2, 1), (2, 2), (2, 3), (2, 4)):
        ms.append(Method(f"series_df_b{bits}t{terms}", f"series data-free b={bits} T={terms}", "series",
                         series_data_free(bits, terms), target="qdq", issue="13"))
    ms.append(Method("series_llc_lossless", "llc series lossless", "series",
                     llc_method(["--target", "qdq", "--method", "series"], cache="series"), target="qdq", issue="13"))
    for bud in BUDGETS:
        ms.append(Method(f"series_llc_b{int(round(bud * 100))}", f"llc series budget {bud:g}", "series",
                         llc_method(["--target", "qdq", "--method", "series", "--budget", str(bud)], cache="series"),
                         target="qdq", issue="13"))
    ms += [Method("llc_lr_lossless", "llc low-rank lossless", "lowrank",
                  llc_method(["--method", "lowrank", "--mode", "lossless"]), latency=True),
           Method("llc_lr_compact", "llc low-rank compact", "lowrank",
                  llc_method(["--method", "lowrank", "--mode", "compact"]), latency=True),
           Method("llc_lr_quant", "llc low-rank,quant (ort-cpu)", "lowrank",
                  llc_method(["--method", "lowrank,quant", "--mode", "compact"]), latency=True),
           Method("svd_uniform", "plain SVD (uniform rank)", "svd", svd_uniform, latency=True)]
    return ms


METHODS: list[Method] = _methods()
BY_KEY = {m.key: m for m in METHODS}


def method_scopes(spec: str) -> list[tuple[str, str]]:
    """``--methods`` items as (model, key prefix); model "" where the prefix applies to every model."""
    out = []
    for item in (p.strip() for p in spec.split(",")):
        scope, _, prefix = item.rpartition(":")
        if prefix:
            out.append((scope, prefix))
    return out


def selected(spec: str | None, model: str | None = None) -> list[Method]:
    """The methods whose key starts with one of the comma-separated prefixes (all when None); FP32 always. A
    prefix written ``MODEL:PREFIX`` (``smollm2:llc_cpu_w8``) applies to that bench model only, so one run can
    give each model its own extra rows."""
    if not spec:
        return list(METHODS)
    pre = [prefix for scope, prefix in method_scopes(spec) if not scope or scope == model]
    return [m for m in METHODS if m.key == "fp32" or any(m.key.startswith(p) for p in pre)]


def dump(obj) -> str:
    return json.dumps(obj, default=str)
