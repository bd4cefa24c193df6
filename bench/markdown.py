"""RESULTS.md from the rows of a benchmark run: per model a quality/size table, a latency table, the HAWQ-V2
traces and the checks against the llc result JSONs, then the standing "where llc-onnx wins and loses" table
(:func:`standing`, computed from the rows) and what every method is."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.rows import BUDGETS

HAND_MARKER = "<!-- hand-run benchmarks: everything below this line is kept by bench.run -->"

PROCEDURE = """\
**Procedure (issue 9).** Each model has a calibration file and a test file. llc-onnx holds out a seeded quarter of
the calibration file as the **validation** split (`--val-fraction 0.25`); the rest is the **calibration** split
(its fit part chooses roundings, its measure part measures costs). The solver's plan and a few alternatives
(the plan without gain credit, uniform levels) are measured jointly on the validation split, back-off acts
there, and the best plan seen is kept (`verify.select_plan`). The **test** split is evaluated once, on the
final model, for VERIFIED. The allocation baselines (HAWQ-V2, AutoQuantize) build the same context and go
through **the same `verify.select_plan` on the same validation split** with the same alternatives, margin and
rounds; only their per-candidate cost differs. ONNX Runtime's own quantizers and the data-free series rows have
no validation step (they choose nothing from data). Every model is then judged here, the same way: the test
split once, in the session of its target; columns "back-off", "first plan" and "plan kept" describe the
validation step (– where there is none)."""


def _f(x, nd=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}"


def _home(p) -> str:
    return str(p).replace(str(Path.home()), "~")


def metric_text(row: dict, metric: str) -> str:
    v = (row.get("test_metrics") or {}).get(metric)
    if v is None:
        return "–"
    return f"{100 * v:.2f} %" if metric == "top1" else f"{v:.3f}"


def _ok(rows: dict, k: str) -> bool:
    return rows.get(k) is not None and rows[k].get("status") == "ok" and rows[k].get("test_loss") is not None


def _sel(row: dict) -> tuple[str, str, str]:
    s = row.get("selection")
    if not s:
        return "–", "–", "–"
    return str(s["backoff_rounds"]), "yes" if s["first_plan_passed"] else "**no**", s["chosen_plan"]


def _levels(row: dict) -> str:
    lv = row.get("levels") or {}
    return ", ".join(f"{k}×{v}" for k, v in lv.items())


def _lat(row: dict, batch: int) -> dict | None:
    return next((x for x in row.get("latency") or [] if x.get("batch") == batch), None)


# ------------------------------------------------------------------------------------------ per model
def model_section(res: dict, n_runs: int, threads: int) -> list[str]:
    rows, metric = res["rows"], res["metric"]
    mname = "accuracy" if metric == "top1" else "perplexity"
    sp = res.get("splits") or {}
    split_text = (f"calibration {sp['calibration']['n']} samples (fit + measure), validation "
                  f"{sp['validation']['n']}, test {sp['test']['n']}" if sp else f"test {res.get('test_n')} samples")
    lines = [f"## {res['title']}", "",
             f"files: calibration `{_home(res['calib'])}`, test `{_home(res['test'])}`; splits as llc-onnx cut them: "
             f"{split_text}; loss `{res['loss']}`; llc `--measure-samples {res['measure_samples'] or 'default'}`; "
             f"{res['nodes']} compressible nodes, FP32 weight bytes {res['fp_bytes']:,}. " + (
                 f"Model wall time: {res['seconds_total'] / 60:.1f} min." if len({r.get('run') for r in rows}) <= 1
                 else f"Rows from {len({r.get('run') for r in rows})} runs."), ""]
    lines += [f"- {n}" for n in res.get("notes", [])]
    if n_runs > 1:
        by_run: dict[str, list[str]] = {}
        for r in rows:
            by_run.setdefault(r.get("run", "?"), []).append(r["label"])
        lines += [f"- rows from the run of {run}: {', '.join(labels)}" for run, labels in sorted(by_run.items())]
    lines += ["", "### Quality and size (test split, each model once, in its target's session)", "",
              f"| method | target | objective | weight bytes | × FP32 | test loss (Δ FP32) | test {mname} | "
              "KL to FP32 | FP32 top-1 agreement | VERIFIED | back-off rounds | first plan passed | plan kept | "
              "wall s | notes |", "|" + "---|" * 15]
    fp = next((r for r in rows if r["key"] == "fp32" and r.get("test_loss") is not None), None)
    for r in rows:
        if r["status"] != "ok" or r.get("test_loss") is None:
            lines.append(f"| {r['label']} | {r.get('target', '–')} | – | – | – | – | – | – | – | – | – | – | – | "
                         f"{_f(r.get('seconds'), 1)} | **{r['status']}**: {_home(r.get('reason', ''))} |")
            continue
        ver = "reference" if r["key"] == "fp32" else ("yes" if r.get("verified") else "**no**")
        d = f" ({r['test_loss'] - fp['test_loss']:+.4f})" if fp and r is not fp else ""
        rounds, first, kept = _sel(r)
        notes = [x for x in [_levels(r)] + list(r.get("notes", [])) if x]
        if r.get("report_bytes") is not None and r["report_bytes"] != r.get("bytes"):
            notes.append(f"llc's own count {r['report_bytes']:,} B")
        if r.get("session_note") and not r.get("llc"):  # llc rows say it in their own notes
            notes.append(r["session_note"])
        agree = r.get("agree_fp_top1")
        lines.append(
            f"| {r['label']} | {r.get('target')} | {r.get('objective') or '–'} | {r['bytes']:,} | {r['ratio']:.3f} | "
            f"{_f(r['test_loss'])}{d} | {metric_text(r, metric)} | {r['kl_fp']:.2e} | "
            f"{'–' if agree is None else f'{100 * agree:.2f} %'} | {ver} | {rounds} | {first} | {kept} | "
            f"{_f(r.get('seconds'), 1)} | {'; '.join(notes)} |")
    lines.append("")
    if res.get("plot"):
        lines += [f"![test loss vs weight bytes, {res['name']}]({res['plot_rel']})", ""]
    lat_rows = [r for r in rows if r.get("latency")]
    if lat_rows:
        bs = res.get("latency_batches") or sorted({x["batch"] for r in lat_rows for x in r["latency"]})
        lines += [f"### Latency and throughput (ONNX Runtime CPU, intra_op_num_threads={threads}, each model "
                  "timed in blocks interleaved with FP32; median (min–max) ms; samples/s and speed-up over FP32 from the "
                  "fastest rounds, the ratio of medians in brackets)", "",
                  "| method | " + " | ".join(f"batch {b}: ms | batch {b}: samples/s | batch {b}: × FP32" for b in bs)
                  + " |", "|---|" + "---|" * (3 * len(bs))]
        for r in lat_rows:
            cells = []
            for b in bs:
                x = _lat(r, b)
                if x is None:
                    cells += ["–", "–", "–"]
                    continue
                t = x.get("model") or x["fp32"]
                cells += [f"{t['median_ms']:.2f} ({t['min_ms']:.2f}–{t['max_ms']:.2f})",
                          f"{x.get('throughput', x['throughput_fp32']):,.1f}",
                          (f"{x['speedup']:.2f}×" + (f" ({x['speedup_median']:.2f}×)" if "speedup_median" in x else ""))
                          if "speedup" in x else "1.00×"]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += joint_table(rows, res["fp_bytes"])
    for gn in (False, True):
        hawq = next((r for r in rows if r.get("traces") and r["key"].startswith("hawqgn_") == gn), None)
        if not hawq:
            continue
        if gn:
            lines += ["### HAWQ-V2 Gauss-Newton traces per node (labels drawn from the model, calibration split)", "",
                      "| node | tr(GGN_ii) | standard error | independent units | SE ≤ 10 % | sensitivity used |",
                      "|---|---|---|---|---|---|"]
        else:
            lines += ["### HAWQ-V2 Hessian traces per node (Hutchinson, calibration split)", "",
                      "| node | tr(H_ii) | standard error | probes | SE ≤ 10 % | sensitivity used |",
                      "|---|---|---|---|---|---|"]
        for n, t in hawq["traces"].items():
            used = _f(t["sensitivity"], 4) + (" (clamped: trace below its SE)" if t["clamped"] else "")
            lines.append(f"| {n} | {t['trace']:.4g} | {t['se']:.2g} | {t['probes']} | "
                         f"{'yes' if t['stable'] else 'no'} | {used} |")
        lines.append("")
    checked = [r for r in rows if r.get("json_check")]
    if checked:
        bad = [(r, m) for r in checked for m in r["json_check"]["mismatches"]]
        lines += ["### Checks against the llc result JSON", ""]
        if not bad:
            what = sorted({k for r in checked for k in r["json_check"]["checked"]})
            lines.append(f"All {len(checked)} llc rows: {', '.join(what)} measured here equal the result JSON's "
                         "(losses to 1e-6 relative, bytes exactly).")
        else:
            lines += [f"- {r['label']}: {m}" for r, m in bad]
        lines.append("")
    cmds = [r for r in rows if r.get("command")]
    if cmds:
        lines += ["<details><summary>llc-onnx commands run</summary>", "", "```"]
        lines += [_home(r["command"]) for r in cmds]
        lines += ["```", "", "</details>", ""]
    if res.get("extra"):
        lines += ["FP32 and every model on **all 20 original foolbox images** (true labels; the 10 even-indexed ones "
                  "are the sources of the calibration views, so this is not held-out):", "",
                  "| method | CE | correct |", "|---|---|---|"]
        lines += [f"| {k} | {v['ce']:.3f} | {v['correct']}/{v['n']} |" for k, v in res["extra"].items()]
        lines.append("")
    return lines


def _joint_rounds(r: dict) -> list[dict] | None:
    """The row's joint re-solve rounds (``settings.joint`` of its quantization stage): from the row's summary,
    else from its result JSON when that file is still there (rows summarised before the field existed)."""
    for st in (r.get("llc") or {}).get("stages", []):
        if st.get("joint"):
            return st["joint"]
    path = r.get("result_json")
    if path and Path(path).is_file():
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        for st in d.get("stages", []):
            j = (st.get("settings") or {}).get("joint")
            if j:
                return j
    return None


def joint_table(rows: list[dict], fp_bytes: int) -> list[str]:
    """Issue 15's table: per llc row and joint round, the solver plan's predicted sum of per-node costs against
    the plan measured with every node compressed at once (calibration measure part), ± its standard error."""
    out = []
    for r in rows:
        if r.get("status") != "ok" or not r.get("llc"):
            continue
        for j in _joint_rounds(r) or []:
            gap = j["joint"] - j["predicted"]
            out.append(f"| {r['label']} | {j['round']} | {j['bytes'] / fp_bytes:.3f} | {j['predicted']:+.4f} | "
                       f"{j['joint']:+.4f} ± {j['se']:.4f} | {gap:+.4f} ({abs(gap) / max(j['se'], 1e-12):.1f} SE) |")
    if not out:
        return []
    return ["### Predicted sum vs joint measurement (calibration measure part, before validation)", "",
            "Each quantization run's solver plan is measured with all its nodes compressed at once; when the joint "
            "loss change exceeds the predicted sum of per-node costs, the gap is attributed to the nodes and the "
            "knapsack re-solved (`--joint-rounds`, default 2). Round 0 is the first plan.", "",
            "| method | round | × FP32 | predicted Σ ΔL | joint ΔL ± SE | gap (in joint SEs) |", "|---|---|---|---|---|---|",
            *out, ""]


# ------------------------------------------------------------------------------------------ standing
def _desc(r: dict | None, fp_loss: float) -> str:
    if r is None:
        return "not run"
    if r.get("status") != "ok" or r.get("test_loss") is None:
        return f"{r.get('status')}"
    return (f"{r['ratio']:.3f}×, test {r['test_loss']:.4f} ({r['test_loss'] - fp_loss:+.4f}), "
            f"{'verified' if r.get('verified') else 'not verified'}")


def _speed(r: dict, batch: int) -> float | None:
    x = _lat(r, batch)
    return None if x is None else x.get("speedup")


def _best(cands: dict[str, dict]) -> str:
    best = min(cands, key=lambda k: cands[k]["test_loss"])
    others = [k for k in cands if k != best]
    if not others:
        return f"only {best} ran"
    runner = min(others, key=lambda k: cands[k]["test_loss"])
    gap = cands[runner]["test_loss"] - cands[best]["test_loss"]
    return (f"**{best}** lowest test loss, by {gap:.4f} over {runner}" if gap >= 5e-5
            else f"{best} and {runner} tied (within 0.00005)")


def standing(results: list[dict]) -> list[str]:
    """The comparison the benchmark exists for, computed from the rows (test loss decides; Δ against FP32)."""
    out = ["## Where llc-onnx wins and loses (computed from the rows above)", "",
           "Test loss decides; every allocation row (llc, HAWQ-V2, AutoQuantize, CET cost) went through the same "
           "validation back-off; speed-ups are ONNX Runtime CPU, interleaved with FP32.", "",
           "| model | point | llc-onnx | baseline(s) | outcome |", "|---|---|---|---|---|"]
    passed, total = 0, 0
    for res in results:
        if "rows" not in res:
            continue
        rows = {r["key"]: r for r in res["rows"]}
        if not _ok(rows, "fp32"):
            continue
        fl = rows["fp32"]["test_loss"]
        name = res["name"]
        bl = res.get("latency_batches") or [1]
        for r in res["rows"]:
            if r.get("status") == "ok" and r.get("selection") and r["family"] in ("llc", "alloc", "lowrank", "series"):
                total += 1
                passed += bool(r["selection"]["first_plan_passed"])
        # 1. lossless on ORT CPU vs ONNX Runtime's INT8 (issue 12)
        llc, ort = rows.get("llc_cpu_lossless"), rows.get("ort_int8")
        if _ok(rows, "llc_cpu_lossless"):
            ort_ok = _ok(rows, "ort_int8")
            sp = ", ".join(f"b={b} {_speed(llc, b):.2f}×" for b in bl if _speed(llc, b) is not None)
            osp = ", ".join(f"b={b} {_speed(ort, b):.2f}×" for b in bl if ort_ok and _speed(ort, b) is not None)
            if ort_ok:
                verdict = ("smaller" if llc["bytes"] < ort["bytes"] else "larger") + \
                    f", test loss {'lower' if llc['test_loss'] < ort['test_loss'] else 'higher'} by " \
                    f"{abs(llc['test_loss'] - ort['test_loss']):.4f}"
                verdict = f"llc-onnx {verdict} than ORT INT8"
                if sp and osp:
                    faster = all((_speed(llc, b) or 0) >= (_speed(ort, b) or 0) for b in bl)
                    verdict += f"; {'at least as fast as it at every batch' if faster else 'slower at some batch'}"
            else:
                verdict = "ORT INT8 did not run"
            out.append(f"| {name} | lossless, ort-cpu / ORT INT8 | {_desc(llc, fl)}{'; ' + sp if sp else ''} | "
                       f"ORT INT8: {_desc(ort, fl)}{'; ' + osp if osp else ''} | {verdict} |")
        # issue 12's done-when, checked on the lossless rows (plain, and with the latency budget of 1.5× speed)
        quant = [rows[k] for k in rows if k.startswith("ort_") and _ok(rows, k)]
        for key, what in (("llc_cpu_lossless", "lossless ort-cpu"),
                          ("llc_cpu_lat66", "lossless ort-cpu, latency budget 0.66"),
                          ("llc_cpu_w8_lat66", "lossless ort-cpu, 8-bit levels, latency budget 0.66"),
                          ("llc_cpu_w8_lat60", "lossless ort-cpu, 8-bit levels, latency budget 0.6"),
                          ("llc_cpu_w8_lat60_bb", "lossless ort-cpu, 8-bit levels, latency budget 0.6 at both "
                           "batches"),
                          ("llc_cpu_c8p_lossless", "lossless ort-cpu, 8-bit W8A8 codes, percentile ranges"),
                          ("llc_cpu_c8p_lat66", "lossless ort-cpu, 8-bit W8A8 codes, percentile ranges, latency "
                           "budget 0.66"),
                          ("llc_cpu_c8p_lat66_bb", "lossless ort-cpu, 8-bit W8A8 codes, percentile ranges, latency "
                           "budget 0.66 at both batches")):
            if not _ok(rows, key):
                continue
            llc = rows[key]
            checks = {"test loss ≤ FP32": llc["test_loss"] <= fl, "bytes ≤ 0.30×": llc["ratio"] <= 0.30}
            for b in bl:
                s = _speed(llc, b)
                if s is not None:
                    checks[f"≥ 1.5× FP32 throughput at b={b}"] = s >= 1.5
                    best = max((_speed(q, b) or 0 for q in quant), default=0)
                    if best:
                        checks[f"≥ ORT's fastest quantized at b={b}"] = s >= best
            miss = [k for k, v in checks.items() if not v]
            out.append(f"| {name} | issue 12 done-when ({what}) | " + "; ".join(
                f"{k}: {'yes' if v else '**no**'}" for k, v in checks.items()) + " | – | "
                + ("**met**" if not miss else f"not met: {', '.join(miss)}") + " |")
        for key, frac in (("llc_cpu_lat50", 0.5), ("llc_cpu_lat66", 0.66), ("llc_cpu_w8_lat66", 0.66), ("llc_cpu_w8_lat60", 0.6),
                          ("llc_cpu_w8_lat60_bb", 0.6), ("llc_cpu_c8p_lat66", 0.66),
                          ("llc_cpu_c8p_lat66_bb", 0.66)):
            if not _ok(rows, key):
                continue
            r = rows[key]
            out.append(f"| {name} | latency budget {frac:g} (ort-cpu) | {_desc(r, fl)} | – | measured: "
                       + "; ".join(f"b={b} " + ("not timed" if _speed(r, b) is None else
                                                f"{1 / _speed(r, b):.2f}× FP32 latency, "
                                                + ("**met**" if 1 / _speed(r, b) <= frac else "**not met**"))
                                   for b in bl) + " |")
        if rows.get("llc_trt_lossless", {}).get("tensorrt_check") is not None:
            v = rows["llc_trt_lossless"]["tensorrt_check"]
            out.append(f"| {name} | tensorrt lossless: checker | {_desc(rows['llc_trt_lossless'], fl)} | – | "
                       + ("**passes**" if not v else f"**{len(v)} violation(s)**") + " |")
        # 2. allocations at each budget (issues 9, 14)
        for bud in BUDGETS:
            k = f"b{int(round(bud * 100))}"
            cands = {lab: rows[key] for lab, key in (("llc-onnx", f"llc_qdq_{k}"), ("HAWQ-V2", f"hawq_{k}"),
                                                     ("AutoQuantize", f"autoquant_{k}"), ("CET cost", f"cet_cost_{k}"))
                     if _ok(rows, key)}
            if "llc-onnx" not in cands or len(cands) < 2:
                continue
            others = [lab for lab in cands if lab != "llc-onnx"]
            out.append(f"| {name} | budget {bud:g} (qdq) | {_desc(cands['llc-onnx'], fl)} | "
                       + "; ".join(f"{lab}: {_desc(cands[lab], fl)}" for lab in others) + f" | {_best(cands)} |")
        # 3. ONNX Runtime's weight-only quantizers vs the llc rows at its size (within 5 % below it; else the one
        #    nearest in size below) (issues 9, 15)
        llc_rows = [r for r in res["rows"] if r["family"] == "llc" and r.get("status") == "ok"
                    and r.get("test_loss") is not None]
        for key, o in rows.items():
            if not (key.startswith("ort_w4_") and _ok(rows, key)):
                continue
            near = [r for r in llc_rows if r["ratio"] <= o["ratio"] * 1.005]
            if not near:
                out.append(f"| {name} | {o['label']} | no llc row at ≤ its size | {_desc(o, fl)} | – |")
                continue
            close = [r for r in near if r["ratio"] >= o["ratio"] * 0.95] or [max(near, key=lambda r: r["ratio"])]
            for n_ in close:
                better = "llc-onnx" if n_["test_loss"] < o["test_loss"] else "ONNX Runtime"
                out.append(f"| {name} | {o['label']} vs {n_['label']} | {_desc(n_, fl)} | {_desc(o, fl)} | "
                           f"**{better}** lower test loss by {abs(n_['test_loss'] - o['test_loss']):.4f} |")
        # 4. fidelity vs task objective (issue 9)
        for t in ("cpu", "qdq"):
            a, f = rows.get(f"llc_{t}_lossless"), rows.get(f"llc_{t}_fid_lossless")
            if _ok(rows, f"llc_{t}_lossless") and _ok(rows, f"llc_{t}_fid_lossless"):
                out.append(f"| {name} | objective fidelity vs task ({t}) | fidelity: {_desc(f, fl)}, KL {f['kl_fp']:.2e} | "
                           f"task: {_desc(a, fl)}, KL {a['kl_fp']:.2e} | test loss "
                           f"{'lower with fidelity' if f['test_loss'] < a['test_loss'] else 'lower with task'} by "
                           f"{abs(f['test_loss'] - a['test_loss']):.4f}; KL to FP32 "
                           f"{'lower with fidelity' if f['kl_fp'] < a['kl_fp'] else 'lower with task'} |")
        # 5. rounding (issue 14)
        for bits in (4, 2):
            cands = {lab: rows[f"round_{lab}_int{bits}"] for lab in ("cet", "llc", "gptq", "nearest")
                     if _ok(rows, f"round_{lab}_int{bits}")}
            if len(cands) >= 2:
                out.append(f"| {name} | uniform int{bits} rounding | "
                           + (f"CET: {_desc(cands['cet'], fl)}" if "cet" in cands else "CET: not run / refused")
                           + " | " + "; ".join(f"{lab}: {_desc(r, fl)}" for lab, r in cands.items() if lab != "cet")
                           + f" | {_best(cands)} |")
        # 6. series (issue 13): each multi-term data-free row vs the single-level row nearest in bytes
        single = [r for k, r in rows.items() if _ok(rows, k) and (k.endswith("t1") and k.startswith("series_df")
                                                                   or k.startswith("llc_qdq_b"))]
        for k, r in rows.items():
            if not (k.startswith("series_") and not k.endswith("t1") and _ok(rows, k)) or not single:
                continue
            near = min(single, key=lambda s: abs(s["bytes"] - r["bytes"]))
            gap = abs(r["test_loss"] - near["test_loss"])
            better = "series" if r["test_loss"] < near["test_loss"] else "single-level"
            verdict = f"**{better}** lower test loss by {gap:.4f}" if gap >= 5e-5 else "tied (within 0.00005)"
            out.append(f"| {name} | {r['label']} vs {near['label']} (nearest in bytes) | {_desc(r, fl)} | "
                       f"{_desc(near, fl)} | {verdict}{', at ' + ('more' if r['bytes'] > near['bytes'] else 'fewer')} "
                       "bytes |")
        # 7. low-rank
        if _ok(rows, "llc_lr_compact"):
            svd, c = rows.get("svd_uniform"), rows["llc_lr_compact"]
            verdict = ((("**llc-onnx**" if c["test_loss"] < svd["test_loss"] else "**plain SVD**")
                        + f" lower test loss by {abs(c['test_loss'] - svd['test_loss']):.4f}") if _ok(rows, "svd_uniform")
                       else f"plain SVD {(svd or {}).get('status', 'not run')}: {(svd or {}).get('reason', '')}")
            out.append(f"| {name} | low-rank compact | {_desc(c, fl)} | plain SVD: {_desc(svd, fl)} | {verdict} |")
        if _ok(rows, "llc_lr_quant") and _ok(rows, "llc_cpu_lossless"):
            a, q = rows["llc_lr_quant"], rows["llc_cpu_lossless"]
            verdict = ("the same model: the low-rank stage kept every node" if a["bytes"] == q["bytes"] and
                       a["test_loss"] == q["test_loss"] else
                       f"composition {'smaller' if a['bytes'] < q['bytes'] else 'not smaller'} ({a['ratio']:.3f}× vs "
                       f"{q['ratio']:.3f}×), test loss {'lower' if a['test_loss'] < q['test_loss'] else 'higher'} by "
                       f"{abs(a['test_loss'] - q['test_loss']):.4f}")
            out.append(f"| {name} | low-rank,quant vs quant (ort-cpu) | {_desc(a, fl)} | llc ort-cpu lossless: "
                       f"{_desc(q, fl)} | {verdict} |")
    out.append("")
    if total:
        out += [f"The solver's first plan passed the validation split in **{passed} of {total}** rows that have a "
                "validation step (the others needed back-off or kept another plan).", ""]
    return out


# ------------------------------------------------------------------------------------------ the file
NOTES = """## What each method is

