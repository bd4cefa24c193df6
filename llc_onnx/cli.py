"""``llc-onnx`` command line: parse → config → API call → print. Nothing else lives here.

The ``optimize`` options are generated from :class:`~llc_onnx.config.OptimizeConfig`'s fields
(:func:`llc_onnx.config.cli_fields`), so flags and config names cannot drift; a
:class:`~llc_onnx.config.ConfigError` is shown with the flag the user typed. ``--config FILE`` (TOML) gives the
base configuration and flags override it; ``--print-config`` prints the effective configuration.

Exit codes: 0 success / verified / candidate no worse, 1 not verified (``optimize``) / candidate worse
(``compare``), 2 bad input, 3 internal error (a bug), 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM.

SIGINT and SIGTERM raise :class:`Interrupted` (a ``KeyboardInterrupt``) wherever the program is, so every
atomic writer's cleanup runs (``model_io.save_model``, ``atomic.write_atomic``): an interrupted ``optimize``
leaves no output file and no temporary file; a second signal during that cleanup is ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable

from . import __version__
from .errors import LLCError

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
_CFG = "cfg:"  # argparse dest prefix of generated config options


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated ``fn(args) -> int`` as subcommand ``name``."""
    def register(fn):
        _COMMANDS[name] = (help, add_arguments, fn)
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llc-onnx",
        description="Loss-aware post-training compression of ONNX models, verified on held-out data.")
    parser.add_argument("--version", action="version", version=f"llc-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(fn.__doc__ or help_text).strip())
        add_arguments(p)
        p.set_defaults(_run=fn)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum, frame):
    for s in _STOP_SIGNALS:  # a second signal must not cut the cleanup this one starts
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGINT/SIGTERM raise :class:`Interrupted` inside the block (main thread only); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    for s in _STOP_SIGNALS:
        signal.signal(s, _interrupt)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _identity(path: str | None):
    """What is at ``path`` now (to tell whether a run replaced it)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class _WarningsToStderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from .report import print_line

        print_line(f"warning: {record.getMessage()}", file=sys.stderr, style="yellow")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llc-onnx`` console script and ``python -m llc_onnx``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    logger = logging.getLogger("llc_onnx")
    handler = _WarningsToStderr(logging.WARNING)
    logger.addHandler(handler)
    try:
        with _signals_interrupt():
            return int(args._run(args))
    except LLCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        out = getattr(args, "_out", None)
        if out is not None and _identity(out) not in (None, getattr(args, "_out_before", None)):
            print(f"error: interrupted ({signal.Signals(signum).name}) after {out} was written; the report and "
                  "summary were not", file=sys.stderr)
        else:
            print(f"error: interrupted ({signal.Signals(signum).name}); nothing was written", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # a bug, not bad input: never confused with "not verified" (1) or bad input (2)
        print(f"error: internal error ({type(exc).__name__}: {' '.join(str(exc).split())}); "
              "please report it with the command line", file=sys.stderr)
        return 3
    finally:
        logger.removeHandler(handler)


def _show(args, res, printer) -> None:
    """``res`` as one JSON object with ``--json``, else as ``printer``'s tables."""
    from .report import emit_json

    if args.json:
        emit_json(res.to_dict())
    else:
        printer(res)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")


def _progress(args):
    from .progress import RichBars, Silent

    return Silent() if getattr(args, "json", False) else RichBars()


# ------------------------------------------------------------------------------------------ inspect
def _inspect_args(p):
    p.add_argument("model", help="path of the .onnx model")
    _json_flag(p)


@command("inspect", "show inputs, outputs and the compressible nodes of a model", _inspect_args)
def cmd_inspect(args) -> int:
    """Show opset, IR version, inputs/outputs, which MatMul/Gemm/Conv nodes can be compressed (weight
    shape, parameters, bytes), why the others are skipped, and any op the interpreter cannot run."""
    from . import api
    from .report import emit_json, print_inspect

    info = api.inspect(args.model)
    if args.json:
        emit_json(info)
    else:
        print_inspect(info)
    return 0


