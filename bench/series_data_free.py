"""Data-free series expansion (FP = xINT) on the bundled example: loss in ONNX Runtime vs FP32, and bytes.

    python -m bench.series_data_free [--model examples/fashion_cnn.onnx --data examples/fashion_data.npz]

Every compressible node is expanded into T b-bit terms without data (b=4: T=1..3, b=2: T=2..4; b=8, T=1 and
b=4/b=2, T=1 are the single-level quantizers for reference) and written in the standard ONNX form. The loss is
measured on the whole file (no data was used to build the models, so all of it is held out) and on the held-out
half of ``split_dataset(seed=0)`` (the split ``optimize`` verifies on). Bytes: stored codes + scales of the
compressed weights (padding to whole blocks included) against their float32 bytes.
"""

from __future__ import annotations

import argparse
import math
import time

from llc_onnx.calib.data import load_dataset, split_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.model_io import load_model, prepare_model
from llc_onnx.ort_eval import evaluate
from llc_onnx.series import data_free

CONFIGS = [(8, 1), (4, 1), (4, 2), (4, 3), (2, 1), (2, 2), (2, 3), (2, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="examples/fashion_cnn.onnx")
    ap.add_argument("--data", default="examples/fashion_data.npz")
    ap.add_argument("--output", default="logits")
    ap.add_argument("--form", default="standard", choices=["standard", "custom"])
    args = ap.parse_args(argv)
    model = load_model(args.model)
    prepared = prepare_model(model)
    ds = load_dataset(args.data, prepared, batch_size=250)
    _, held = split_dataset(ds, holdout=0.5, seed=0)
    loss = make_loss("ce", args.output)
    nodes, _ = find_compressible(prepared)
    inits = {t.name: t for t in prepared.graph.initializer}
    float_bytes = sum(4 * math.prod(inits[w].dims) for w in {n.weight for n in nodes})
    base_all, base_held = evaluate(prepared, ds, loss), evaluate(prepared, held, loss)
    print(f"{args.model}: {len(nodes)} nodes, {float_bytes} float32 weight bytes; "
          f"all {base_all.n} samples, held-out {base_held.n}")
    print("| b | T | bytes | × float | CE all | Δ all | top1 all | CE held | Δ held | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| fp32 | – | {float_bytes} | 1.000 | {base_all.loss:.4f} | – | {base_all.metrics['top1']:.4f} | "
          f"{base_held.loss:.4f} | – | – |")
    for bits, terms in CONFIGS:
        t0 = time.perf_counter()
        res = data_free(model, bits=bits, terms=terms, form=args.form)
        ev_all, ev_held = evaluate(res.model, ds, loss), evaluate(res.model, held, loss)
        dt = time.perf_counter() - t0
        print(f"| {bits} | {terms} | {res.nbytes} | {res.nbytes / float_bytes:.3f} | {ev_all.loss:.4f} | "
              f"{ev_all.loss - base_all.loss:+.5f} | {ev_all.metrics['top1']:.4f} | {ev_held.loss:.4f} | "
              f"{ev_held.loss - base_held.loss:+.5f} | {dt:.1f} |")
        rel = ", ".join(f"{k}: " + "/".join(f"{r / w.weight_norm:.3g}" for r in w.residual_norms)
                        for k, w in res.series.weights.items())
        print(f"|   | relative residual ‖R_t‖/‖W‖ per node: {rel} |||||||||")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
