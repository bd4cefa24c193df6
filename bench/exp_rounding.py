"""Nearest vs LLC sign-directed rounding, measured out of sample, per node and bit-width.

    python -m bench.exp_rounding [--measure-samples 2000] [--bits 4,8]

On the Fashion-MNIST bench model (``python -m bench.prepare_fmnist`` first): gradients from the fit part of
the calibration split, loss change with one node quantized measured on the disjoint measure part
(``llc_onnx.flows.context.fit_measure_split``), ΔL ± its paired standard error. This is the measurement
behind ``--llc-radius``: LLC rounding helps where the level stays in the first-order neighbourhood (8-bit)
and hurts outside it (4-bit).
"""

from __future__ import annotations

import argparse

import torch

from bench.datasets import cache_dir
from llc_onnx.calib.gradients import collect_gradients
from llc_onnx.calib.noise import constant, measure
from llc_onnx.config import CriterionConfig, DataConfig, OptimizeConfig, TargetConfig
from llc_onnx.flows.context import create_context
from llc_onnx.quant import WeightQuantSpec, quantize_weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure-samples", type=int, default=2000)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--block-size", type=int, default=32)
    args = ap.parse_args(argv)
    d = cache_dir() / "fmnist"
    config = OptimizeConfig(data=DataConfig(batch_size=250, measure_samples=args.measure_samples),
                            criterion=CriterionConfig(loss="ce"), target=TargetConfig(name="qdq", measure_latency=False))
    ctx = create_context(str(d / "fmnist_resnet.onnx"), str(d / "calib.npz"), config, held=str(d / "test.npz"))
    grads = collect_gradients(ctx.graph, ctx.fit_data, ctx.loss, ctx.nodes)
    base = ctx.base()
    bits = [int(b) for b in args.bits.split(",")]
    print("| node | " + " | ".join(f"int{b} nearest | int{b} llc" for b in bits) + " |")
    print("|---|" + "---|---|" * len(bits))
    for node in ctx.nodes:
        w = ctx.weight_array(node)
        cells = []
        for b in bits:
            for rounding in ("nearest", "llc"):
                spec = WeightQuantSpec(b, args.block_size if b <= 4 else None, "mse", rounding)
                qw = quantize_weight(w, spec, node.out_axis, node.reduce_axis, grad=grads.nodes[node.name].grad_w)
                dl, se = measure(ctx.graph, ctx.measure_data, ctx.loss,
                                 {node.name: constant(torch.as_tensor(qw.dequant))}).delta(base)
                cells.append(f"{dl:+.2e} ± {se:.0e}")
        print(f"| {node.name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
