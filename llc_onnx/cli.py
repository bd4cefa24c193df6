"""``llc-onnx`` command line.

Each subcommand is one function decorated with :func:`command`, which declares its arguments; the
function gets the parsed ``argparse.Namespace`` and returns the exit code. :func:`main` turns an
:class:`~llc_onnx.errors.LLCError` into ``error: <message>`` on stderr and exit code 2.

Exit codes: 0 success / candidate no worse / verified, 1 candidate worse (``compare``) / not verified
(``optimize``), 2 bad input, 3 internal error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import __version__
from .errors import LLCError

_COMMANDS: dict[str, tuple[str, tuple, Callable[[argparse.Namespace], int]]] = {}


def arg(*flags, **kwargs):
    """An argument declaration for :func:`command` (same parameters as ``add_argument``)."""
    return flags, kwargs


def command(name: str, help: str, *arguments):
    """Register the decorated ``fn(args) -> int`` as subcommand ``name``."""
    def register(fn):
        _COMMANDS[name] = (help, arguments, fn)
        return fn
    return register


# Modules that register more subcommands with @command (imported lazily: they import this module).
EXTENSIONS = ("llc_onnx.cli_optimize",)


def _load_extensions() -> None:
    import importlib

    for name in EXTENSIONS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the extension exists but one of its imports is missing
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    parser = argparse.ArgumentParser(
        prog="llc-onnx",
        description="Loss-aware post-training compression of ONNX models, verified on held-out data.")
    parser.add_argument("--version", action="version", version=f"llc-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(fn.__doc__ or help_text).strip())
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(_run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llc-onnx`` console script and ``python -m llc_onnx``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args._run(args))
    except LLCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: never confused with "not verified" (1) or bad input (2)
        print(f"error: internal error ({type(exc).__name__}: {' '.join(str(exc).split())}); "
              "please report it with the command line", file=sys.stderr)
        return 3


# ------------------------------------------------------------------------------------------ helpers
_JSON = arg("--json", action="store_true", help="print one JSON object on stdout instead of tables")


def _progress_enabled(args) -> bool:
    return sys.stderr.isatty() and not getattr(args, "json", False)


def default_loss_kind(model, output: str) -> str:
    """``"lm"`` when ``output`` has rank 3 and a graph input is named ``input_ids``, else ``"ce"``."""
    rank = None
    for o in model.graph.output:
        if o.name == output and o.type.tensor_type.HasField("shape"):
            rank = len(o.type.tensor_type.shape.dim)
    has_ids = any(i.name == "input_ids" for i in model.graph.input)
    return "lm" if rank == 3 and has_ids else "ce"


# ------------------------------------------------------------------------------------------ inspect
@command("inspect", "show inputs, outputs and the compressible nodes of a model",
         arg("model", help="path of the .onnx model"), _JSON)
def cmd_inspect(args) -> int:
    """Show opset, IR version, inputs/outputs, which MatMul/Gemm/Conv nodes can be compressed (weight
    shape, parameters, bytes) and why the others are skipped."""
    from .compressible import inspect_model
    from .model_io import load_model
    from .report import Summary, emit_json, format_bytes, print_summaries

    model = load_model(args.model)
    info = inspect_model(model)
    info = {"model": args.model, **info}
    if args.json:
        emit_json(info)
        return 0
    head = Summary("model")
    head.add("path", args.model).add("opset", info["opset"]).add("IR version", info["ir_version"]).add("producer", info["producer"] or "-")
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
    t = info["totals"]
    totals = Summary("totals")
    totals.add("compressible nodes", t["compressible_nodes"]).add("compressible params", t["compressible_params"])
    totals.add("compressible weight bytes", f"{t['compressible_bytes']:,} ({format_bytes(t['compressible_bytes'])})")
    totals.add("all initializer bytes", f"{t['initializer_bytes']:,} ({format_bytes(t['initializer_bytes'])})")
    print_summaries([head, io, comp] + ([skipped] if info["skipped"] else []) + [totals])
    return 0


# ------------------------------------------------------------------------------------------ compare
@command("compare", "evaluate a reference and a candidate model on held-out data",
         arg("reference", help="reference (original) .onnx model"),
         arg("candidate", help="candidate (compressed) .onnx model"),
         arg("--data", required=True,
             help="held-out data: file.npz, a directory of .npz batches, or module:attr (CalibrationDataReader)"),
         arg("--output", default=None, help="graph output the loss reads (default: the first output)"),
         arg("--loss", default=None,
             help="ce | lm | mse | module:function (default: lm for rank-3 output with an input_ids input, else ce)"),
         arg("--tolerance", type=float, default=0.0,
             help="candidate passes when its loss ≤ reference loss + tolerance (default 0)"),
         arg("--batch-size", type=int, default=64, help="samples per batch for a single .npz (default 64)"),
         arg("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = ORT default)"),
         _JSON)
def cmd_compare(args) -> int:
    """Run both models on the same data with ONNX Runtime and report loss, metrics, the max/mean absolute
    difference of the chosen output, and weight bytes (packed at the element bit width). Exit code 1 when
    the candidate loss exceeds the reference loss + tolerance, 0 otherwise."""
    from .calib.data import load_dataset, validate_dataset
    from .calib.losses import make_loss
    from .model_io import initializer_bytes, load_model
    from .ort_eval import compare_models, resolve_output
    from .report import Summary, emit_json, print_line, print_summaries

    if args.tolerance < 0:
        raise LLCError(f"--tolerance {args.tolerance}: must be ≥ 0")
    ref = load_model(args.reference)
    cand = load_model(args.candidate)
    output = resolve_output(ref, args.output, args.reference)
    resolve_output(cand, output, args.candidate)
    kind = args.loss or default_loss_kind(ref, output)
    loss = make_loss(kind, output)
    data = load_dataset(args.data, ref, batch_size=args.batch_size)
    validate_dataset(data, cand)
    cmp = compare_models(args.reference, args.candidate, data, loss, intra_op_num_threads=args.threads,
                         progress=_progress_enabled(args))
    r, c = cmp.reference, cmp.candidate
    rb, cb = initializer_bytes(ref), initializer_bytes(cand)
    passed = bool(c.loss <= r.loss + args.tolerance)
    names = list(r.metrics)

    def side(path, e, nbytes):
        return {"model": path, "loss": e.loss, "metrics": dict(e.metrics), "weight_bytes": nbytes,
                "seconds": e.seconds}

    result = {
        "output": output, "loss_kind": kind, "data": args.data, "n_samples": cmp.n,
        "reference": side(args.reference, r, rb),
        "candidate": side(args.candidate, c, cb),
        "delta": {"loss": c.loss - r.loss, "metrics": {k: c.metrics[k] - r.metrics[k] for k in names},
                  "weight_bytes": cb - rb, "weight_ratio": cb / rb if rb else None},
        "max_abs_diff": cmp.max_abs_diff, "mean_abs_diff": cmp.mean_abs_diff,
        "tolerance": args.tolerance, "passed": passed,
    }
    if args.json:
        emit_json(result)
    else:
        t = Summary(f"compare on {args.data}: output '{output}', loss {kind}, {cmp.n} samples",
                    ["", "reference", "candidate", "delta"])
        t.add_row("loss", r.loss, c.loss, c.loss - r.loss)
        for k in names:
            t.add_row(k, r.metrics[k], c.metrics[k], c.metrics[k] - r.metrics[k])
        t.add_row("weight bytes", rb, cb, cb - rb)
        t.add_row("max |Δ output|", None, cmp.max_abs_diff, None)
        t.add_row("mean |Δ output|", None, cmp.mean_abs_diff, None)
        print_summaries([t])
        rel = "≤" if passed else ">"
        print_line(f"{'PASS' if passed else 'FAIL'}: candidate loss {c.loss:.6g} {rel} reference loss "
                   f"{r.loss:.6g} + tolerance {args.tolerance:g}", style="bold green" if passed else "bold red")
    return 0 if passed else 1


# Further subcommands live in their own modules and register themselves on import.
from . import cli_optimize  # noqa: E402,F401
