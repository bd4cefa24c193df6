"""``--report DIR``: an optimize result as report.json, report.md and report.html (tables and PNG plots).

The report is ``OptimizeResult.to_dict()``; this module only renders it. The HTML page (one self-contained
file: the plots are inline PNGs) opens with the verdict and the splits table (which data did what, both losses),
then the plots — the bits (or rank) chosen per node, predicted vs measured ΔL of every candidate (and with
``--compare-cet`` the CET second-order prediction vs measured, next to it), and the solver's frontier (predicted cost against bytes over budgets, with the plans measured on validation and the
chosen one marked) — and the tables: plans measured on validation, levels, nodes, end-to-end latency (when
measured) and time per stage. tests/test_report_browser.py opens it in headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import re

import matplotlib
import numpy as np

from .atomic import write_bytes_atomic
from .errors import LLCError
from .report import to_jsonable

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


#: plot captions, by file
CAPTIONS = {
    "levels.png": "Bits per weight chosen for each node (32 = left in float; low-rank: the rank kept).",
    "pred_vs_measured.png": "Every candidate's predicted loss change against the change measured with only that "
                            "node changed (x: outside the first-order neighbourhood; the dashed line is equality).",
    "cet_vs_measured.png": "The same candidates' CET second-order prediction (g·δ + ½Σλ(v·δ)² + ½ρ‖δ⊥‖², from the "
                           "measure part's curvature; --compare-cet) against the measured change; Spearman ρ of "
                           "each predictor with the measurement in the title.",
    "frontier.png": "The solver's frontier over byte budgets (predicted cost, left axis) and the plans measured "
                    "jointly on the validation split (loss change, right axis); the chosen plan in red, the "
                    "tolerance dashed.",
}
_KIND_COLORS = {"float": "#9a9a9a", "qdq": "#3b7dd8", "mnb": "#2a9d8f", "w8a8": "#e07b39", "rank": "#8e5ec9",
                "int": "#3b7dd8", "plugin": "#c9a227"}


def _level_rank(level: str) -> float:
    """Bits per stored weight code of a level name (``int4``, ``qdq-int4-b32``, ``mnb-int8-b32-acc4``,
    ``w8a8-int8c7-auint8``; 32 for float), or the rank of ``rank 12``; NaN when neither."""
    if level in ("float", "full"):
        return 32.0
    if level.startswith("rank"):
        return float(level.split()[1])
    m = re.search(r"int(\d+)", level)
    return float(m.group(1)) if m else float("nan")


def _level_kind(level: str) -> str:
    if level in ("float", "full"):
        return "float"
    return level.split("-")[0] if "-" in level else ("rank" if level.startswith("rank") else "int")


def _last(report: dict) -> dict:
    return report["stages"][-1]


def plot_levels(report: dict) -> bytes:
    st = _last(report)
    nodes = st["nodes"]
    fig, ax = plt.subplots(figsize=(max(5.2, 0.22 * len(nodes)), 3.4))
    kinds = [_level_kind(n["level"]) for n in nodes]
    ax.bar(range(len(nodes)), [_level_rank(n["level"]) for n in nodes],
           color=[_KIND_COLORS.get(k, "#3b7dd8") for k in kinds])
    ax.set_xticks(range(len(nodes)), [n["node"] for n in nodes], rotation=90, fontsize=8 if len(nodes) <= 30 else 6)
    if st["method"] == "quant":
        ax.set_ylabel("bits per weight (32 = float)")
        ax.set_yscale("log", base=2)
        ax.set_yticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "float"])
        ax.set_ylim(1.5, 40)
    else:
        ax.set_ylabel("rank")
    for kind in dict.fromkeys(kinds):
        ax.bar([0], [0], color=_KIND_COLORS.get(kind, "#3b7dd8"), label=kind)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="format", title_fontsize=7)
    ax.set_title(f"{st['method']}: chosen level per node")
    return _png(fig)


def plot_pred_vs_measured(report: dict) -> bytes:
    cands = _last(report)["candidates"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    levels = sorted({c["level"] for c in cands if not c["reference"]}, key=_level_rank)
    for lv in levels:
        cs = [c for c in cands if c["level"] == lv and c["measured"] is not None]
        for inside, marker in ((True, "o"), (False, "x")):
            pts = [c for c in cs if c["inside"] == inside]
            if pts:
                ax.scatter([c["predicted"] for c in pts], [c["measured"] for c in pts], marker=marker, s=14,
                           label=f"{lv}{'' if inside else ' (outside)'}")
    lim = [c for c in cands if c["measured"] is not None]
    _vs_measured_axes(ax, [(c["predicted"], c["measured"]) for c in lim], "predicted ΔL (first order)")
    ax.set_title("predicted vs measured, per node and level")
    return _png(fig)


def _vs_measured_axes(ax, pairs: list[tuple[float, float]], xlabel: str) -> None:
    """The equality line, symlog axes, labels and legend of a prediction-vs-measurement scatter."""
    if pairs:
        lo, hi = min(min(p) for p in pairs), max(max(p) for p in pairs)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-5)
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("measured ΔL (calibration, one node)")
    if pairs:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def spearman(a, b) -> float:
    """Spearman rank correlation of two sequences (ties broken by order; NaN below 3 values)."""
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def plot_cet_vs_measured(report: dict) -> bytes | None:
    """CET-predicted vs measured ΔL next to the first-order plot (None when no candidate has both)."""
    cands = [c for c in _last(report)["candidates"]
             if not c["reference"] and c["measured"] is not None and c.get("second_order") is not None]
    if not cands:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for lv in sorted({c["level"] for c in cands}, key=_level_rank):
        pts = [c for c in cands if c["level"] == lv]
        ax.scatter([c["second_order"] for c in pts], [c["measured"] for c in pts], s=14, label=lv)
    _vs_measured_axes(ax, [(c["second_order"], c["measured"]) for c in cands], "CET-predicted ΔL (second order)")
    meas = [c["measured"] for c in cands]
    ax.set_title(f"CET vs measured: Spearman {spearman([c['second_order'] for c in cands], meas):.2f} "
                 f"(first order {spearman([c['predicted'] for c in cands], meas):.2f})", fontsize=9)
    return _png(fig)


def plot_frontier(report: dict) -> bytes:
    """The solver's frontier: predicted Σ cost against bytes over budgets, and the validation-measured plans."""
    st = _last(report)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    fr = st.get("frontier") or []
    if fr:
        ax.plot([p["bytes"] / 1e6 for p in fr], [p["predicted"] for p in fr], "-", color="#3b7dd8",
                label="solver frontier (predicted Σ cost)")
    ref = report["splits"]["validation"]["reference"]["loss"]
    plans = st["plans"]
    ax2 = ax.twinx()
    ax2.scatter([p["bytes"] / 1e6 for p in plans], [p["val_loss"] - ref for p in plans], c="#888", s=18,
                label="plans measured on validation (ΔL)")
    chosen = [p for p in plans if p["plan"] == st["chosen_plan"]]
    if chosen:
        ax2.scatter([chosen[0]["bytes"] / 1e6], [chosen[0]["val_loss"] - ref], c="red", s=40, zorder=3,
                    label="chosen")
    ax2.axhline(report["tolerance"], color="k", ls="--", lw=0.8, label=f"tolerance {report['tolerance']:g}")
    ax.set_xlabel("weight MB (compressible nodes)")
    ax.set_ylabel("predicted Σ cost (calibration)")
    ax2.set_ylabel("validation ΔL (joint)")
    ax.set_title(f"{st['method']}: frontier and measured plans")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper right")
    return _png(fig)


