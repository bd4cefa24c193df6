"""Engine speed on a ResNet-18-shaped model: onnxruntime vs the llc-onnx TorchGraph interpreter vs native torch.

Run from the repository root::

    python -m bench.bench_engine [--batch 8] [--size 224] [--repeats 5] [--threads N] [--no-hvp] [--json PATH|-]

The model is written here (no torchvision): ResNet-18 layout, BasicBlock x [2, 2, 2, 2] with 64-128-256-512
channels, 7x7/2 stem + 3x3/2 max-pool, global average pool, 1000-class Linear head, random weights from a fixed
seed, eval mode (BatchNorm folded into the convolutions by the exporter). It is exported to ONNX (opset 21,
dynamic batch) and timed, per batch of ``--batch`` random images of ``3 x size x size``:

* ``ort forward``                — onnxruntime CPU EP, default graph optimisations, ``intra_op_num_threads``;
* ``torch forward`` / ``torch fwd+bwd`` — the nn.Module itself (reference; fwd+bwd = CE vs random labels,
  gradients of all Conv/Linear weights);
* ``TorchGraph forward``         — :class:`llc_onnx.interpreter.TorchGraph` under ``no_grad``;
* ``TorchGraph fwd+bwd``         — forward with every Conv/Gemm captured, CE loss, ``autograd.grad`` w.r.t.
  the node-local weights (what the gradient pass does, without its statistics);
* ``collect_gradients``          — :func:`llc_onnx.calib.gradients.collect_gradients` on a one-batch dataset
  (the real per-batch cost of the gradient pass, statistics included);
* ``hessian.hvp``                — :func:`llc_onnx.solvers.hessian.hvp` over all Conv/Gemm weights on a
  one-batch dataset (forward + backward with ``create_graph`` + second backward); ``--no-hvp`` skips it.

Each row: one warm-up call, then ``--repeats`` timed calls, the rows interleaved round-robin (load from
other processes spreads over all rows); median with [min, max], and images/s from the median. The default (224 px, batch 8, 5 repeats) takes about two minutes on 2 CPU cores; ``--size 112``
quarters the work. A final check compares the three forward outputs (max |difference|).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.calib.gradients import collect_gradients
from llc_onnx.calib.losses import make_loss
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.solvers.hessian import hvp

OPSET = 21


# --------------------------------------------------------------------------------------------------
# ResNet-18
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ResNet18()
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):  # non-trivial folded affine, activations kept O(1)
            mod.weight.data.uniform_(0.2, 0.5)
            mod.bias.data.normal_(0, 0.05)
            mod.running_mean.normal_(0, 0.05)
            mod.running_var.uniform_(0.8, 1.2)
    return m.eval()


def export(model: nn.Module, size: int) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), f, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(f.getvalue())


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def timed(rows: list[tuple[str, object]], repeats: int) -> list[dict]:
    """Warm up every row once, then time the rows round-robin ``repeats`` times, so that load from other
    processes on a shared machine spreads over all rows instead of hitting one."""
    for _, fn in rows:
        fn()  # warm-up (allocator, one-time planning)
    times: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _ in range(repeats):
        for label, fn in rows:
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return [{"row": label, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
            for label, t in times.items()]


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run(batch: int, size: int, repeats: int, threads: int, do_hvp: bool = True, log=print) -> dict:
    torch.set_num_threads(threads)
    model = build_model()
    t0 = time.perf_counter()
    proto = export(model, size)
    export_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 1000, batch).astype(np.int64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    graph = TorchGraph(proto)
    nodes, _ = find_compressible(proto)
    names = [n.name for n in nodes]
    loss = make_loss("ce", "logits")
    ds = Dataset([Batch(inputs={"input": x}, labels=y)], source="bench")
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    n_weights = sum(w.numel() for w in weights)

    def ort_fwd():
        return sess.run(None, {"input": x})[0]

    def torch_fwd():
        with torch.no_grad():
            return model(xt)

    def torch_fb():
        out = model(xt)
        return torch.autograd.grad(F.cross_entropy(out.double(), yt, reduction="sum"), weights)

    def tg_fwd():
        with torch.no_grad():
            return graph.run({"input": x}, outputs=["logits"])[0]["logits"]

    def tg_fb():
        outs, cap = graph.run({"input": x}, capture=names, outputs=["logits"])
        s, _ = loss.terms(outs["logits"], yt)
        return torch.autograd.grad(s, [cap[n][0] for n in names])

    probe = {n.name: torch.randn(n.weight_shape, generator=torch.Generator().manual_seed(1)) for n in nodes}
    rows = [
        ("ort forward", ort_fwd),
        ("torch forward", torch_fwd),
        ("TorchGraph forward", tg_fwd),
        ("torch fwd+bwd", torch_fb),
        ("TorchGraph fwd+bwd", tg_fb),
        ("collect_gradients", lambda: collect_gradients(graph, ds, loss, nodes)),
    ]
    if do_hvp:
        rows.append(("hessian.hvp", lambda: hvp(graph, ds, loss, names, probe)))
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = timed(rows, repeats)
    for r in results:
        r["images_per_s"] = batch / r["median_s"]
        log(f"  {r['row']:20s} {r['median_s'] * 1e3:9.1f} ms  [{r['min_s'] * 1e3:.1f}, {r['max_s'] * 1e3:.1f}]")
    o_ort = ort_fwd()
    o_torch = torch_fwd().numpy()
    o_tg = tg_fwd().numpy()
    scale = float(np.abs(o_torch).max())
    check = {"max_abs_ort_vs_torch": float(np.abs(o_ort - o_torch).max()),
             "max_abs_torchgraph_vs_ort": float(np.abs(o_tg - o_ort).max()),
             "max_abs_logit": scale}
    ref = next(r for r in results if r["row"] == "torch forward")["median_s"]
    for r in results:
        r["vs_torch_forward"] = r["median_s"] / ref
    return {
        "config": {"batch": batch, "size": size, "repeats": repeats, "threads": threads, "opset": OPSET,
                   "dtype": "float32", "compressible_nodes": len(names), "weights": n_weights,
                   "export_s": export_s},
        "machine": {**machine_info(threads), "loadavg_start": load_start},
        "results": results,
        "check": check,
    }


def print_table(res: dict, stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    c = res["config"]
    m = res["machine"]
    t = Table(title=(f"ResNet-18 ({c['compressible_nodes']} Conv/Gemm, {c['weights'] / 1e6:.1f} M weights), batch "
                     f"{c['batch']} x 3x{c['size']}x{c['size']}, {c['dtype']}, median of {c['repeats']}"))
    t.add_column("engine / pass")
    t.add_column("median ms", justify="right")
    t.add_column("min – max ms", justify="right")
    t.add_column("images/s", justify="right")
    t.add_column("x torch fwd", justify="right")
    for r in res["results"]:
        t.add_row(r["row"], f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f} – {r['max_s'] * 1e3:.1f}",
                  f"{r['images_per_s']:.1f}", f"{r['vs_torch_forward']:.2f}")
    con = Console(stderr=stderr)
    con.print(t)
    ck = res["check"]
    con.print(f"machine: {m['cpu']}; {m['cpu_count']} CPUs (affinity {m['affinity']}), {m['threads']} threads "
              f"(torch {m['torch_threads']}); torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
              f"onnx {m['onnx']}, python {m['python']}; load average start {m['loadavg_start']}, end {m['loadavg']}")
    con.print(f"outputs: max |ort - torch| = {ck['max_abs_ort_vs_torch']:.2e}, max |TorchGraph - ort| = "
              f"{ck['max_abs_torchgraph_vs_ort']:.2e} (max |logit| {ck['max_abs_logit']:.2f}); "
              f"export {c['export_s']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    ap.add_argument("--size", type=int, default=112,
                    help="input height = width (default 112 to keep the run short; 224 is the ImageNet size)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch and onnxruntime intra-op threads (default: all CPUs)")
    ap.add_argument("--no-hvp", action="store_true", help="skip the hessian.hvp row")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' = stdout, table to stderr)")
    a = ap.parse_args(argv)
    to_stdout = a.json == "-"
    log = (lambda s: print(s, file=sys.stderr)) if to_stdout else print
    log(f"bench_engine: ResNet-18, batch {a.batch}, {a.size}px, {a.repeats} repeats, {a.threads} threads")
    res = run(a.batch, a.size, a.repeats, a.threads, do_hvp=not a.no_hvp, log=log)
    if to_stdout:
        print_table(res, stderr=True)
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        print_table(res)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
