"""ONNX Runtime CPU latency and throughput of a model against FP32, interleaved, in the row's target session.

    python -m bench.latency fp32.onnx model.onnx data.npz [--batch 1,64] [--rounds 31] [--threads 2] [--target ort-cpu]

Both sessions run on the same inputs (the first ``batch`` samples of the data, repeated when it has fewer)
in interleaved blocks (``llc_onnx.targets.latency.time_sessions``: warm-up, then three times in turn each
session runs two settling runs and a third of the rounds; a sample is the mean per-run time of a round), so
load on a shared machine hits both alike while each session is timed as a deployed one runs, alone (its
docstring has the measurement behind that). The FP32 model runs in a default CPU session (what users of
ONNX Runtime run), the model in its target's session (``bench.evaluate.target_session``). Intra-op threads are
set explicitly. Reported per batch: median, 25–75 % and min–max in ms; throughput (samples/s) and speed-up
over FP32 from the **fastest rounds** (load on this shared machine only ever adds time; the medians of batch-1
runs of a few ms moved by 2× between repeats), the ratio of the medians beside it (``speedup_median``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def batch_inputs(npz_path: str, input_names: list[str], batch: int) -> dict[str, np.ndarray]:
    with np.load(npz_path) as z:
        feeds = {}
        for name in input_names:
            a = z[name]
            reps = -(-batch // len(a))
            feeds[name] = np.concatenate([a] * reps)[:batch] if reps > 1 else a[:batch]
    return feeds


def _timing(t) -> dict:
    return {"median_ms": t.median_ms, "q25_ms": t.q25_ms, "q75_ms": t.q75_ms, "min_ms": t.min_ms,
            "max_ms": t.max_ms, "rounds": t.rounds}


def measure(fp_path: str, path: str | None, npz_path: str, batch: int, *, target: str = "ort-cpu",
            threads: int = 2, rounds: int = 31) -> dict:
    """{"batch", "threads", "fp32": timing, "model": timing, "throughput", "throughput_fp32", "speedup"};
    ``path`` None times the FP32 model alone."""
    from llc_onnx.ort_eval import make_session
    from llc_onnx.targets.latency import time_sessions

    from bench.evaluate import FP_TARGET, target_session

    fp_cfg, _ = target_session(FP_TARGET, threads)
    sessions = {"fp32": make_session(str(fp_path), fp_cfg)}
    if path is not None:
        cfg, _ = target_session(target, threads)
        sessions["model"] = make_session(str(path), cfg)
    feeds = batch_inputs(npz_path, [i.name for i in sessions["fp32"].get_inputs()], batch)
    t = time_sessions(sessions, feeds, rounds=rounds)
    out = {"batch": batch, "threads": threads, "target": target, "fp32": _timing(t["fp32"]),
           "throughput_fp32": batch / t["fp32"].min_ms * 1e3}
    if path is not None:
        m = t["model"]
        out.update(model=_timing(m), throughput=batch / m.min_ms * 1e3, speedup=t["fp32"].min_ms / m.min_ms,
                   speedup_median=t["fp32"].median_ms / m.median_ms)
    return out


def fmt(lat: dict | None) -> str:
    """"median (min–max) ms, ×speed-up" for a table cell."""
    if not lat:
        return "–"
    if "error" in lat:
        return "error"
    m = lat.get("model") or lat["fp32"]
    s = f"{m['median_ms']:.2f} ({m['min_ms']:.2f}–{m['max_ms']:.2f})"
    if "speedup" in lat:
        s += f", {lat['speedup']:.2f}×"
    return s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    ap.add_argument("fp32")
    ap.add_argument("model")
    ap.add_argument("data", help="npz holding one array per graph input")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="ort-cpu")
    a = ap.parse_args(argv)
    for b in (int(x) for x in a.batch.split(",")):
        print(json.dumps(measure(a.fp32, a.model, a.data, b, target=a.target, threads=a.threads, rounds=a.rounds)))


if __name__ == "__main__":
    main()
