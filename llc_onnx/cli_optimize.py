"""``llc-onnx optimize``: compress, verify on held-out data, write the model only when it is verified.

    llc-onnx optimize model.onnx --data calib.npz -o model.llc.onnx                  # LLC quantization
    llc-onnx optimize model.onnx --data calib.npz --method lowrank --mode compact -o out.onnx
    llc-onnx optimize model.onnx --data calib.npz --method lowrank,quant -o out.onnx

Exit codes: 0 verified (or ``--allow-loss-increase``), 1 not verified (no model written), 2 bad input,
3 internal error.
"""

from __future__ import annotations

import os

from .cli import _JSON, arg, command, default_loss_kind
from .errors import LLCError

_METHODS = ("quant", "lowrank", "lowrank,quant")


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LLCError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.1,0.2,0.3") from None


def _bits(text: str) -> tuple[int, ...]:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if t in ("float", "fp32", "32"):
            out.append(0)
        elif t in ("2", "4", "8", "16"):
            out.append(int(t))
        else:
            raise LLCError(f"--bits {text!r}: levels are 2, 4, 8, 16 and float (e.g. --bits 4,8,float)")
    return tuple(dict.fromkeys(out))


def _loss_factory(args):
    from .calib.losses import make_loss
    from .ort_eval import resolve_output

    def factory(model):
        output = resolve_output(model, args.output, args.model)
        return make_loss(args.loss or default_loss_kind(model, output), output)

    return factory


def _quant_config(args):
    from .flows.quantize import QuantConfig

    if sum(x is not None for x in (args.budget, args.avg_bits)) > 1 or \
            (args.lossless and (args.budget is not None or args.avg_bits is not None)):
        raise LLCError("choose one of --lossless, --budget and --avg-bits")
    if args.avg_bits is not None and not 0 < args.avg_bits <= 32:
        raise LLCError(f"--avg-bits {args.avg_bits}: average bits per weight in (0, 32], e.g. 4.5")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise LLCError(f"--budget {args.budget}: a fraction of the float weight bytes in (0, 1], e.g. 0.25")
    return QuantConfig(bits=_bits(args.bits), block_size=args.block_size, scale_method=args.scale,
                       rounding=args.rounding, llc_radius=args.llc_radius, activations=args.activations,
                       error_max=args.error_max, relative=args.relative, outside=args.outside, cost=args.cost,
                       margin_z=args.margin_z, budget=args.budget, avg_bits=args.avg_bits, tolerance=args.tolerance,
                       max_rounds=args.max_rounds, sweep=_floats(args.sweep, "--sweep") if args.sweep else (),
                       cache_dir=args.cache)


def _lowrank_config(args):
    from .flows.lowrank import LowRankConfig

    return LowRankConfig(mode=args.mode, gamma=args.gamma, gamma_relative=args.gamma_relative,
                         relative=args.relative, error_max=args.error_max, outside=args.outside,
                         margin_z=args.margin_z, tolerance=args.tolerance,
                         max_rounds=args.max_rounds,
                         **({"grid": _floats(args.rank_grid, "--rank-grid")} if args.rank_grid else {}))


def _check_numbers(args) -> None:
    """One-line errors for out-of-range numeric options, before any work is done."""
    checks = [("--tolerance", args.tolerance, 0, False), ("--max-rounds", args.max_rounds, 0, False),
              ("--seed", args.seed, 0, False), ("--threads", args.threads, 0, False),
              ("--error-max", args.error_max, 0, False), ("--margin-z", args.margin_z, 0, False),
              ("--gamma", args.gamma, 0, True), ("--llc-radius", args.llc_radius, 0, False),
              ("--block-size", args.block_size, 1, False), ("--batch-size", args.batch_size, 1, False)]
    for flag, value, low, strict in checks:
        ok = value == value and value not in (float("inf"), float("-inf")) and (value > low if strict else value >= low)
        if not ok:
            raise LLCError(f"{flag} {value}: must be {'>' if strict else '≥'} {low}")
    if not 0 < args.holdout < 1:
        raise LLCError(f"--holdout {args.holdout}: a fraction in (0, 1), e.g. 0.5")
    if args.measure_samples is not None and args.measure_samples < 1:
        raise LLCError(f"--measure-samples {args.measure_samples}: must be ≥ 1")
    methods = args.method.split(",")
    if "quant" not in methods and (args.budget is not None or args.avg_bits is not None or args.sweep):
        raise LLCError("--budget, --avg-bits and --sweep apply to quantization; with --method lowrank use "
                       "--mode compact (smallest model not worse) or --method lowrank,quant")


