"""Series expansion (FP = xINT) against single-level quantization, data-free and LLC-chosen, as Markdown rows.

    python -m bench.exp_series --model example [--target qdq] [--part data-free|llc|all]
    LLC_ONNX_CACHE=/tmp/llc-cache python -m bench.exp_series --model fmnist --target ort-cpu --part llc

Models: ``example`` (examples/fashion_cnn.onnx; its data split as ``optimize`` splits it: holdout 0.5, seed 0, so
the test split is the same half in every row) and ``fmnist`` (``bench.prepare_fmnist``: calibration = the last
10,000 training images, test = the official 10,000 test images).

* ``data-free`` rows (``llc_onnx.flows.series.data_free_expansion``, no data used): b=4 T=1..3 and b=2 T=1..4,
  and the single-level quantizers with the same scales and rounding (nearest, MSE scales, blocks of 32 for 2/4 bits,
  per channel for 8/16: ``int4`` is exactly b=4 T=1) for the comparison at equal bytes. Test-split CE in two
  sessions: exact (``ort_eval.EXACT``, the Q/DQ maths) and a default ORT CPU session (what a user runs: the
  standard form fused where ORT fuses it, MatMulNBits at accuracy level 4).
* ``llc`` rows (``api.optimize`` on ``--target``): ``--method series`` lossless and ``--budget 0.25``,
  ``--method quant`` (single-level family, LLC-chosen) at the same two settings, and ``quant,series`` (one
  knapsack) at 0.25; verdict, test ΔCE, bytes, levels chosen and the latency the summary measures (batch 1 and
  the calibration batch, fastest of interleaved rounds on this shared machine: ±30 %).

Bytes are the compressible weights' stored bytes (codes + scales, padding included) over their float32 bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA_FREE = [(4, 1), (4, 2), (4, 3), (2, 1), (2, 2), (2, 3), (2, 4)]
SINGLE = [2, 4, 8, 16]


def _files(model: str):
    """(model path, data, held or None, measure_samples)."""
    if model == "example":
        return REPO / "examples/fashion_cnn.onnx", REPO / "examples/fashion_data.npz", None, None
    from bench.datasets import cache_dir

    d = cache_dir() / "fmnist"
    if not (d / "fmnist_resnet.onnx").is_file():
        raise SystemExit(f"{d}: no prepared model; run python -m bench.prepare_fmnist (or set LLC_ONNX_CACHE)")
    return d / "fmnist_resnet.onnx", d / "calib.npz", d / "test.npz", 2000


def _test_split(model_path, data, held):
    from llc_onnx.calib.data import load_dataset, split_dataset
    from llc_onnx.model_io import load_model, prepare_model

    prepared = prepare_model(load_model(str(model_path)), opset=21)
    if held is not None:
        return load_dataset(str(held), prepared, batch_size=250)
    _, test = split_dataset(load_dataset(str(data), prepared, batch_size=64), 0.5, 0, part="test")
    return test


def single_level(model_path, bits: int):
    """(model, bytes, float bytes): every compressible node quantized to ``bits`` (nearest, MSE scales) as Q/DQ."""
    from onnx import numpy_helper

    from llc_onnx.compressible import find_compressible
    from llc_onnx.model_io import load_model, prepare_model
    from llc_onnx.quant import WeightQuantSpec, quantize_weight
    from llc_onnx.targets import Format, NodePlan, get_target

    prepared = prepare_model(load_model(str(model_path)), opset=21)
    nodes = find_compressible(prepared)[0]
    inits = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    block = 32 if bits in (2, 4) else None
    fmt = Format("qdq", bits, block)
    plans = {}
    for n in nodes:
        qw = quantize_weight(inits[n.weight], WeightQuantSpec(bits, block, "mse", "nearest"), n.out_axis,
                             n.reduce_axis)
        plans[n.name] = NodePlan(fmt, qw)
    out = get_target("qdq").rewrite(prepared, plans).model
    return out, sum(fmt.nbytes(n) for n in nodes), sum(4 * math.prod(n.weight_shape) for n in nodes)


def data_free_rows(model_path, test, loss) -> list[str]:
    from llc_onnx.flows.series import data_free_expansion
    from llc_onnx.model_io import load_model
    from llc_onnx.ort_eval import EXACT, SessionConfig, evaluate

    default = SessionConfig(threads=1)
    exact = SessionConfig(threads=1, entries=EXACT.entries, description=EXACT.description)
    model = load_model(str(model_path))
    fp_e, fp_d = evaluate(model, test, loss, session=exact), evaluate(model, test, loss, session=default)
    rows = [f"| fp32 | – | 1.000 | {fp_e.loss:.4f} | – | {fp_d.loss:.4f} | – | {fp_e.metrics['top1']:.4f} | |"]
    for bits in SINGLE:
        m, nbytes, fbytes = single_level(model_path, bits)
        e, d = evaluate(m, test, loss, session=exact), evaluate(m, test, loss, session=default)
        rows.append(f"| single int{bits} | – | {nbytes / fbytes:.3f} | {e.loss:.4f} | {e.loss - fp_e.loss:+.5f} | "
                    f"{d.loss:.4f} | {d.loss - fp_d.loss:+.5f} | {e.metrics['top1']:.4f} | |")
    for bits, terms in DATA_FREE:
        r = data_free_expansion(model, bits=bits, terms=terms)
        e, d = evaluate(r.model, test, loss, session=exact), evaluate(r.model, test, loss, session=default)
        res = f"{max(n.relative_residuals[terms - 1] for n in r.nodes):.2g}"
        rows.append(f"| series b={bits} | {terms} | {r.nbytes / r.float_bytes:.3f} | {e.loss:.4f} | "
                    f"{e.loss - fp_e.loss:+.5f} | {d.loss:.4f} | {d.loss - fp_d.loss:+.5f} | {e.metrics['top1']:.4f} "
                    f"| {res} |")
    head = ["| rows | T | × fp32 bytes | test CE exact | Δ exact | test CE ORT default | Δ default | "
            "top-1 (exact) | max ‖R_T‖/‖W‖ |", "|---|---|---|---|---|---|---|---|---|"]
    return head + rows


def _levels(stage) -> str:
    c = Counter(n.level for n in stage.nodes)
    return ", ".join(f"{k}×{v}" for k, v in sorted(c.items()))


RUNS = "series:lossless,series:0.25,quant:lossless,quant:0.25,quant+series:0.25"


def llc_rows(model_path, data, held, ms, target: str, cache: str, runs: str = RUNS) -> list[str]:
    from llc_onnx import api
    from llc_onnx.errors import LLCError
    from llc_onnx.config import (CriterionConfig, DataConfig, DeviceConfig, OptimizeConfig, QuantConfig,
                                 TargetConfig)

    runs = [(m.replace("+", ","), None if b == "lossless" else float(b))
            for m, b in (r.split(":") for r in runs.split(","))]
    rows = ["| method | budget | verified | test CE fp32 → compressed | Δ | × fp32 bytes | levels | latency b1 "
            "(float → compressed ms) | latency batch | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, budget in runs:
        cfg = OptimizeConfig(method=tuple(method.split(",")), quant=QuantConfig(budget=budget),
                             data=DataConfig(measure_samples=ms), device=DeviceConfig(threads=1),
                             target=TargetConfig(name=target), criterion=CriterionConfig(allow_loss_increase=True),
                             cache_dir=cache)
        t0 = time.perf_counter()
        try:
            res = api.optimize(str(model_path), str(data), cfg, held=None if held is None else str(held))
        except LLCError as exc:  # e.g. an infeasible budget on this target: a result, not a crash
            rows.append(f"| {method} | {'lossless' if budget is None else budget} | {exc} |||||||")
            print(rows[-1], flush=True)
            continue
        secs = time.perf_counter() - t0
        t = res.splits["test"]
        st = res.stages[-1]
        lat = res.target.get("latency") or {}
        b1 = lat.get("1", {})
        big = [(k, v) for k, v in lat.items() if k != "1"]
        lat1 = f"{b1['float_ms']:.3f} → {b1['compressed_ms']:.3f}" if b1 else "–"
        latb = f"{big[0][0]}: {big[0][1]['float_ms']:.3f} → {big[0][1]['compressed_ms']:.3f}" if big else "–"
        rows.append(f"| {method} | {'lossless' if budget is None else budget} | "
                    f"{'VERIFIED' if res.verified else 'not verified'} | {t.reference.loss:.4f} → "
                    f"{t.compressed.loss:.4f} | {t.compressed.loss - t.reference.loss:+.5f} | "
                    f"{st.compressed_bytes / st.reference_bytes:.3f} | {_levels(st)} | {lat1} | {latb} | "
                    f"{secs:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="example", choices=("example", "fmnist"))
    ap.add_argument("--target", default="qdq", choices=("qdq", "ort-cpu"))
    ap.add_argument("--part", default="all", choices=("data-free", "llc", "all"))
    ap.add_argument("--runs", default=RUNS, help=f"llc rows as method:budget (default {RUNS})")
    ap.add_argument("--cache", default=None, help="cost cache directory shared by the llc rows (default: a "
                                                   "directory under the bench cache)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from llc_onnx.calib.losses import make_loss

    model_path, data, held, ms = _files(args.model)
    print(f"## {args.model}: {model_path.name}", flush=True)
    if args.part in ("data-free", "all"):
        test = _test_split(model_path, data, held)
        print(f"\n### data-free (test split: {test.n_samples} samples)\n", flush=True)
        for row in data_free_rows(model_path, test, make_loss("ce", "logits")):
            print(row, flush=True)
    if args.part in ("llc", "all"):
        from bench.datasets import cache_dir

        cache = args.cache or str(cache_dir() / "bench" / "series-cost-cache")
        os.makedirs(cache, exist_ok=True)
        print(f"\n### LLC-chosen, --target {args.target}\n", flush=True)
        llc_rows(model_path, data, held, ms, args.target, cache, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
