"""Experiment: per-node latency of dynamic vs static W8A8 (and MatMulNBits) on ONNX Runtime CPU, and the whole
model with every MatMul dynamic W8A8.

    LLC_ONNX_CACHE=/tmp/llc-cache python -m bench.exp_dynamic_units minilm --nodes layer.2/ [--batches 1,64]
    LLC_ONNX_CACHE=/tmp/llc-cache python -m bench.exp_dynamic_units smollm2 --nodes layers.3/,lm_head --whole

Units: ``llc_onnx.targets.latency.measure_latency_table`` (the table ``--latency-budget`` plans with: each node
cut out with its epilogue, written by the ort-cpu target's own rewrite in every offered 8/4-bit format, timed
interleaved with float), fastest of ``--rounds`` rounds, printed as a fraction of the float unit's time.
``--whole``: the model with every MatMul written dynamic W8A8 (nearest rounding, 7-bit codes) against FP32,
interleaved, fastest of 7 rounds, at each batch (inputs: the calibration file's first rows).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import numpy_helper as nh

from bench.models import get
from llc_onnx.compressible import find_compressible
from llc_onnx.targets.base import GraphContext, NodePlan
from llc_onnx.targets.latency import measure_latency_table, time_sessions
from llc_onnx.targets.ort_cpu import OrtCpuTarget
from llc_onnx.targets.plans import quantize_for


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bench model: minilm, smollm2, ...")
    ap.add_argument("--nodes", default="", help="comma list of substrings of node names to time as units")
    ap.add_argument("--batches", default=None, help="batch sizes (default: the bench's latency batches)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--whole", action="store_true", help="also time the whole model, every MatMul dynamic")
    args = ap.parse_args(argv)
    bm = get(args.model)[0]
    bm.prepare()
    model = onnx.load(str(bm.model_path()))
    data = np.load(str(bm.calib_path()))
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(bm.latency_batches())
    ins = [i.name for i in model.graph.input]
    feeds = {str(b): {k: data[k][:b] for k in ins} for b in batches}
    target = OrtCpuTarget(w8a8_activations="both")
    ctx = GraphContext(model)
    nodes = find_compressible(model)[0]
    picks = [p for p in args.nodes.split(",") if p]
    if picks:
        chosen = [n for n in nodes if any(p in n.name for p in picks)]
        formats = {n.name: target.offer(n, ctx, levels=(8, 4, "float")).formats for n in chosen}
        t0 = time.perf_counter()
        table = measure_latency_table(target, model, feeds, formats, threads=args.threads, rounds=args.rounds)
        print(f"units of {len(chosen)} nodes timed in {time.perf_counter() - t0:.0f} s; × the float unit's time, "
              "fastest rounds")
        for b in feeds:
            for n in formats:
                u = table.units[b][n]
                fl = u["float"].min_ms
                print(f"batch {b:>3}  {n[-48:]:48s} float {fl:8.3f} ms  " +
                      "  ".join(f"{k} {v.min_ms / fl:.2f}" for k, v in u.items() if k != "float"))
    if args.whole:
        inits = {t.name: t for t in model.graph.initializer}
        dyn = OrtCpuTarget(w8a8_activations="dynamic")
        plans = {}
        for n in nodes:
            fmt = next((f for f in dyn.offer(n, ctx, levels=(8,)).formats if f.dynamic), None)
            if fmt is not None:
                plans[n.name] = NodePlan(format=fmt, weight=quantize_for(fmt, n, nh.to_array(inits[n.weight])))
        out = dyn.rewrite(model, plans).model
        settings = dyn.session()
        sessions = {"fp32": settings.make_session(model, intra_op_num_threads=args.threads),
                    "dynamic": settings.make_session(out, intra_op_num_threads=args.threads)}
        for b, f in feeds.items():
            t = time_sessions(sessions, f, rounds=7)
            print(f"whole model, {len(plans)} of {len(nodes)} nodes dynamic W8A8, batch {b}: FP32 "
                  f"{t['fp32'].min_ms:.2f} ms, dynamic {t['dynamic'].min_ms:.2f} ms: "
                  f"{t['fp32'].min_ms / t['dynamic'].min_ms:.2f}x throughput")


if __name__ == "__main__":
    main()
