"""Experiment: TensorRT's explicit-quantization rules on a whole model written in the tensorrt target's formats
(issue 12).

    LLC_ONNX_CACHE=/tmp/llc-cache python -m bench.exp_trt_check smollm2 [--block 64] [--samples 1]

Every compressible node of the bench model gets a format the ``tensorrt`` target offers it — W8A8 (int8 Q/DQ on
weight and input) on even-numbered nodes and INT4 weight-only blocks on odd ones where offered, else the other
— nearest rounding, min–max activation ranges from the first ``--samples`` calibration samples
(``targets.plans.plan_nodes``), written by ``TensorRTTarget.rewrite``; then ``targets.check_tensorrt`` lists
every violation with its node. This checks the rewrite's output on the model's real graph (a transformer's
3-D MatMuls, shared embeddings) without the hours of an ``optimize --target tensorrt`` run: the formats a
lossless plan can pick are a subset of these, and a mixed plan has both kinds next to each other.
"""
from __future__ import annotations

import argparse
import collections
import sys

import numpy as np


def main(argv=None) -> int:
    from bench.models import get as select_models
    from llc_onnx.compressible import find_compressible
    from llc_onnx.model_io import load_model
    from llc_onnx.targets import check_tensorrt, get_target
    from llc_onnx.targets.base import GraphContext
    from llc_onnx.targets.plans import plan_nodes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", help="bench model names, comma-separated (fmnist, effnet, smollm2, minilm)")
    ap.add_argument("--block", type=int, default=64, help="INT4 block size (TensorRT takes 64 or 128)")
    ap.add_argument("--samples", type=int, default=1, help="calibration samples for the activation ranges")
    a = ap.parse_args(argv)
    bad = 0
    for bm in select_models(a.models):
        bm.prepare()
        model = load_model(str(bm.model_path()))
        t = get_target("tensorrt")
        ctx = GraphContext(model)
        with np.load(bm.calib_path()) as z:
            feeds = [{i.name: z[i.name][: a.samples] for i in model.graph.input}]
        choices = {}
        for i, n in enumerate(find_compressible(model)[0]):
            fmts = [f for f in t.offer(n, ctx, levels=(4, 8, "float"), block_size=a.block).formats if f.kind != "float"]
            pref = sorted(fmts, key=lambda f: (f.kind == "w8a8") == bool(i % 2))
            if pref:
                choices[n.name] = pref[0]
        plans = plan_nodes(t, model, choices, data=feeds)
        written = t.rewrite(model, plans).model
        v = check_tensorrt(written)
        kinds = collections.Counter(f.name for f in choices.values())
        print(f"{bm.name}: {len(choices)} nodes written ({', '.join(f'{k}×{c}' for k, c in sorted(kinds.items()))}); "
              f"check_tensorrt: {'passes' if not v else f'{len(v)} violation(s)'}")
        for x in v[:20]:
            print(f"  {x.node}: [{x.rule}] {x.message}")
        bad += bool(v)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
