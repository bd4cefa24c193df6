"""Plain SVD truncation at fixed parameter fractions: what factoring costs on the held-out loss.

    python -m bench.exp_svd [--model fmnist|smollm2] [--fractions 0.9,0.75,0.6,0.5]

Every compressible node gets the same rank fraction of min(K, N) (nodes where that saves nothing stay whole),
plain truncated SVD factors (``bench.baselines.uniform_svd``), held-out loss in ONNX Runtime. It is the
reference for llc's low-rank modes when they factor nothing: it shows how far from lossless any truncation is.
"""

from __future__ import annotations

import argparse

from bench.baselines import matrix_shape, svd_params, uniform_svd
from bench.datasets import cache_dir
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.model_io import load_model, prepare_model
from llc_onnx.ort_eval import evaluate
from onnx import numpy_helper


# model -> (onnx file, held-out npz, loss, output, batch size, metric shown), all under cache_dir()/<model>
MODELS = {"fmnist": ("fmnist_resnet.onnx", "test.npz", "ce", "logits", 500, "top1"),
          "smollm2": ("smollm2.onnx", "held.npz", "lm", "logits", 2, "ppl")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist", choices=sorted(MODELS))
    ap.add_argument("--fractions", default="0.9,0.75,0.6,0.5")
    args = ap.parse_args(argv)
    onnx_name, held_name, loss_kind, output, batch, metric = MODELS[args.model]
    d = cache_dir() / args.model
    model = prepare_model(load_model(str(d / onnx_name)))
    nodes, _ = find_compressible(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {n.name: inits[n.weight] for n in nodes}
    shapes = {n.name: matrix_shape(n) for n in nodes}
    full = sum(k * n for k, n in shapes.values())
    held = load_dataset(str(d / held_name), model, batch_size=batch)
    loss = make_loss(loss_kind, output)
    ref = evaluate(model, held, loss)

    def shown(ev):
        return f"{ev.metrics[metric]:.2f}" if metric == "ppl" else f"{100 * ev.metrics[metric]:.2f} %"

    print(f"| rank fraction | parameters | ratio | held-out loss | {metric} |\n|---|---|---|---|---|")
    print(f"| float | {full:,} | 1.000 | {ref.loss:.4f} | {shown(ref)} |")
    for f in (float(x) for x in args.fractions.split(",")):
        params, ranks = svd_params(shapes, f)
        ev = evaluate(uniform_svd(model, nodes, weights, ranks), held, loss)
        print(f"| {f:g} | {params:,} | {params / full:.3f} | {ev.loss:.4f} | {shown(ev)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
