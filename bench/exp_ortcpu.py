"""Experiment: what llc-onnx can write that ONNX Runtime CPU runs faster than float (issue 12).

    LLC_ONNX_CACHE=/tmp/llc-cache OMP_NUM_THREADS=1 python -m bench.exp_ortcpu fmnist,effnet \
        [--batches 1,32] [--threads 2] [--rounds 31] [--variants fp32,ort-s8,ort-u8,llc-w8a8,...] [--ops]

Builds, for each bench model, the variants below from the calibration split and times them **interleaved**
in one process (``targets.latency.time_sessions``: per round every variant runs, the fastest round is the
figure; on a shared machine load only adds time), at each batch, in a default CPU session with
``--threads`` intra-op threads:

* ``fp32``: the model as exported.
* ``ort-s8``: ORT ``quantize_static`` (QDQ, per-channel symmetric int8 weights, int8 activations, MinMax —
  the bench baseline, ``bench.baselines.ort_int8``).
* ``ort-u8``: ``quantize_static`` with uint8 asymmetric activations and ``reduce_range`` (7-bit weights), the
  ORT recommendation for x86 without VNNI.
* ``llc-w8a8``: every node the ort-cpu target offers W8A8 written as W8A8 (7-bit codes, uint8 activations;
  the output quantized for Conv), nearest rounding, min-max ranges (``targets.plans.plan_nodes``).
* ``llc-w8a8-only:a+b``: W8A8 only for the nodes named (the rest float); ``file:PATH``: a model written
  elsewhere (e.g. by ``llc-onnx optimize``).
* ``llc-mnb4`` / ``llc-mnb2`` / ``llc-mnb8``: every MatMul/Gemm the target offers as MatMulNBits at that width
  (accuracy level 4); ``ort-int4``: ORT's ``MatMulNBitsQuantizer`` (block 32, symmetric; ``bench.baselines``).

``--ops`` prints the node types of each variant after ORT's graph optimizations (what actually runs).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import numpy as np
import onnx


def _dataset(path: str, model, n: int, batch: int):
    from llc_onnx.calib.data import load_dataset

    with np.load(path) as z:
        arrays = {k: z[k][:n] for k in z.files}
    tmp = tempfile.NamedTemporaryFile(suffix=".npz", delete=False)
    np.savez(tmp.name, **arrays)
    return load_dataset(tmp.name, model, batch_size=batch)


def ort_u8(model_path: str, dataset, out_path: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bench.baselines import NpzReader

    with tempfile.TemporaryDirectory() as d:
        pre = os.path.join(d, "pre.onnx")
        quant_pre_process(model_path, pre)
        quantize_static(pre, out_path, NpzReader(dataset), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def llc_w8a8(model: onnx.ModelProto, dataset, only=None, kind: str = "w8a8", bits: int = 8) -> onnx.ModelProto:
    """Every node the ort-cpu target offers ``kind`` (w8a8 / matmulnbits at ``bits``) written so (nearest
    rounding, min-max ranges); ``only``: restrict to these node names."""
    from llc_onnx.compressible import find_compressible
    from llc_onnx.targets import get_target
    from llc_onnx.targets.plans import plan_nodes

    t = get_target("ort-cpu")
    nodes = find_compressible(model)[0]
    offers = t.offers(model, nodes, levels=(bits, "float"))
    choice = {}
    for n in nodes:
        fmts = [f for f in offers[n.name].formats if f.kind == kind]
        if fmts and (only is None or n.name in only):
            choice[n.name] = fmts[0]
    plans = plan_nodes(t, model, choice, data=dataset)
    return t.rewrite(model, plans).model


def optimized_ops(model: onnx.ModelProto | str, threads: int) -> collections.Counter:
    from llc_onnx.targets import get_target

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "opt.onnx")
        get_target("ort-cpu").session().make_session(model, intra_op_num_threads=threads, optimized_model_path=p)
        m = onnx.load(p)
    return collections.Counter(n.op_type for n in m.graph.node)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--variants", default="fp32,ort-s8,ort-u8,llc-w8a8")
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples for the quantized variants")
    args = ap.parse_args(argv)
    from bench import models as bm
    from bench.baselines import ort_int8
    from llc_onnx.model_io import prepare_model
    from llc_onnx.targets import get_target
    from llc_onnx.targets.latency import time_sessions

    settings = get_target("ort-cpu").session()
    wanted = args.variants.split(",")
    for bench in bm.get(args.models):
        bench.prepare()
        path = str(bench.model_path())
        model = prepare_model(onnx.load(path), opset=21)
        ds = _dataset(str(bench.calib_path()), model, args.calib, min(args.calib, bench.batch_size))
        built: dict[str, object] = {}
        with tempfile.TemporaryDirectory() as d:
            for v in wanted:
                out = os.path.join(d, v + ".onnx")
                if v == "fp32":
                    built[v] = path
                elif v == "ort-s8":
                    ort_int8(path, ds, out)
                    built[v] = out
                elif v == "ort-u8":
                    ort_u8(path, ds, out)
                    built[v] = out
                elif v == "llc-w8a8":
                    built[v] = llc_w8a8(model, ds)
                elif v in ("llc-mnb4", "llc-mnb2", "llc-mnb8"):
                    built[v] = llc_w8a8(model, ds, kind="matmulnbits", bits=int(v[-1]))
                elif v == "ort-int4":
                    from bench.baselines import ort_int4

                    ort_int4(path, out)
                    built[v] = out
                elif v.startswith("file:"):
                    built[v] = v[5:]
                elif v.startswith("llc-w8a8-only:"):
                    built[v] = llc_w8a8(model, ds, set(v.split(":", 1)[1].split("+")))
                else:
                    raise SystemExit(f"unknown variant {v}")
            if args.ops:
                for v, m in built.items():
                    print(f"[{bench.name}] {v}: {dict(optimized_ops(m, args.threads))}", flush=True)
            with np.load(bench.held_path()) as z:
                x = z["input"] if "input" in z.files else None
                arrays = {k: z[k] for k in z.files}
            names = [i.name for i in model.graph.input]
            batches = [int(b) for b in (args.batches or f"1,{bench.latency_batch}").split(",")]
            for b in batches:
                feeds = {k: np.concatenate([arrays[k]] * (-(-b // len(arrays[k]))))[:b] for k in names}
                sessions = {v: settings.make_session(m, intra_op_num_threads=args.threads) for v, m in built.items()}
                t = time_sessions(sessions, feeds, rounds=args.rounds)
                ref = t["fp32"].min_ms if "fp32" in t else None
                load = os.getloadavg()[0]
                for v, tm in t.items():
                    rel = f"{ref / tm.min_ms:5.2f}x fp32 speed" if ref else ""
                    print(f"[{bench.name}] batch {b:3d} threads {args.threads} load {load:4.1f}  {v[-28:]:28s} "
                          f"min {tm.min_ms:8.3f} ms  median {tm.median_ms:8.3f} ms  {rel}", flush=True)
    del x
    sys.stdout.flush()


if __name__ == "__main__":
    main()
