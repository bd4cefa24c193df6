"""Weight-only Triton kernels against cuBLAS fp16/bf16 matmul, one GPU, one command (≤ 8 min on an H100/H200).

    python -m bench.gpu_kernels                 # from the repository root; prints Markdown tables
    python -m bench.gpu_kernels --quick         # 4096×4096 and M=1 only (~1 min)
    TRITON_INTERPRET=1 python -m bench.gpu_kernels --dry-run   # CPU: tiny shapes in Triton's interpreter,
                                                               # checks the script itself, times mean nothing

On the GPU machine, run with it the GPU halves of the tests (kernels on CUDA vs first principles and ORT,
the runner on CUDA, ``run --device cuda``, optimize on CUDA): ``python -m pytest -q tests/test_plugins_kernels.py
tests/test_plugins_runner.py tests/test_cli_deploy.py tests/test_device_plumbing.py``, and the optimize-on-CUDA
wall-time comparison ``python -m bench.gpu_optimize`` (≤ 8 min on its own: give it a separate call).
Exit status: 0 when every goal is met, 1 when one is not, 2 when there is no GPU / Triton.

Shapes K×N ∈ {4096×4096, 4096×14336}, rows M ∈ {1, 16, 256, 1024}, formats INT4, INT2 (block 32), INT8 (per
channel) and INT4×2 (a 2-term series of 4-bit terms), activations fp16 (``--dtype bf16`` for bf16) and scales
in the activation dtype (as ORT's MatMulNBits stores them for an fp16 model; ``--fp32-scales`` for llc-onnx's
fp32 ONNX as written); the baselines are ``torch.matmul`` in fp16 and bf16 (cuBLAS) on the same shapes, in the
same run.

Timing: every candidate configuration of a format (:func:`llc_onnx.plugins.triton.configs.candidates`) is
captured ``R`` times in one CUDA graph, each call on its own copy of the weights (``R`` copies hold ≥ 3× the
L2 cache, so the weights come from HBM as in a real model), the graph is replayed ``--reps`` times and the
median per-call time is kept; the fastest configuration is reported (that is what the autotuner picks). The
cuBLAS baselines are timed the same way. CUDA graphs remove the Python launch overhead from both sides.
Every format is also checked against the fp32 product with the reference dequantization (max error / max
|y|), so a fast wrong kernel cannot pass. The goals of issue 16 are printed with PASS/FAIL:
M=1: INT4 ≥ 3× fp16 (and ≤ 7 µs at 4096²), INT2 ≥ 5×, INT4×2 ≥ 1.8×; M ≥ 256: every format ≥ 0.8× fp16.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

SHAPES = [(4096, 4096), (4096, 14336)]
ROWS = [1, 16, 256, 1024]
FORMATS = {  # name -> (bits, block_size, terms, per_channel)
    "INT4": (4, 32, 1, False),
    "INT2": (2, 32, 1, False),
    "INT8": (8, 128, 1, True),
    "INT4x2": (4, 32, 2, False),
}
GOALS_M1 = {"INT4": 3.0, "INT2": 5.0, "INT4x2": 1.8}
GOAL_LARGE_M = 0.8
INT4_4096_US = 7.0


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def preflight(dry_run: bool = False):
    if dry_run:
        if not os.environ.get("TRITON_INTERPRET"):
            fail("--dry-run runs on CPU in Triton's interpreter: set TRITON_INTERPRET=1")
        import torch

        return torch
    if os.environ.get("TRITON_INTERPRET"):
        fail("TRITON_INTERPRET is set; unset it (the benchmark runs compiled kernels)")
    try:
        import torch
    except ImportError:
        fail("torch is not installed")
    if not torch.cuda.is_available():
        fail(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}); run this "
             "on a GPU machine")
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("triton is not installed (pip install triton)")
    return torch


def make_weights(torch, K, N, bits, bs, terms, per_channel, copies, dev, scale_dtype):
    """``copies`` random (bytes, scales) pairs in MatMulNBits layout (random codes: speed does not depend on them)."""
    nblk = terms * (-(-K // bs))
    out = []
    for i in range(copies):
        g = torch.Generator(device=dev).manual_seed(1000 + i)
        b = torch.randint(0, 256, (N, nblk, bs * bits // 8), dtype=torch.uint8, device=dev, generator=g)
        ns = N * terms if per_channel else N * nblk
        s = (torch.rand(ns, device=dev, generator=g) + 0.5) / (2 ** (bits - 1) * math.sqrt(K))
        out.append((b, s.to(scale_dtype)))
    return out


def graph_time_us(torch, calls, reps):
    """Median µs per call of ``calls`` (list of zero-arg callables) captured back to back in one CUDA graph."""
    if not torch.cuda.is_available():  # --dry-run: wall time of one pass, meaningless but exercises the code
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:2]:  # warm-up outside the graph (allocations, compile)
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def n_copies(torch, bytes_per_copy, l2):
    return max(2, min(64, math.ceil(3 * l2 / max(bytes_per_copy, 1))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activation dtype of our kernels")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="4096×4096, M=1 only")
    ap.add_argument("--max-seconds", type=float, default=450.0, help="stop starting new cases after this")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script")
    ap.add_argument("--fp32-scales", action="store_true", help="fp32 scales instead of the activation dtype")
    args = ap.parse_args(argv)
    torch = preflight(args.dry_run)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton

    from llc_onnx.plugins.triton import reference
    from llc_onnx.plugins.triton.configs import candidates
    from llc_onnx.plugins.triton.launch import launch, weight_words

    act = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = ROWS[:1] if args.quick else ROWS
    if args.dry_run:
        dev, gpu, l2, shapes, rows, args.reps = torch.device("cpu"), "CPU (dry run)", 1, [(256, 96)], [1, 80], 1
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        gpu, l2 = props.name, int(getattr(props, "L2_cache_size", 50 * 2 ** 20))
    t_start = time.perf_counter()
    print(f"# Weight-only kernels vs cuBLAS — {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"activations {args.dtype}, scales {'fp32' if args.fp32_scales else args.dtype}, L2 {l2 >> 20} MiB\n")
    results = {}   # (K, N, M) -> {name: (us, label, err)}
    for K, N in shapes:
        for M in rows:
            if time.perf_counter() - t_start > args.max_seconds:
                print(f"(stopped at {K}×{N} M={M}: --max-seconds {args.max_seconds:.0f} reached)\n")
                break
            row = {}
            x = torch.randn(M, K, device=dev, dtype=act)
            for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                ws = [torch.randn(K, N, device=dev, dtype=dt) / math.sqrt(K)
                      for _ in range(n_copies(torch, K * N * 2, l2))]
                xd = x.to(dt)
                row[name] = (graph_time_us(torch, [lambda w=w: torch.matmul(xd, w) for w in ws], args.reps),
                             "cuBLAS", 0.0)
                del ws
            for fname, (bits, bs, terms, pc) in FORMATS.items():
                sdt = torch.float32 if args.fp32_scales else act
                per_copy = terms * N * K * bits // 8 + (N * terms if pc else N * terms * K // bs) * sdt.itemsize
                copies = make_weights(torch, K, N, bits, bs, terms, pc, n_copies(torch, per_copy, l2), dev, sdt)
                words = [(weight_words(b), s) for b, s in copies]
                best = (float("inf"), "", 0.0)
                for cfg in candidates(M):
                    kw = dict(K=K, N=N, bits=bits, block_size=bs, terms=terms, per_channel=pc, config=cfg)
                    try:
                        us = graph_time_us(torch, [lambda w=w, s=s: launch(x, w, s, **kw) for w, s in words],
                                           args.reps)
                    except Exception as exc:  # noqa: BLE001 - report and go on: one bad config must not end the run
                        print(f"  {fname} {K}×{N} M={M} {cfg.label}: failed ({type(exc).__name__}: {exc})"[:300])
                        continue
                    if us < best[0]:
                        best = (us, cfg.label, 0.0)
                if best[1]:
                    cfg = next(c for c in candidates(M) if c.label == best[1])
                    w, s = words[0]
                    y = launch(x, w, s, K=K, N=N, bits=bits, block_size=bs, terms=terms, per_channel=pc, config=cfg)
                    W = reference.dequantize(copies[0][0], s, K=K, N=N, bits=bits, block_size=bs, terms=terms)
                    ref = x.float() @ W
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    best = (best[0], best[1], err)
                row[fname] = best
                del copies, words
                torch.cuda.empty_cache()
            results[(K, N, M)] = row
            print(f"  {K}×{N} M={M}: " + ", ".join(f"{k} {v[0]:.1f} µs" for k, v in row.items()), flush=True)

    names = ["fp16", "bf16"] + list(FORMATS)
    print("\n## Time per matmul (µs, median of graph replays; × = fp16 time / this time)\n")
    print("| K×N | M | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (K, N, M), row in results.items():
        base = row["fp16"][0]
        cells = [f"{row[n][0]:.1f}" if n in ("fp16", "bf16") else
                 (f"{row[n][0]:.1f} ({base / row[n][0]:.2f}×)" if n in row and row[n][1] else "–") for n in names]
        print(f"| {K}×{N} | {M} | " + " | ".join(cells) + " |")
    print("\n## Chosen configuration and max error / max |y| vs the fp32 product\n")
    print("| K×N | M | " + " | ".join(FORMATS) + " |")
    print("|---|---|" + "---|" * len(FORMATS))
    for (K, N, M), row in results.items():
        print(f"| {K}×{N} | {M} | " + " | ".join(f"{row[n][1]} / {row[n][2]:.1e}" if n in row and row[n][1] else "–"
                                                 for n in FORMATS) + " |")
    print("\n## Goals (issue 16)\n")
    ok_all = True
    for (K, N, M), row in results.items():
        base = row["fp16"][0]
        for fname in FORMATS:
            if fname not in row or not row[fname][1]:
                continue
            speed = base / row[fname][0]
            goal = GOALS_M1.get(fname) if M == 1 else GOAL_LARGE_M if M >= 256 else None
            if goal is None:
                continue
            ok = speed >= goal
            line = f"- {fname} {K}×{N} M={M}: {speed:.2f}× fp16 (goal ≥ {goal}×)"
            if fname == "INT4" and M == 1 and (K, N) == (4096, 4096):
                ok = ok and row[fname][0] <= INT4_4096_US
                line += f", {row[fname][0]:.1f} µs (goal ≤ {INT4_4096_US} µs)"
            tol = 3e-2 if args.dtype == "bf16" else 5e-3
            if row[fname][2] > tol:
                ok = False
                line += f", error {row[fname][2]:.1e} > {tol}"
            ok_all &= ok
            print(line + (" — PASS" if ok else " — FAIL"))
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
