"""``--report DIR``: the optimize result as report.json, report.md and report.html (with PNG plots).

The report is a plain dict (see ``flows.summary``); this module only renders it. Plots: the level chosen per
node, predicted vs measured ΔL of every candidate, and held-out loss against size (sweep points, the chosen
model and the float model).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

import matplotlib

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


def _level_rank(level: str) -> float:
    if level == "float":
        return 32.0
    if level.startswith("int"):
        return float(level[3:])
    if level.startswith("rank"):
        return float(level.split()[1])
    return float("nan")


def plot_levels(report: dict) -> bytes:
    nodes = report["nodes"]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(nodes)), 3.2))
    vals = [_level_rank(n["level"]) for n in nodes]
    ax.bar(range(len(nodes)), vals, color="#3b7dd8")
    ax.set_xticks(range(len(nodes)), [n["node"] for n in nodes], rotation=90, fontsize=6)
    ax.set_ylabel("bits (32 = float)" if report["method"] == "quant" else "rank")
    ax.set_title("chosen level per node")
    return _png(fig)


def plot_pred_vs_measured(report: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    levels = sorted({c["level"] for c in report["candidates"] if not c["reference"]}, key=_level_rank)
    for lv in levels:
        cs = [c for c in report["candidates"] if c["level"] == lv and c["measured"] is not None]
        for inside, marker in ((True, "o"), (False, "x")):
            pts = [c for c in cs if c["inside"] == inside]
            if pts:
                ax.scatter([c["predicted"] for c in pts], [c["measured"] for c in pts], marker=marker, s=14,
                           label=f"{lv}{'' if inside else ' (outside)'}")
    lim = [c for c in report["candidates"] if c["measured"] is not None]
    if lim:
        lo = min(min(c["predicted"], c["measured"]) for c in lim)
        hi = max(max(c["predicted"], c["measured"]) for c in lim)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-5)
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.set_xlabel("predicted ΔL (first order)")
    ax.set_ylabel("measured ΔL (calibration)")
    ax.legend(fontsize=6)
    ax.set_title("predicted vs measured, per node and level")
    return _png(fig)


def plot_loss_vs_size(report: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    sw = [p for p in report.get("sweep") or [] if p.get("bytes") is not None]
    if sw:
        ax.plot([p["bytes"] / 1e6 for p in sw], [p["held_loss"] for p in sw], "o-", label="solver sweep")
    ax.scatter([report["bytes"]["compressed"] / 1e6], [report["held"]["compressed"]["loss"]], c="red", zorder=3,
               label="chosen")
    ax.axhline(report["held"]["reference"]["loss"], color="k", ls="--", lw=0.8, label="float (held-out)")
    ax.set_xlabel("weight MB (compressible nodes)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7)
    return _png(fig)


def markdown(report: dict) -> str:
    held, cal = report["held"], report["calibration"]
    lines = [
        f"# llc-onnx {report['method']} report",
        "",
        f"- model: `{report['model']}` → `{report.get('output') or '(not written)'}`",
        f"- status: **{'VERIFIED' if report['verified'] else 'NOT VERIFIED'}** (held-out loss "
        f"{held['compressed']['loss']:.6f} vs float {held['reference']['loss']:.6f}, tolerance {report['tolerance']})",
        f"- weight bytes (compressible nodes): {report['bytes']['reference']:,} → {report['bytes']['compressed']:,} "
        f"({100 * report['bytes']['reduction']:.1f} % fewer)",
        "",
        "| split | float loss | compressed loss | metrics (float → compressed) |",
        "|---|---|---|---|",
    ]
    for name, part in (("calibration", cal), ("held-out", held)):
        mets = ", ".join(f"{k} {part['reference']['metrics'][k]:.4f} → {part['compressed']['metrics'].get(k, float('nan')):.4f}"
                         for k in part["reference"]["metrics"])
        lines.append(f"| {name} ({part['n']}) | {part['reference']['loss']:.6f} | {part['compressed']['loss']:.6f} | {mets} |")
    if report.get("stages"):
        lines += ["", "## Stages", "", "| stage | levels | bytes after | held-out loss | verified |", "|---|---|---|---|---|"]
        for st in report["stages"]:
            levels = ", ".join(f"{k}×{v}" for k, v in st["levels"].items())
            lines.append(f"| {st['method']} | {levels} | {st['bytes']['compressed']:,} | "
                         f"{st['held']['compressed']['loss']:.6f} | {st['verified']} |")
    lines += ["", "## Levels", "", "| level | nodes |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["levels"].items()]
    lines += ["", "## Nodes", "", "| node | op | shape | level | bytes | predicted ΔL | measured ΔL | inside |",
              "|---|---|---|---|---|---|---|---|"]
    for n in report["nodes"]:
        meas = "" if n["measured"] is None else f"{n['measured']:.3g}"
        lines.append(f"| {n['node']} | {n['op']} | {n['shape']} | {n['level']} | {n['bytes']:,} | "
                     f"{n['predicted']:.3g} | {meas} | {n['inside']} |")
    lines += ["", "## Back-off rounds (held-out)", "", "| round | held-out loss | bytes | raised |", "|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {r['held_loss']:.6f} | {r['bytes']:,} | {', '.join(r['raised'])} |")
    if report.get("sweep"):
        lines += ["", "## Sweep (held-out)", "", "| budget | bytes | held-out loss |", "|---|---|---|"]
        lines += [f"| {p['budget']} | {p['bytes']:,} | {p['held_loss']:.6f} |" if p.get("bytes") is not None
                  else f"| {p['budget']} | infeasible | {p.get('note', '')} |" for p in report["sweep"]]
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["seconds"].items()]
    lines += ["", f"Neighbourhood check: |measured − predicted| ≤ {report['error_max']}"
              f"{' × |L|' if report.get('relative') else ''}; levels outside it are "
              f"{'costed by their measured ΔL' if report['outside'] == 'measured' else 'dropped'}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory: str) -> list[str]:
    """Write report.json, report.md, report.html and the plot PNGs into ``directory``; return the paths."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise LLCError(f"--report {directory}: cannot create the directory ({exc.strerror}); choose another") from None
    plots = {"levels.png": plot_levels(report), "pred_vs_measured.png": plot_pred_vs_measured(report),
             "loss_vs_size.png": plot_loss_vs_size(report)}
    paths = []
    for name, data in plots.items():
        write_bytes_atomic(os.path.join(directory, name), data)
        paths.append(os.path.join(directory, name))
    md = markdown(report)
    write_bytes_atomic(os.path.join(directory, "report.json"),
                       json.dumps(to_jsonable(report), indent=2, sort_keys=True, allow_nan=False).encode())
    write_bytes_atomic(os.path.join(directory, "report.md"), md.encode())
    imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(d).decode()}" alt="{n}">'
                   f"<figcaption>{n}</figcaption></figure>" for n, d in plots.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>llc-onnx report</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}pre{{white-space:pre-wrap}}"
            f"figure{{display:inline-block;margin:8px}}</style></head><body>{imgs}"
            f"<pre>{html.escape(md)}</pre></body></html>")
    write_bytes_atomic(os.path.join(directory, "report.html"), page.encode())
    paths += [os.path.join(directory, p) for p in ("report.json", "report.md", "report.html")]
    return paths