# ------------------------------------------------------------------------------------------ compare
def _compare_args(p):
    p.add_argument("reference", help="reference (original) .onnx model")
    p.add_argument("candidate", help="candidate (compressed) .onnx model")
    p.add_argument("--data", required=True,
                   help="held-out data: file.npz, a directory of .npz batches, or module:attr (CalibrationDataReader)")
    p.add_argument("--output", default=None, help="graph output the loss reads (default: the first output)")
    p.add_argument("--loss", default=None,
                   help="ce | lm | mse | module:function (default: lm for rank-3 output with an input_ids input, else ce)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="candidate passes when its loss ≤ reference loss + tolerance (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch for a single .npz (default 64)")
    p.add_argument("--threads", type=int, default=0,
                   help="batches run at once, each on one ONNX Runtime thread (0 = one per CPU; the numbers do not "
                        "depend on it)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="time both models in the same session settings at batch 1 and the data's batch (default on)")
    p.add_argument("--rounds", type=int, default=31, help="interleaved timing rounds per batch (default 31)")
    _json_flag(p)


@command("compare", "compare a candidate model against a reference on the same data", _compare_args)
def cmd_compare(args) -> int:
    """Run both models on the same data with ONNX Runtime and report loss, metrics, the max/mean absolute
    difference of the chosen output, weight bytes (packed at the element bit width), and both models'
    latency and throughput in the same session settings at batch 1 and the data's batch. Exit code 1 when
    the candidate loss exceeds the reference loss + tolerance, 0 otherwise."""
    from . import api
    from .report import emit_json, print_compare

    res = api.compare(args.reference, args.candidate, args.data, loss=args.loss, output=args.output,
                      tolerance=args.tolerance, batch_size=args.batch_size, threads=args.threads,
                      progress=not args.json and sys.stderr.isatty(), latency=args.latency, rounds=args.rounds)
    if args.json:
        emit_json({**res.to_dict(), "data": args.data})
    else:
        print_compare(res, args.data)
    return 0 if res.passed else 1


# ------------------------------------------------------------------------------------------ expand
def _block(text: str):
    t = text.lower()
    return t if t == "default" else None if t in ("none", "channel") else int(text)


def _expand_args(p):
    p.add_argument("model", help="path of the .onnx model (never modified)")
    p.add_argument("-o", "--out", default=None, help="output model (default <model>.series.onnx beside the input)")
    p.add_argument("--bits", type=int, default=4, help="bits per term: 2, 4 or 8 (default 4)")
    p.add_argument("--terms", type=int, default=2, help="terms T per weight (default 2)")
    p.add_argument("--order", type=int, default=None,
                   help="write the model truncated at this many terms (1..T) of the same expansion (default T)")
    p.add_argument("--block-size", type=_block, default="default",
                   help="block along the reduction axis, or 'channel' (default 32 for 2/4 bits, per channel for 8)")
    p.add_argument("--scale", default="mse", choices=["mse", "minmax"], help="scales per block (default mse)")
    p.add_argument("--form", default="standard", choices=["standard", "custom"],
                   help="standard ops (default) or ai.llc_onnx SeriesMatMul/SeriesConv nodes with function bodies")
    p.add_argument("--data", default=None, help="held-out data to compare the written model with the input on "
                   "(as llc-onnx compare); without it nothing is checked")
    p.add_argument("--output", default=None, help="graph output the loss reads (default: the first output)")
    p.add_argument("--loss", default=None, help="ce | lm | mse | module:function (as compare)")
    p.add_argument("--tolerance", type=float, default=0.0, help="--data: passes when loss ≤ float + this (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch of --data (default 64)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = ORT default)")
    _json_flag(p)


@command("expand", "data-free series expansion: every weight as T low-bit basis terms (no data)", _expand_args)
def cmd_expand(args) -> int:
    """Expand every MatMul/Gemm/Conv weight into T b-bit basis terms W ≈ Σ_t s_t·Q_t (FP = xINT) without data
    and write the model. Nothing is measured, so nothing is verified: the summary lists bytes and residual
    norms per node; with --data the written model is compared with the input in ONNX Runtime (exit code 1
    when its loss is higher, as compare)."""
    from . import api
    from .report import print_expand

    out = args.out or os.path.splitext(args.model)[0] + ".series.onnx"
    res = api.expand(args.model, bits=args.bits, terms=args.terms, order=args.order, block_size=args.block_size,
                     scale=args.scale, form=args.form, data=args.data, loss=args.loss, output=args.output,
                     tolerance=args.tolerance, batch_size=args.batch_size, threads=args.threads, out=out)
    _show(args, res, print_expand)
    return 0 if res.verified is not False else 1


# ------------------------------------------------------------------------------------------ check
def _check_args(p):
    p.add_argument("model", help="path of the .onnx model")
    p.add_argument("--target", default="ort-cpu", choices=("ort-cpu", "tensorrt"),
                   help="tensorrt: every violation of TensorRT's explicit-quantization rules; ort-cpu (default): "
                        "which nodes ONNX Runtime CPU runs in integer kernels, and quantized nodes it runs in float")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (ort-cpu)")
    _json_flag(p)


@command("check", "check a model against a deployment target's rules", _check_args)
def cmd_check(args) -> int:
    """Report every violation of the target's rules with the node name. tensorrt: symmetric INT8/INT4 Q/DQ
    placement, plugin attributes, opset. ort-cpu: the kernel ONNX Runtime's CPU provider runs each
    MatMul/Gemm/Conv/MatMulNBits in (read from its optimized graph), and a violation for each quantized node
    that runs in float. Exit code 1 when there are violations, 0 otherwise."""
    from . import api
    from .report import print_check

    res = api.check(args.model, target=args.target, threads=args.threads)
    _show(args, res, print_check)
    return 0 if res.passed else 1


# ------------------------------------------------------------------------------------------ run
def _data_args(p, required: bool = True):
    p.add_argument("--data", required=required, default=None,
                   help="held-out data: file.npz, a directory of .npz batches, or module:attr")
    p.add_argument("--output", default=None, help="graph output the loss reads (default: the first output)")
    p.add_argument("--loss", default=None, help="ce | lm | mse | module:function (default as in compare)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch for a single .npz (default 64)")


def _run_args(p):
    p.add_argument("model", help="path of the compressed .onnx model")
    _data_args(p)
    p.add_argument("--device", default="cpu", help="cpu (default; the interpreter, a correctness run) or cuda[:N] "
                                                   "(weight-only nodes on the Triton kernels)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over the first batch (default 1)")
    _json_flag(p)


@command("run", "run a compressed model on a device (GPU: Triton kernels) and report loss, latency, throughput",
         _run_args)
def cmd_run(args) -> int:
    """Execute the model through the llc-onnx interpreter on --device: on CUDA, MatMulNBits and series nodes
    run the Triton kernels; on CPU, their torch reference (the numbers, not ONNX Runtime's speed). Reports
    loss, metrics, median latency per batch and throughput."""
    from . import api
    from .report import print_run

    res = api.run(args.model, args.data, device=args.device, loss=args.loss, output=args.output,
                  batch_size=args.batch_size, warmup=args.warmup)
    _show(args, res, print_run)
    return 0


# ------------------------------------------------------------------------------------------ engine
def _engine_args(p):
    p.add_argument("model", help="path of the compressed .onnx model (--target tensorrt output)")
    p.add_argument("-o", "--out", required=True, help="the serialized TensorRT plan to write")
    _data_args(p, required=False)
    p.add_argument("--int4", default="native", choices=("native", "plugin"),
                   help="INT4 weight-only nodes: TensorRT's own kernel (native, default) or the llc plugin")
    _json_flag(p)


@command("engine", "build a TensorRT engine from a compressed model and compare it with ONNX Runtime", _engine_args)
def cmd_engine(args) -> int:
    """Build a strongly typed TensorRT engine (the llc plugins for the levels TensorRT has no kernel for);
    with --data, run it and ONNX Runtime on the same batches (loss, max/mean |Δ output|, latency). Needs
    TensorRT ≥ 10.8 with tensorrt.plugin, triton and a CUDA GPU; without them one error line says what to
    install (exit code 2)."""
    from . import api
    from .report import print_engine

    res = api.engine(args.model, args.out, data=args.data, loss=args.loss, output=args.output,
                     batch_size=args.batch_size, int4=args.int4)
    _show(args, res, print_engine)
    return 0


# ------------------------------------------------------------------------------------------ optimize
def _field_kind(f) -> str:
    t = str(f.type)
    if isinstance(f.default, bool):
        return "bool"
    if t.startswith("int") and f.parse is None:
        return "int"
    if t.startswith("float") and f.parse is None:
        return "float"
    return "str"


def _optimize_args(p):
    from .config import cli_fields

    p.add_argument("model", help="path of the .onnx model (never modified)")
    p.add_argument("--data", default=None,
                   help="data: file.npz, directory of .npz batches, or module:attr (labels optional)")
    p.add_argument("--held", default=None, help="explicit test data (then --data is calibration + validation)")
    p.add_argument("--val", default=None, help="explicit validation data (then --data is calibration + test)")
    p.add_argument("-o", "--out", default=None, help="output model (default <model>.llc.onnx beside the input)")
    p.add_argument("--config", default=None, metavar="FILE", help="TOML configuration; flags override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration as TOML (to pin in a build) and exit")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.json/.md/.html with plots here")
    _json_flag(p)
    for f in cli_fields():
        kw = {"dest": _CFG + f.path, "default": argparse.SUPPRESS, "help": f.help}
        if _field_kind(f) == "bool":
            p.add_argument(f.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(f.flag, metavar=f.metavar or f.flag.lstrip("-").replace("-", "_").upper(), **kw)


def _parse_value(f, raw):
    kind = _field_kind(f)
    if kind == "bool":
        return raw
    try:
        if f.parse is not None:
            return f.parse(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError as exc:
        what = {"int": "expected an integer", "float": "expected a number"}.get(kind, str(exc))
        raise LLCError(f"{f.flag} {raw}: {str(exc) if f.parse is not None else what}") from None


def config_from_args(args):
    """The effective :class:`~llc_onnx.config.OptimizeConfig`: the ``--config`` file (or defaults), then the
    flags given. A bad value is reported with its flag (or the file and field name)."""
    from .config import ConfigError, OptimizeConfig, cli_fields, load_config, with_values

    fields = {f.path: f for f in cli_fields()}
    given = {k[len(_CFG):]: v for k, v in vars(args).items() if k.startswith(_CFG)}
    values = {path: _parse_value(fields[path], raw) for path, raw in given.items()}
    try:
        base = load_config(args.config) if args.config else OptimizeConfig()
    except ConfigError as exc:
        raise LLCError(f"{args.config}: {exc}") from None
    try:
        return with_values(base, values)
    except ConfigError as exc:
        if exc.field in given:
            raise LLCError(f"{fields[exc.field].flag} {given[exc.field]}: {exc.reason}") from None
        flag = fields[exc.field].flag if exc.field in fields else exc.field
        raise LLCError(f"{flag} ({exc.field}) {exc.value}: {exc.reason}") from None


@command("optimize", "compress a model (quantization / low-rank) and verify it on held-out data", _optimize_args)
def cmd_optimize(args) -> int:
    """Measure every compressible node's candidates (bit-widths or ranks) by their effect on the loss, choose
    one per node, measure the chosen plans jointly on a validation split (back-off), and give the verdict on
    the test split, once, in ONNX Runtime. The model is written only when verified (or with
    --allow-loss-increase, marked as not verified)."""
    from . import api
    from .config import to_toml
    from .report import emit_json, print_optimize
    from .report_files import check_report_dir, write_report

    config = config_from_args(args)
    if args.print_config:
        sys.stdout.write(to_toml(config))
        return 0
    if args.data is None:
        raise LLCError("--data: required; give the labelled (or unlabelled) data the model is judged on")
    out = args.out or os.path.splitext(args.model)[0] + ".llc.onnx"
    if args.report:
        check_report_dir(args.report)
    args._out, args._out_before = out, _identity(out)
    result = api.optimize(args.model, args.data, config, held=args.held, val=args.val, out=out,
                          progress=_progress(args))
    if result is None:  # a worker rank under torchrun: rank 0 reports and writes
        return 0
    report = result.to_dict()
    if args.report:
        report["report_files"] = write_report(report, args.report)
    if args.json:
        emit_json(report)
    else:
        print_optimize(result)
    return 0 if result.verified or config.criterion.allow_loss_increase else 1
