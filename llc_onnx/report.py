"""Terminal views of the API's results: summary tables (rich), JSON output, progress bars.

A :class:`Summary` is a titled table: either key/value pairs (:meth:`Summary.add`) or rows under
``columns`` (:meth:`Summary.add_row`). :func:`print_summaries` renders them with rich on stdout (cell text is
escaped, so names with brackets show as they are); :func:`emit_json` writes one JSON object (numpy
scalars/arrays, NaN/Inf handled) and nothing else. ``print_inspect`` / ``print_compare`` / ``print_optimize`` /
``print_check`` / ``print_run`` / ``print_engine`` are the command-line views of ``api.inspect`` /
``api.compare`` / ``api.optimize`` / ``api.check`` / ``api.run`` / ``api.engine``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np


@dataclass
class Summary:
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    kv: dict[str, Any] = field(default_factory=dict)
    footer: str | None = None

    def add(self, key: str, value: Any) -> "Summary":
        self.kv[key] = value
        return self

    def add_row(self, *values: Any) -> "Summary":
        self.rows.append(list(values))
        return self

    def to_dict(self) -> dict:
        """JSON-ready form: key/value pairs as an object, rows as a list of objects keyed by column."""
        out: dict[str, Any] = {"title": self.title}
        if self.kv:
            out["values"] = {k: to_jsonable(v) for k, v in self.kv.items()}
        if self.rows:
            out["rows"] = [{c: to_jsonable(v) for c, v in zip(self.columns, r)} for r in self.rows]
        return out

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=self.title, title_justify="left", caption=self.footer, caption_justify="left")
        if self.rows or not self.kv:
            for i, c in enumerate(self.columns):
                cells = [r[i] for r in self.rows if i < len(r) and r[i] is not None]
                numeric = bool(cells) and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                              for v in cells)
                t.add_column(c, justify="right" if numeric else "left")
            for r in self.rows:
                t.add_row(*(escape(fmt(v)) for v in r))
        else:
            t.add_column("", style="bold")
            t.add_column("")
            t.show_header = False
            for k, v in self.kv.items():
                t.add_row(escape(str(k)), escape(fmt(v)))
        return t


def fmt(v: Any) -> str:
    """Human formatting for table cells: floats with 6 significant digits, ints with separators."""
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join("?" if x is None else str(x) for x in v) + "]"
    return str(v)


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def to_jsonable(v: Any) -> Any:
    """Convert numpy types / tuples / dataclass-like values to JSON types; NaN/Inf become null."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    return str(v)


def emit_json(data: dict, file=None) -> None:
    """Write ``data`` as one JSON object (one line) to ``file`` (stdout by default)."""
    file = file or sys.stdout
    file.write(json.dumps(to_jsonable(data), allow_nan=False) + "\n")
    file.flush()


def _console(file=None):
    from rich.console import Console

    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    # piped / captured output: wide enough that cells are not wrapped (greppable logs)
    return Console(file=file, highlight=False, soft_wrap=False, width=None if tty else 200)


def print_summaries(summaries: Iterable[Summary], file=None) -> None:
    """Render each summary as a rich table on ``file`` (stdout)."""
    console = _console(file)
    for s in summaries:
        console.print(s.table())


def print_line(text: str, file=None, style: str | None = None) -> None:
    from rich.markup import escape

    _console(file).print(escape(text), style=style)