Row keys (`python -m bench.run --list`) in brackets; "issue" = the issue the row reports for.

- **FP32** [`fp32`]: the prepared float model (opset 21, node names filled in).
- **ORT INT8 QDQ** [`ort_int8`]: `onnxruntime.quantization.quantize_static` after `quant_pre_process`, QDQ,
  per-channel symmetric INT8 weights, INT8 activations, MinMax calibration over the whole calibration file.
- **ORT MatMulNBits 4-bit** [`ort_w4_<algo>_b<block>`]: ONNX Runtime's `matmul_nbits_quantizer` — `default`
  (affine, symmetric), `rtn`, `gptq` (asymmetric; ONNX Runtime's copy of Intel Neural Compressor's, on the
  calibration file) and `hqq` (float zero points) — at blocks 32 and 128, MatMul nodes only (Conv/Gemm stay
  float: n/a on the conv models), the nodes written with `accuracy_level=4` (what ORT's CPU runs fast, as llc's
  ort-cpu target). Bytes include their scales and zero points.
- **llc rows** [`llc_*`, `cet_cost_*`, `round_*`, `series_llc_*`]: `llc-onnx optimize` as a subprocess with
  `--json --allow-loss-increase --no-latency` (the commands are listed under each model): `--target ort-cpu`
  lossless / `--budget 0.25` / `--latency-budget 0.5` / `--objective fidelity` (issue 12, 9), `--target tensorrt`
  checked by `llc_onnx.targets.check_tensorrt` (issue 12), `--target qdq` lossless, fidelity and budgets 0.25,
  0.15, 0.10 (the allocation comparison), `--cost cet` at those budgets (issue 14), `--bits B --budget 1
  --rounding nearest|llc|gptq|cet` (every node at B bits; `llc` with `--llc-radius 1` so LLC rounding acts on
  every node; issue 14), `--method series` (issue 13). Their rounding is llc-onnx's default (`--rounding auto`:
  LLC inside the first-order neighbourhood, elsewhere the better of nearest and GPTQ per level, measured). A flag the CLI does not have yet is a "refused" row with its
  error line. Runs with the same candidate settings share measurements through `--cache`; the reused
  seconds are added to each row's time (the row's time is the whole method's).