def _splits_rows(report: dict) -> list[list]:
    rows = []
    order = ("calibration", "validation", "test")
    for name, sp in sorted(report["splits"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9):
        mets = ", ".join(f"{k} {v:.4f} → {sp['compressed']['metrics'].get(k, float('nan')):.4f}"
                         for k, v in sp["reference"]["metrics"].items())
        rows.append([f"{name} ({sp['n']})", sp["role"], f"{sp['reference']['loss']:.6f}",
                     f"{sp['compressed']['loss']:.6f}", f"{sp['delta']:+.6f}", mets])
    return rows


def _tables(report: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) of every table of the report, shared by the Markdown and HTML views."""
    out = [_splits_table(report)]
    for st in report["stages"]:
        out.append((f"{st['method']}: plans measured jointly on the validation split",
                    ["plan", "bytes", "validation loss", "passed", "raised"],
                    [[p["plan"] + (" (chosen)" if p["plan"] == st["chosen_plan"] else ""), f"{p['bytes']:,}",
                      f"{p['val_loss']:.6f}", "yes" if p["passed"] else "no", ", ".join(p["raised"])]
                     for p in st["plans"]]))
        out.append((f"{st['method']}: levels", ["level", "nodes"], [[k, v] for k, v in st["levels"].items()]))
        pc = st["plan_costs"]
        out.append((f"{st['method']}: how much of the plan kept ({pc.get('plan', 'solver')}) rests on gains",
                    ["summed costs", "summed gains", "gains credited", "predicted total"],
                    [[f"{pc['costs']:.4g}", f"{pc['gains']:.4g}", f"{pc['credited_gains']:.4g}",
                      f"{pc['predicted_total']:.4g}"]]))
        out.append((f"{st['method']}: nodes", ["node", "op", "shape", "level", "bytes", "predicted ΔL",
                                               "measured ΔL", "SE", "inside"],
                    [[n["node"], n["op"], n["shape"], n["level"], f"{n['bytes']:,}", f"{n['predicted']:.3g}",
                      "" if n["measured"] is None else f"{n['measured']:.3g}", f"{n['se']:.2g}",
                      "yes" if n["inside"] else "no"] for n in st["nodes"]]))
        if st.get("sweep"):
            out.append((f"{st['method']}: sweep (validation)", ["budget", "bytes", "validation loss"],
                        [[p["budget"], f"{p['bytes']:,}", f"{p['val_loss']:.6f}"] if p.get("bytes") is not None
                         else [p["budget"], "infeasible", p.get("note", "")] for p in st["sweep"]]))
    lat = (report.get("target") or {}).get("latency")
    if lat:
        out.append((f"Latency on {report['target']['name']} (ms per run, fastest of interleaved rounds)",
                     ["batch", "float", "compressed", "speed-up"],
                     [[b, f"{r['float_ms']:.4g}", f"{r['compressed_ms']:.4g}", f"{r['speedup']:.2f}x"]
                      for b, r in lat.items()]))
    out.append(("Time per stage (s)", ["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in report["seconds"].items()]))
    return out


def _splits_table(report: dict) -> tuple[str, list[str], list[list]]:
    return ("Splits: which data did what", ["split (n)", "role", "float loss", "compressed loss", "delta",
                                            "metrics (float → compressed)"], _splits_rows(report))


def _headline(report: dict) -> list[str]:
    t = report["splits"]["test"]
    b = report["bytes"]
    return [f"model: {report['model']} → {report.get('output') or '(not written)'}",
            f"status: {'VERIFIED' if report['verified'] else 'NOT VERIFIED'} — test loss "
            f"{t['compressed']['loss']:.6f} vs float {t['reference']['loss']:.6f} ({report['objective']} objective, "
            f"loss {report['loss']}, tolerance {report['tolerance']}), taken once in {report['target']['session']}",
            f"weight bytes (compressible nodes): {b['reference']:,} → {b['compressed']:,} "
            f"({100 * b['reduction']:.1f} % fewer)"] + [f"note: {n}" for n in report.get("notes", [])]


def markdown(report: dict) -> str:
    lines = [f"# llc-onnx {report['method']} report", ""] + [f"- {h}" for h in _headline(report)]
    for title, header, rows in _tables(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_NUMBER = re.compile(r"^[-+−]?[\d,]*\.?\d+(e[-+]?\d+)?( ?%|x)?$")


def _html_table(title: str, header: list[str], rows: list[list]) -> str:
    """A titled table; cells that are numbers are right-aligned (class ``num``)."""
    esc = html.escape

    def cell(c) -> str:
        text = str(c)
        return f"<td class='num'>{esc(text)}</td>" if _NUMBER.match(text) else f"<td>{esc(text)}</td>"

    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return (f"<section id='{slug}'><h2>{esc(title)}</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></section>")


def html_page(report: dict, plots: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page (module doc)."""
    esc = html.escape
    verdict = "VERIFIED" if report["verified"] else "NOT VERIFIED"
    status = "verified" if report["verified"] else "not-verified"
    heads = "".join(f"<li>{esc(h)}</li>" for h in _headline(report))
    first, *rest = _tables(report)
    imgs = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(d).decode()}' alt='{esc(n)}'>"
                   f"<figcaption>{esc(CAPTIONS.get(n, n))}</figcaption></figure>" for n, d in plots.items())
    style = ("body{font-family:sans-serif;max-width:1250px;margin:auto;padding:0 16px;color:#222}"
             "h1{margin-bottom:4px}h2{font-size:18px;margin:22px 0 6px}ul{margin-top:4px;line-height:1.45}"
             "table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}"
             "td.num{text-align:right;font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#fafafa}"
             ".verified{color:#176d17}.not-verified{color:#b01212}"
             ".plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}"
             "figure{margin:0;max-width:600px}figure img{max-width:100%}"
             "figcaption{font-size:12px;color:#555;margin-top:2px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llc-onnx {esc(report['method'])}: {verdict}"
            f"</title><style>{style}</style></head><body><h1 class='{status}'>llc-onnx {esc(report['method'])}: "
            f"{verdict}</h1><ul>{heads}</ul>{_html_table(*first)}<h2>Plots</h2><div class='plots'>{imgs}</div>"
            f"{''.join(_html_table(*t) for t in rest)}</body></html>")