def track(iterable, total: int | None = None, description: str = "", enabled: bool | None = None):
    """Iterate with a rich progress bar on stderr, only when stderr is a TTY (or ``enabled`` is True)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rich.console import Console

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


# ------------------------------------------------------------------------------------------ command views
def print_inspect(info: dict) -> None:
    head = Summary("model")
    head.add("path", info["model"]).add("opset", info["opset"]).add("IR version", info["ir_version"])
    head.add("producer", info["producer"] or "-")
    io = Summary("inputs / outputs", ["", "name", "dtype", "shape"])
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io.add_row(kind[:-1], v["name"], v["dtype"], v["shape"])
    comp = Summary("compressible nodes", ["node", "op", "weight", "shape", "params", "bytes", "notes"])
    for c in info["compressible"]:
        notes = [f"out_axis={c['out_axis']}"]
        if c["group"] > 1:
            notes.append("depthwise" if c["depthwise"] else f"group={c['group']}")
        if c["shared_with"]:
            notes.append("shared with " + ", ".join(c["shared_with"]))
        comp.add_row(c["name"], c["op_type"], c["weight"], c["shape"], c["params"], c["bytes"], "; ".join(notes))
    skipped = Summary("skipped nodes", ["node", "op", "reason"])
    for s in info["skipped"]:
        skipped.add_row(s["name"], s["op_type"], s["reason"])
    unsupported = Summary("ops the llc-onnx interpreter cannot run (optimize will refuse the model)",
                          ["node", "op", "domain"])
    for u in info.get("unsupported", []):
        unsupported.add_row(u["node"], u["op_type"], u["domain"])
    t = info["totals"]
    totals = Summary("totals")
    totals.add("compressible nodes", t["compressible_nodes"]).add("compressible params", t["compressible_params"])
    totals.add("compressible weight bytes", f"{t['compressible_bytes']:,} ({format_bytes(t['compressible_bytes'])})")
    totals.add("all initializer bytes", f"{t['initializer_bytes']:,} ({format_bytes(t['initializer_bytes'])})")
    print_summaries([head, io, comp] + ([skipped] if info["skipped"] else [])
                    + ([unsupported] if info.get("unsupported") else []) + [totals])


def print_compare(res, data: str) -> None:
    r, c = res.reference, res.candidate
    t = Summary(f"compare on {data}: output '{res.output}', loss {res.loss}, {res.n} samples",
                ["", "reference", "candidate", "delta"])
    t.add_row("loss", r["loss"], c["loss"], c["loss"] - r["loss"])
    for k in r["metrics"]:
        t.add_row(k, r["metrics"][k], c["metrics"][k], c["metrics"][k] - r["metrics"][k])
    t.add_row("weight bytes", r["weight_bytes"], c["weight_bytes"], c["weight_bytes"] - r["weight_bytes"])
    t.add_row("max |Δ output|", None, res.max_abs_diff, None)
    t.add_row("mean |Δ output|", None, res.mean_abs_diff, None)
    tables = [t]
    if res.latency:
        lt = Summary("latency (ONNX Runtime CPU, same session settings; ms per run, fastest of interleaved rounds; "
                     "throughput in samples/s)", ["batch", "reference ms", "candidate ms", "speed-up",
                                                  "reference /s", "candidate /s"])
        for b, row in res.latency.items():
            lt.add_row(b, row["reference_ms"], row["candidate_ms"], f"{row['speedup']:.2f}x",
                       round(row["reference_throughput"], 1), round(row["candidate_throughput"], 1))
        tables.append(lt)
    print_summaries(tables)
    rel = "≤" if res.passed else ">"
    print_line(f"{'PASS' if res.passed else 'FAIL'}: candidate loss {c['loss']:.6g} {rel} reference loss "
               f"{r['loss']:.6g} + tolerance {res.tolerance:g}", style="bold green" if res.passed else "bold red")


def print_expand(res) -> None:
    """The summary of a data-free series expansion (:class:`~llc_onnx.flows.series.ExpandResult`): bytes and
    relative residual norms per node, and plainly whether anything was checked."""
    block = "per channel" if res.block_size is None else f"block {res.block_size}"
    t = Summary(f"series expansion of {res.source}: {res.bits}-bit terms, T={res.terms}, written at order "
                f"{res.order}, {block}, {res.form} form (data-free)",
                ["node", "op", "weight", "float bytes", "bytes", "×", "‖R_t‖/‖W‖, t = 1..T"])
    for n in res.nodes:
        rel = " / ".join(("[" if i + 1 == n.terms else "") + f"{r:.3g}" + ("]" if i + 1 == n.terms else "")
                         for i, r in enumerate(n.relative_residuals))
        t.add_row(n.node, n.op_type, "x".join(map(str, n.shape)), n.float_bytes, n.nbytes,
                  n.nbytes / n.float_bytes if n.float_bytes else None, rel)
    t.add_row("total", None, None, res.float_bytes, res.nbytes, res.nbytes / res.float_bytes if res.float_bytes
              else None, None)
    tables = [t]
    if res.skipped:
        sk = Summary("left float", ["node", "why"])
        for node, why in res.skipped:
            sk.add_row(node, why)
        tables.append(sk)
    print_summaries(tables)
    if res.output:
        print_line(f"wrote {res.output}")
    if res.comparison is None:
        print_line("not verified: no data (run llc-onnx compare to check it)", style="bold yellow")
    else:
        print_compare(res.comparison, "the data given")


def print_optimize(result) -> None:
    """The summary of an :class:`~llc_onnx.result.OptimizeResult`: levels, plans measured on validation,
    losses per split (which split did what), bytes, time per stage, notes and the verdict."""
    tables = []
    for st in result.stages:
        t = Summary(f"{st.method}: levels chosen", ["level", "nodes"])
        for k, v in st.levels.items():
            t.add_row(k, v)
        tables.append(t)
        p = Summary(f"{st.method}: plans measured jointly on the validation split", ["plan", "bytes", "val loss",
                                                                                      "passed", "raised"])
        for tr in st.trials:
            mark = " (chosen)" if tr.name == st.chosen_plan else ""
            p.add_row(tr.name + mark, tr.nbytes, tr.val_loss, tr.passed, ", ".join(tr.raised[:4])
                      + (" ..." if len(tr.raised) > 4 else ""))
        tables.append(p)
    s = result.splits
    t = Summary(f"result ({result.objective} objective, loss {result.loss}; {result.target['session']})",
                ["split (role)", "n", "float", "compressed", "delta"])
    roles = {"calibration": "chose", "validation": "steered", "test": "verdict, once"}
    for name in ("calibration", "validation", "test"):
        sp = s[name]
        label = f"{name} ({roles[name]})" + (" = calibration" if sp.extra.get("same_as_calibration") else "")
        t.add_row(label, sp.n, sp.reference.loss, sp.compressed.loss, sp.delta)
    test = s["test"]
    for k, v in test.reference.metrics.items():
        c = test.compressed.metrics.get(k, float("nan"))
        t.add_row(f"test {k}", None, v, c, c - v)
    task = test.extra.get("task_loss")
    if task:
        t.add_row(f"test {task['name']} (labels)", None, task["reference"], task["compressed"],
                  task["compressed"] - task["reference"])
    t.add_row("weight bytes (compressible)", None, format_bytes(result.reference_bytes),
              format_bytes(result.compressed_bytes), f"-{100 * result.reduction:.1f} %")
    tables.append(t)
    lat = result.target.get("latency")
    if lat:
        lt = Summary(f"latency on {result.target['name']} (ms per run, fastest of interleaved rounds)",
                     ["batch", "float", "compressed", "speed-up", "predicted"])
        for b, row in lat.items():
            lt.add_row(b, row["float_ms"], row["compressed_ms"], f"{row['speedup']:.2f}x", row.get("predicted_ms"))
        tables.append(lt)
    for st in result.stages:
        fit = (st.settings or {}).get("latency") or {}
        if fit.get("measured"):
            batches = ",".join(fit.get("timed_batches") or [fit["batch"]])
            ft = Summary(f"latency budget {fit['budget_fraction']:g}: plans timed against the float model at batch "
                         f"{batches} (fastest of interleaved rounds; the largest fraction over the batches)",
                         ["round", "nodes moved to fastest", "× float latency"])
            for row in fit["measured"]:
                ft.add_row(row["round"], len(row["moved"]), f"{row['fraction']:.3f}")
            tables.append(ft)
    sec = Summary("time per stage (s)", ["stage", "seconds"])
    for k, v in result.seconds.items():
        sec.add_row(k, round(v, 2))
    tables.append(sec)
    print_summaries(tables)
    for st in result.stages:
        pc = st.plan_costs
        if pc.get("gains"):
            print_line(f"{st.method}: the plan kept ({pc.get('plan', 'solver')}) rests on measured gains of "
                       f"{pc['gains']:.3g} (credited "
                       f"{pc['credited_gains']:.3g}) against costs of {pc['costs']:.3g}")
        if st.cache:
            c = st.cache
            print_line(f"{st.method}: " + (f"reused {c['seconds']:.0f} s of measurements from cache entry {c['entry']}"
                                           if c["hit"] else f"stored the measurements in cache entry {c['entry']}"
                                           if c["entry"] else "could not store the measurements (see the warning)"))
    for note in result.notes:
        print_line(f"note: {note}", style="yellow")
    verdict = "VERIFIED" if result.verified else "NOT VERIFIED"
    first = all(st.first_plan_passed for st in result.stages)
    print_line(f"{verdict}: test loss {test.compressed.loss:.6f} vs float {test.reference.loss:.6f} "
               f"(tolerance {result.tolerance:g}); {100 * result.reduction:.1f} % fewer weight bytes; the solver's "
               f"first plan {'passed' if first else 'failed'} on validation"
               + (f"; written {result.output}" if result.output else "; no model written"),
               style="bold green" if result.verified else "bold red")


def print_check(res) -> None:
    """``llc-onnx check``: the violations (node, rule, message), and for ort-cpu how ORT runs each node."""
    tables = []
    if res.nodes:
        t = Summary(f"how ONNX Runtime CPU runs {res.model} (its optimized graph)",
                    ["node", "op", "weight", "ORT kernel", "integer"])
        for n in res.nodes:
            t.add_row(n["node"], n["op_type"], n["weight"], n["kernel"], n["integer"])
        tables.append(t)
    if res.violations:
        v = Summary(f"{len(res.violations)} violation(s) of the {res.target} rules", ["node", "rule", "message"])
        for x in res.violations:
            v.add_row(x["node"], x["rule"], x["message"])
        tables.append(v)
    print_summaries(tables)
    if res.passed:
        print_line(f"PASS: {res.model} follows the {res.target} rules", style="bold green")
    else:
        print_line(f"FAIL: {len(res.violations)} violation(s) of the {res.target} rules in {res.model}",
                   style="bold red")


def print_run(res) -> None:
    """``llc-onnx run``: loss, metrics, latency and throughput on the device, and what ran the nodes."""
    t = Summary(f"run {res.model} on {res.device} ({res.executor})")
    t.add("data", f"{res.data}: {res.n_samples} samples, batches of {res.batch_size}")
    t.add(f"loss ({res.loss_kind}, output '{res.output}')", res.loss)
    for k, v in res.metrics.items():
        t.add(k, v)
    t.add("latency (median per batch)", f"{res.latency_ms:.4g} ms")
    t.add("throughput", f"{res.throughput:.1f} samples/s")
    for op, count in res.nodes.items():
        t.add(f"{op} nodes", f"{count} ({res.kernels.get(op, '?')})")
    print_summaries([t])
    if res.note:
        print_line(f"note: {res.note}", style="yellow")


def print_engine(res) -> None:
    """``llc-onnx engine``: the plan built and, with data, TensorRT against ONNX Runtime."""
    b = res.built
    t = Summary(f"TensorRT engine {res.plan}")
    t.add("model", res.model).add("plan bytes", f"{b.get('bytes', 0):,}").add("build seconds", b.get("seconds"))
    t.add("plugin nodes", ", ".join(f"{k}: {v}" for k, v in b.get("plugins", {}).items()) or "none")
    t.add("native INT4 nodes", b.get("native_int4"))
    tables = [t]
    c = res.comparison
    if c:
        cmp = Summary(f"TensorRT vs ONNX Runtime on {c['n_samples']} samples (output '{c['output']}')",
                      ["", "ONNX Runtime", "TensorRT"])
        cmp.add_row(f"loss ({c['loss_kind']})", c["onnxruntime"]["loss"], c["tensorrt"]["loss"])
        for k, v in c["onnxruntime"]["metrics"].items():
            cmp.add_row(k, v, c["tensorrt"]["metrics"].get(k))
        cmp.add_row("max |Δ output|", None, c["max_abs_diff"])
        cmp.add_row("mean |Δ output|", None, c["mean_abs_diff"])
        cmp.add_row("latency per batch (ms)", None, c["latency_ms"])
        tables.append(cmp)
    print_summaries(tables)