- **HAWQ-V2** [`hawq_b*`]: cost of format f of node i = ½·tr(H_ii)/n_i·‖δ_if‖², nearest rounding (HAWQ-V2 and
  AutoQuantize choose bit-widths, not roundings), same formats,
  knapsack, rewrite and validation back-off as llc's qdq rows. tr(H_ii) by Hutchinson in rounds until every
  trace has SE ≤ 10 % or the model's probe cap is reached — one Rademacher probe over all nodes per sample
  (HAWQ-V2's own estimator), one per node, or per node deflated by a Lanczos basis whose trace is counted
  exactly (the same unbiased trace at a lower variance), as the model's table says; a trace still below its
  standard error counts as that SE, whatever its sign (never a free node, and a noisy small positive trace
  is not cheaper than a noisy negative one). Traces and SEs are listed per model.
- **HAWQ-V2, Gauss-Newton traces** [`hawqgn_b*`]: the same cost and procedure with tr(GGN_ii), the
  Gauss-Newton part of H_ii (positive semi-definite), for models whose H_ii is indefinite at the trained
  weights (MiniLM: Hessian traces near 0 or negative, no stable estimate): each calibration sample's
  ‖∇_W ℓ_s‖² with its label drawn from the model's own softmax, one forward and backward per batch for every
  node (`calib.fisher.fisher_traces`); standard error over samples (clusters where the data has `groups`).
- **AutoQuantize** [`autoquant_b*`]: NVIDIA ModelOpt's gradient score in output space, per node and format
  Σ_batches Σ (∂L_b/∂y)²·(y_f − y)² (L_b the batch's mean loss, y the node's output, y_f its output with the
  format's quantizers on the float model's input to the node), made monotone over the formats as ModelOpt
  does; then the same knapsack, rewrite and validation back-off. It replaces the earlier "Fisher diag" row (the
  squared mean weight gradient), which was not what AutoQuantize computes.
- **series data-free** [`series_df_b<b>t<T>`]: `llc_onnx.series.data_free`, every node T terms of b bits, no
  data, standard ONNX form, judged in the qdq session; T = 1 rows are single-level nearest quantization.
- **low-rank** [`llc_lr_*`]: `--method lowrank --mode lossless|compact`, `--method lowrank,quant` (default
  target); **plain SVD** [`svd_uniform`]: one rank fraction for every node at llc compact's parameter count.

Columns: weight bytes = constant weights of MatMul/Gemm/Conv/MatMulNBits nodes in the written file (through
DequantizeLinear: packed integers + scales + zero points; biases excluded), the same count for every row
(`bench.baselines.weight_bytes`; llc's own count shown when it differs). Test loss / metric / KL to FP32 /
FP32 top-1 agreement: the test split once, in the row's target session (`bench.evaluate`). KL to FP32 is
what `--objective fidelity` verifies (mean per position). VERIFIED: llc rows — the CLI's verdict (task:
test loss ≤ FP32's; fidelity: test KL ≤ 0.002 nats, `--tolerance`'s default); other rows — test loss ≤ FP32's. Wall s: the whole method
(llc: the subprocess, with reused cached measurements added; allocation baselines: context, quantization,
scores and the validation step, the shared part counted in every row); never the evaluation or latency here.

## Limits of this comparison

- ORT's weight-only quantizers rewrite MatMul nodes only: n/a on the conv models (Fashion-MNIST, EfficientNet).
- ORT INT8 quantizes activations; llc's ort-cpu target does where its formats need it (W8A8), its qdq rows do not.
- HAWQ-V2 sees weight noise only; AutoQuantize sees the activation quantizers too (on qdq rows there are none).
- Latency depends on the fusions ORT applies to each graph, on this CPU, with other jobs running: compare the
  speed-ups (interleaved with FP32), not single numbers."""


def write_markdown(results: list[dict], args, path: Path, started: str, wall: float, mach: dict) -> None:
    from bench.run import runs_of

    runs = runs_of(results)
    kind = "QUICK run (--quick)" if args.quick else "full run"
    lines = [f"# llc-onnx benchmark results — {kind}", "",
             f"- {'last run' if len(runs) > 1 else 'date'}: {started} (wall time {wall / 60:.1f} min)",
             f"- machine: {mach['cpus']} CPU(s), {mach['cpu']}; Python {mach['python']}, onnxruntime "
             f"{mach['onnxruntime']}, torch {mach['torch']}, onnx {mach['onnx']}, numpy {mach['numpy']}; "
             f"load average at the end {mach['loadavg_at_end']}",
             f"- command: `{args.command_line}`"]
    if len(runs) > 1:
        lines += [f"- this file merges the rows of {len(runs)} runs (each model lists which rows come from which run):"]
        lines += [f"  - {r}" for r in runs]
    lines += ["", PROCEDURE, ""]
    if args.quick:
        lines += ["> **Quick run on a shared, noisy machine.** Fashion-MNIST only, seeded 2,000-image calibration "
                  "and test subsets, `--measure-samples 500`. Other jobs were running on the same cores, so wall "
                  "times and latencies are noisy; losses and sizes are deterministic.", ""]
    for res in results:
        if "error" in res:
            lines += [f"## {res.get('title', res['name'])}", "", f"**Could not run:** {res['error']}", ""]
            continue
        if res.get("plot"):
            res["plot_rel"] = os.path.relpath(res["plot"], path.parent)
        lines += model_section(res, len(runs), getattr(args, "threads", 2))
    lines += standing(results)
    lines += [NOTES]
    kept = ""
    if path.exists() and HAND_MARKER in path.read_text():
        kept = path.read_text()[path.read_text().index(HAND_MARKER):]
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
