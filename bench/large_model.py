"""A synthetic model above 2 GB (external data) end to end: ``inspect``, ``optimize`` of a subset of nodes
(``--nodes``), ``compare``; wall time and peak RSS of each command; then the ``.onnx``/``.data`` pair under an
interrupted rewrite (SIGTERM and SIGKILL while the new data file is being written).

    python -m bench.large_model --dir /tmp/llc-large              # 2.15 GB: 8 MatMul 8192x8192 + a head
    python -m bench.large_model --dir /tmp/llc-small --size-gb 0.3  # the same at a smaller scale

Needs ~3x the model size in free memory (checked before it starts) and about twice its size on disk. Prints a
Markdown table (for bench/fuzz.md) and writes ``results.json`` in ``--dir``. Not part of CI (minutes, GBs):
``tests/test_large_model.py`` runs it under ``pytest -m large``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(directory: str, size_gb: float, width: int = 8192, samples: int = 32, classes: int = 10,
          seed: int = 0) -> tuple[str, str, list[str]]:
    """``model.onnx`` (+ its data file) of ``ceil(size_gb / (4·width²))`` MatMul(width×width) + Relu layers and
    a MatMul head, weights N(0, 1/width), and ``data.npz`` (``samples`` inputs, labels from the model's own
    logits with 10 % flipped). One weight is in numpy at a time; the forward pass runs as the weights are made.
    Returns (model path, data path, node names)."""
    from llc_onnx.model_io import save_model

    rng = np.random.default_rng(seed)
    layers = max(1, math.ceil(size_gb * 1e9 / (4 * width * width)))
    x = rng.normal(size=(samples, width)).astype(np.float32)
    h = x.astype(np.float64)
    nodes, inits, names = [], [], []
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.float32(math.sqrt(width)))
        h = np.maximum(h @ w, 0) * math.sqrt(2.0)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        del w
        src = "x" if i == 0 else f"s{i}"
        nodes += [helper.make_node("MatMul", [src, f"W{i}"], [f"h{i}"], name=f"fc{i}"),
                  helper.make_node("Mul", [f"h{i}", "gain"], [f"g{i}"], name=f"gain{i}"),
                  helper.make_node("Relu", [f"g{i}"], [f"s{i + 1}"], name=f"relu{i}")]
        names.append(f"fc{i}")
    head = (rng.standard_normal((width, classes), dtype=np.float32) / np.float32(math.sqrt(width)))
    logits = h @ head
    inits += [numpy_helper.from_array(head, "Wh"), numpy_helper.from_array(np.array(math.sqrt(2.0), np.float32), "gain")]
    nodes.append(helper.make_node("MatMul", [f"s{layers}", "Wh"], ["logits"], name="head"))
    names.append("head")
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = os.path.join(directory, "model.onnx")
    save_model(model, path)
    del model, graph, inits
    y = logits.argmax(1).astype(np.int64)
    flip = rng.random(samples) < 0.1
    y[flip] = rng.integers(0, classes, size=int(flip.sum()))
    data = os.path.join(directory, "data.npz")
    np.savez(data, x=x, labels=y)
    return path, data, names


def timed(argv: list[str]) -> dict:
    """Run ``python -m llc_onnx argv`` under /usr/bin/time: exit code, wall seconds, peak RSS (GB), stdout."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "llc_onnx", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.time() - t0
    lines = p.stderr.strip().splitlines()
    rss_kb = int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
    return {"argv": argv, "rc": p.returncode, "seconds": round(wall, 1), "peak_rss_gb": round(rss_kb / 1e6, 2),
            "stdout": p.stdout, "stderr": "\n".join(lines[:-1])}


def _pair(directory: str, name: str) -> dict[str, tuple[int, int]]:
    """{file: (size, mtime_ns)} of ``name`` and its data files in ``directory``."""
    return {f: (os.stat(os.path.join(directory, f)).st_size, os.stat(os.path.join(directory, f)).st_mtime_ns)
            for f in os.listdir(directory) if f == name or f.startswith(name + ".")}