def check_report_dir(directory: str) -> None:
    """Validate-before-write: the report directory must be creatable."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise LLCError(f"--report {directory}: exists and is not a directory; give a directory for the report")


def write_report(report: dict, directory: str) -> list[str]:
    """Write report.json, report.md, report.html and the plot PNGs into ``directory``; return the paths."""
    check_report_dir(directory)
    created_dir = not os.path.exists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise LLCError(f"--report {directory}: cannot create the directory ({exc.strerror}); choose another") from None
    paths: list[str] = []
    try:  # all files or none: an exception (an interrupt included) removes what this call wrote
        plots = {"levels.png": plot_levels(report), "pred_vs_measured.png": plot_pred_vs_measured(report),
                 "cet_vs_measured.png": plot_cet_vs_measured(report), "frontier.png": plot_frontier(report)}
        plots = {k: v for k, v in plots.items() if v is not None}
        files = [*plots.items(),
                 ("report.json", json.dumps(to_jsonable(report), indent=2, sort_keys=True, allow_nan=False).encode()),
                 ("report.md", markdown(report).encode()), ("report.html", html_page(report, plots).encode())]
        for name, data in files:
            paths.append(os.path.join(directory, name))  # before the write: an interrupt right after it is covered
            write_bytes_atomic(paths[-1], data)
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    return paths
