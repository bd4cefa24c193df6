"""Same output bytes with ``--threads 1`` and ``--threads 2``: the interpreter (torch) runs on one thread during
``optimize`` — its batch reductions (weight gradients, loss sums) round differently with 2 threads — and
``--threads`` drives ONNX Runtime only (whose kernels give the same numbers with 1 or 2 threads here)."""

from __future__ import annotations

import os

import pytest
import torch

from llc_onnx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "fashion_cnn.onnx")
DATA = os.path.join(ROOT, "examples", "fashion_data.npz")


def test_same_bytes_with_one_and_two_threads(tmp_path, capsys):
    """The bundled example at budget 0.3 on the portable target: its blocked int4 Gemm is the node
    whose ORT kernel rounds differently with 2 threads."""
    extra = ["--target", "qdq", "--budget", "0.3"]
    before = torch.get_num_threads()
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.onnx"
        rc = main(["optimize", EXAMPLE, "--data", DATA, "-o", str(out), "--threads", str(threads), "--json",
                   "--allow-loss-increase", "--no-latency", *extra])
        assert rc == 0, capsys.readouterr().err
        capsys.readouterr()
        outs.append(out.read_bytes())
        assert torch.get_num_threads() == before  # optimize restores torch's setting
    assert outs[0] == outs[1]


def test_torch_reductions_do_depend_on_threads():
    """Why: the weight gradient of a Linear layer over a batch (a reduction torch splits by thread) is not
    bitwise the same with 1 and 2 threads — so measuring with the user's thread count could move a decision."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g, dtype=torch.float32)
    w = torch.randn(256, 64, generator=g, dtype=torch.float32, requires_grad=True)
    before = torch.get_num_threads()
    grads = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            w.grad = None
            (x @ w).tanh().sum().backward()
            grads.append(w.grad.clone())
    finally:
        torch.set_num_threads(before)
    if torch.equal(grads[0], grads[1]):
        pytest.skip("this torch build reduces the same way on 1 and 2 threads")
    assert (grads[0] - grads[1]).abs().max() < 1e-3


def test_ort_losses_do_not_depend_on_threads():
    """A blocked int4 DequantizeLinear + Gemm (fused by ORT into MatMulNBits) moves outputs with 2 intra-op
    threads at 64 rows; evaluate() runs each batch on one thread, so its loss is the same bitwise."""
    import dataclasses

    import numpy as np
    import onnx

    from llc_onnx.calib.data import load_dataset
    from llc_onnx.calib.losses import make_loss
    from llc_onnx.compressible import find_compressible
    from llc_onnx.model_io import prepare_model
    from llc_onnx.ort_eval import EXACT, evaluate
    from llc_onnx.passes.qdq import apply_qdq
    from llc_onnx.quant import WeightQuantSpec, quantize_weight

    m = prepare_model(onnx.load(EXAMPLE))
    fc1 = next(n for n in find_compressible(m)[0] if n.name == "/fc1/Gemm")
    w = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == fc1.weight)).astype(np.float64)
    q = apply_qdq(m, {fc1.name: quantize_weight(w, WeightQuantSpec(4, 32), fc1.out_axis, fc1.reduce_axis)})
    ds = load_dataset(DATA, q, batch_size=64)
    loss = make_loss("ce", q.graph.output[0].name)
    one, two = (evaluate(q, ds, loss, session=dataclasses.replace(EXACT, threads=t)).loss for t in (1, 2))
    assert one == two