def _stage(ctx, method, args):
    """Run one method on ``ctx``; returns (report dict, verified result)."""
    from .flows import lowrank, quantize
    from .flows.summary import build_report

    settings = {"error_max": args.error_max, "relative": args.relative, "outside": args.outside,
                "margin_z": args.margin_z}
    if method == "quant":
        cfg = _quant_config(args)
        res = quantize.run(ctx, cfg)
        settings.update(cost=cfg.cost, bits=args.bits, block_size=cfg.block_size, scale=cfg.scale_method,
                        rounding=cfg.rounding, llc_radius=cfg.llc_radius,
                        activations=cfg.activations, budget_bytes=res.budget_bytes,
                        objective="lossless" if res.budget_bytes is None else "budget", cache=res.cache)
        return build_report(ctx, "quant", res.table, res.ladders, res.result, settings, res.sweep), res.result
    cfg = _lowrank_config(args)
    res = lowrank.run(ctx, cfg)
    settings.update(mode=cfg.mode, gamma=cfg.gamma, gamma_relative=cfg.gamma_relative, search=res.search)
    return build_report(ctx, "lowrank", res.table, res.ladders, res.result, settings), res.result


def _metadata(model, report: dict) -> None:
    props = {"llc_onnx.method": report["method"], "llc_onnx.verified": str(report["verified"]).lower(),
             "llc_onnx.held_loss_reference": repr(report["held"]["reference"]["loss"]),
             "llc_onnx.held_loss_compressed": repr(report["held"]["compressed"]["loss"])}
    keep = [p for p in model.metadata_props if not p.key.startswith("llc_onnx.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def _print(report: dict, stages: list[dict]) -> None:
    from .report import Summary, format_bytes, print_line, print_summaries

    held, cal = report["held"], report["calibration"]
    tables = []
    for st in stages:
        t = Summary(f"{st['method']}: levels chosen", ["level", "nodes"])
        for k, v in st["levels"].items():
            t.add_row(k, v)
        tables.append(t)
    t = Summary("result (losses measured in ONNX Runtime)", ["", "float", "compressed", "delta"])
    t.add_row(f"calibration loss ({cal['n']})", cal["reference"]["loss"], cal["compressed"]["loss"],
              cal["compressed"]["loss"] - cal["reference"]["loss"])
    t.add_row(f"held-out loss ({held['n']})", held["reference"]["loss"], held["compressed"]["loss"],
              held["compressed"]["loss"] - held["reference"]["loss"])
    for k, v in held["reference"]["metrics"].items():
        c = held["compressed"]["metrics"].get(k, float("nan"))
        t.add_row(f"held-out {k}", v, c, c - v)
    b = report["bytes"]
    t.add_row("weight bytes (compressible)", format_bytes(b["reference"]), format_bytes(b["compressed"]),
              f"-{100 * b['reduction']:.1f} %")
    tables.append(t)
    s = Summary("time per stage (s)", ["stage", "seconds"])
    for st in stages:
        for k, v in st["seconds"].items():
            s.add_row(f"{st['method']}: {k}" if len(stages) > 1 else k, round(v, 2))
    tables.append(s)
    print_summaries(tables)
    if b["compressed"] >= b["reference"]:
        print_line("nothing was compressed: no candidate's measured loss change fits the criterion (see the "
                   "candidates in --report or --json); try --budget, a smaller --margin-z, or other levels",
                   style="yellow")
    for st in stages:
        if st.get("cache"):
            c = st["cache"]
            print_line(f"{st['method']}: " + (f"reused {c['seconds']:.0f} s of measurements from" if c["hit"]
                                              else "stored the measurements in") + f" cache entry {c['entry']}")
    verdict = "VERIFIED" if report["verified"] else "NOT VERIFIED"
    print_line(f"{verdict}: held-out loss {held['compressed']['loss']:.6f} vs float {held['reference']['loss']:.6f} "
               f"(tolerance {report['tolerance']:g}); {100 * b['reduction']:.1f} % fewer weight bytes"
               + (f"; written {report['output']}" if report["output"] else "; no model written"),
               style="bold green" if report["verified"] else "bold red")


@command("optimize", "compress a model (quantization / low-rank) and verify it on held-out data",
         arg("model", help="path of the .onnx model (never modified)"),
         arg("--data", required=True, help="labelled data: file.npz, directory of .npz batches, or module:attr"),
         arg("--held", default=None, help="explicit held-out data (then --data is all calibration)"),
         arg("--holdout", type=float, default=0.5, help="held-out fraction of --data (default 0.5)"),
         arg("--seed", type=int, default=0, help="seed of the calibration/held-out split (default 0)"),
         arg("-o", "--out", default=None, help="output model (default <model>.llc.onnx beside the input)"),
         arg("--output", default=None, help="graph output the loss reads (default: the first output)"),
         arg("--loss", default=None, help="ce | lm | mse | module:function (default: lm for LMs, else ce)"),
         arg("--batch-size", type=int, default=64, help="samples per batch (default 64)"),
         arg("--method", default="quant", choices=_METHODS, help="quant (default), lowrank, or lowrank,quant"),
         arg("--bits", default="2,4,8,16,float", help="quantization levels per node (default 2,4,8,16,float)"),
         arg("--block-size", type=int, default=32, help="block along the reduction axis for 2/4-bit (default 32)"),
         arg("--scale", default="mse", choices=("minmax", "mse", "aciq"), help="weight scales (default mse)"),
         arg("--rounding", default="llc", choices=("llc", "nearest", "up", "down"),
             help="rounding (default llc: sign-directed, first-order term ≤ 0)"),
         arg("--llc-radius", type=float, default=0.05,
             help="LLC rounding only where nearest rounding's ‖δ‖/‖W‖ ≤ this; nearest beyond (default 0.05)"),
         arg("--activations", action="store_true", help="also quantize node inputs (per-tensor 8/16-bit)"),
         arg("--lossless", action="store_true", help="smallest size with predicted ΔL ≤ 0 (the default)"),
         arg("--budget", type=float, default=None, help="byte budget as a fraction of float weight bytes"),
         arg("--avg-bits", type=float, default=None, help="byte budget as average bits per weight"),
         arg("--sweep", default=None, help="also solve and verify these budgets, e.g. 0.1,0.15,0.2,0.3"),
         arg("--cache", default=None, metavar="DIR",
             help="keep the gradients and measured candidates here and reuse them when model, data and "
                  "quantization settings are the same (e.g. trying several --budget values)"),
         arg("--error-max", type=float, default=1e-4,
             help="neighbourhood check |measured − predicted| ≤ this (default 1e-4)"),
         arg("--relative", action="store_true", help="--error-max is relative to the calibration loss"),
         arg("--outside", default="measured", choices=("measured", "drop"),
             help="levels outside the neighbourhood: cost = measured ΔL (default) or dropped"),
         arg("--cost", default="measured", choices=("measured", "cet"),
             help="per-candidate cost: measured loss change (default) or CET second order g·δ + ½δᵀHδ"),
         arg("--margin-z", type=float, default=1.0,
             help="add z standard errors of each measured ΔL to its cost; 0 = the papers' plain rule (default 1)"),
         arg("--mode", default="lossless", choices=("lossless", "compact"), help="low-rank mode (default lossless)"),
         arg("--gamma", type=float, default=1e-4, help="low-rank neighbourhood ‖δ‖ ≤ γ (default 1e-4)"),
         arg("--gamma-relative", action="store_true", help="γ is relative to ‖W‖"),
         arg("--rank-grid", default=None,
             help="compact low-rank: candidate ranks as fractions of the largest useful rank "
                  "(default 1/16,1/8,1/4,3/8,1/2,5/8,3/4,7/8,1)"),
         arg("--measure-samples", type=int, default=None,
             help="size of the measure part of the calibration split: whole batches, seeded, holding ≥ N "
                  "samples (default: half the batches); the other batches are the fit part"),
         arg("--tolerance", type=float, default=0.0, help="verified when held-out loss ≤ float + this (default 0)"),
         arg("--max-rounds", type=int, default=8, help="back-off rounds (default 8)"),
         arg("--allow-loss-increase", action="store_true",
             help="write the model and exit 0 even when it is not verified (it is marked NOT VERIFIED)"),
         arg("--threads", type=int, default=0,
             help="CPU threads for torch and ONNX Runtime (default 0: their defaults); 1 on a busy machine"),
         arg("--report", default=None, metavar="DIR", help="write report.json/.md/.html with plots here"),
         _JSON)
def cmd_optimize(args) -> int:
    """Measure every compressible node's candidates (bit-widths or ranks) by their effect on the loss, choose
    one per node, rewrite the graph, and verify the held-out loss in ONNX Runtime against the float model.
    The model is written only when verified (or with --allow-loss-increase, marked as not verified)."""
    import dataclasses

    from .flows.context import create_context, derive_context
    from .model_io import save_model
    from .progress import StageTimer, set_enabled
    from .report import emit_json
    from .report_files import write_report

    _check_numbers(args)
    set_enabled(not args.json)
    if args.threads:
        import torch

        from .ort_eval import set_default_threads

        torch.set_num_threads(args.threads)
        set_default_threads(args.threads)
    out = args.out or os.path.splitext(args.model)[0] + ".llc.onnx"
    if os.path.abspath(out) == os.path.abspath(args.model):
        raise LLCError(f"-o {out}: would overwrite the input model; choose another output path")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise LLCError(f"-o {out}: directory '{os.path.dirname(os.path.abspath(out))}' does not exist; create it first")
    methods = args.method.split(",")
    for method in methods:  # option errors before loading anything
        (_quant_config if method == "quant" else _lowrank_config)(args)
    if args.cache:  # before any work, not after the measurements
        from .flows.cost_cache import ensure_directory

        ensure_directory(args.cache)
    if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
        raise LLCError(f"--report {args.report}: exists and is not a directory; give a directory for the report")
    # Models are prepared at opset 21; the QDQ pass moves to opset 25 itself only when INT2 is chosen.
    ctx = create_context(args.model, args.data, held=args.held, holdout=args.holdout, seed=args.seed,
                         batch_size=args.batch_size, measure_samples=args.measure_samples,
                         loss_factory=_loss_factory(args))
    stages, result = [], None
    for i, method in enumerate(methods):
        if i and set(stages[-1]["levels"]) <= {"full", "float"}:
            # the previous stage kept every node as it was: the next works on the same model and context (its
            # measurements, and any --cache entry, are the original model's), with a fresh stage timer
            ctx = dataclasses.replace(ctx, timer=StageTimer())
        elif i:
            ctx = derive_context(ctx, result.model)
        report, result = _stage(ctx, method, args)
        stages.append(report)
    report = dict(stages[-1])
    if len(stages) > 1:  # bytes relative to the original float weights, stages listed
        report["bytes"] = {"reference": stages[0]["bytes"]["reference"], "compressed": stages[-1]["bytes"]["compressed"]}
        report["bytes"]["reduction"] = 1 - report["bytes"]["compressed"] / report["bytes"]["reference"]
        report["method"] = args.method
        report["stages"] = [{k: s[k] for k in ("method", "levels", "bytes", "held", "verified", "seconds", "cache")
                             if k in s} for s in stages]
    write = report["verified"] or args.allow_loss_increase
    report["output"] = out if write else None
    if write:
        _metadata(result.model, report)
        save_model(result.model, out)
    if args.report:
        report["report_files"] = write_report(report, args.report)
    if args.json:
        emit_json(report)
    else:
        _print(report, stages)
    return 0 if report["verified"] or args.allow_loss_increase else 1