def interrupt_rewrite(model: str, data: str, out: str, nodes: str, sig: int) -> dict:
    """Start ``optimize`` onto ``out`` again (other levels, so other bytes) and send ``sig`` once its new data
    file is being written (a temporary directory with ≥ 64 MB in it); then check that ``out`` is the previous
    pair, unchanged, and that nothing else is left (SIGTERM; after SIGKILL the temporary directory may stay)."""
    directory, name = os.path.dirname(out), os.path.basename(out)
    before = _pair(directory, name)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "llc_onnx", "optimize", model, "--data", data, "--nodes", nodes,
                             "-o", out, "--json", "--allow-loss-increase", "--no-latency", "--bits", "4,8",
                             "--budget", "0.9"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    hit = False
    while proc.poll() is None:
        tmps = [os.path.join(directory, f) for f in os.listdir(directory) if f.startswith(f".{name}.")]
        size = sum(os.path.getsize(os.path.join(t, f)) for t in tmps if os.path.isdir(t) for f in os.listdir(t))
        if size >= 64 << 20:
            proc.send_signal(sig)
            hit = True
            break
        time.sleep(0.05)
    _, err = proc.communicate()
    after = _pair(directory, name)
    leftovers = sorted(f for f in os.listdir(directory) if f.startswith(f".{name}."))
    return {"signal": signal.Signals(sig).name, "hit_during_write": hit, "rc": proc.returncode,
            "stderr_last": err.decode().strip().splitlines()[-1:] if err else [],
            "pair_unchanged": before == after, "leftovers": leftovers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="working directory (created; ~2x the model size on disk)")
    ap.add_argument("--size-gb", type=float, default=2.15, help="weights in GB (default 2.15: over protobuf's 2 GB)")
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--nodes", default="fc0,head", help="nodes optimize compresses (default fc0,head)")
    ap.add_argument("--no-interrupt", action="store_true", help="skip the interrupted-rewrite checks")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    avail = _available_gb()
    if avail is not None and avail < 3.2 * args.size_gb:
        print(f"only {avail:.1f} GB of memory available, {3.2 * args.size_gb:.1f} GB needed; stopping", file=sys.stderr)
        return 2
    t0 = time.time()
    model, data, names = build(args.dir, args.size_gb, args.width)
    results = {"size_gb": args.size_gb, "width": args.width, "layers": len(names) - 1,
               "model_bytes": sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
                                  if f.startswith("model.onnx")),
               "build_seconds": round(time.time() - t0, 1)}
    out_dir = os.path.join(args.dir, "out")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "model.llc.onnx")
    steps = {
        "inspect": ["inspect", model, "--json"],
        "optimize": ["optimize", model, "--data", data, "--nodes", args.nodes, "-o", out, "--json",
                     "--allow-loss-increase", "--no-latency", "--bits", "4,8"],
        "inspect output": ["inspect", out, "--json"],
        "compare": ["compare", model, out, "--data", data, "--json"],
    }
    for key, step in steps.items():
        r = timed(step)
        results[key] = {k: v for k, v in r.items() if k != "stdout"}
        if r["rc"] in (0, 1) and r["stdout"].strip():
            results[key]["json"] = json.loads(r["stdout"])
        print(f"{key}: exit {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gb']} GB", file=sys.stderr)
        if r["rc"] not in (0, 1):
            print(r["stderr"], file=sys.stderr)
            break
    results["output_files"] = sorted(os.listdir(out_dir))
    if not args.no_interrupt and os.path.exists(out):
        results["interrupted"] = [interrupt_rewrite(model, data, out, args.nodes, s)
                                  for s in (signal.SIGTERM, signal.SIGKILL)]
    with open(os.path.join(args.dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(table(results))
    return 0 if all(results.get(k, {}).get("rc") in (0, 1) for k in steps) else 1


def _available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


def table(r: dict) -> str:
    rows = ["| step | exit | wall (s) | peak RSS (GB) |", "|---|---|---|---|"]
    for key in ("inspect", "optimize", "inspect output", "compare"):
        if key in r:
            rows.append(f"| `{key}` | {r[key]['rc']} | {r[key]['seconds']} | {r[key]['peak_rss_gb']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
