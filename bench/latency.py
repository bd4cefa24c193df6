"""ONNX Runtime CPU latency of a model: median over repeats with the min-max spread, after warm-up.

    python -m bench.latency model.onnx data.npz [--batch 1,32] [--repeats 20] [--threads 2]

Sessions come from :func:`llc_onnx.ort_eval.make_session` (CPU provider,
``session.qdq_matmulnbits_accuracy_level=0``, deterministic compute) with ``intra_op_num_threads`` set
explicitly. The inputs are the first ``batch`` samples of the data (repeated when it has fewer). On a shared
machine the spread matters as much as the median: both are reported.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

WARMUP = 3


def batch_inputs(npz_path: str, input_names: list[str], batch: int) -> dict[str, np.ndarray]:
    with np.load(npz_path) as z:
        feeds = {}
        for name in input_names:
            a = z[name]
            reps = -(-batch // len(a))
            feeds[name] = np.concatenate([a] * reps)[:batch] if reps > 1 else a[:batch]
    return feeds


def measure(model_path: str, npz_path: str, batch: int, repeats: int = 20, threads: int = 2,
            warmup: int = WARMUP, min_seconds: float = 0.0) -> dict:
    """{"batch", "threads", "repeats", "median_ms", "min_ms", "max_ms"} for one session.run per repeat."""
    from llc_onnx.ort_eval import make_session

    sess = make_session(str(model_path), intra_op_num_threads=threads)
    names = [i.name for i in sess.get_inputs()]
    feeds = batch_inputs(npz_path, names, batch)
    out = [sess.get_outputs()[0].name]
    for _ in range(warmup):
        sess.run(out, feeds)
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        sess.run(out, feeds)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"batch": batch, "threads": threads, "repeats": len(times), "warmup": warmup,
            "median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def fmt(lat: dict | None) -> str:
    if not lat:
        return "–"
    if "error" in lat:
        return "error"
    return f"{lat['median_ms']:.2f} ({lat['min_ms']:.2f}–{lat['max_ms']:.2f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("data", help="npz holding one array per graph input")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    for b in (int(x) for x in a.batch.split(",")):
        print(json.dumps(measure(a.model, a.data, b, a.repeats, a.threads)))


if __name__ == "__main__":
    main()
