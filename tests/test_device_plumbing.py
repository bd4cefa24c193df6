"""``optimize --device``: every tensor the flows create is placed explicitly — on the interpreter graph's device
(weight hooks, activation quantizers, feeds, labels, gradient accumulators, snapshots) or, for the CPU-side
algorithms (Gram matrices, GPTQ, the Lanczos basis, ORT's outputs), on the CPU by name.

No GPU here, so the CPU test makes a missing ``device=`` fail loudly instead: it runs small optimizations
with ``torch.set_default_device("meta")`` while the graph is on the CPU. A tensor created without an
explicit device then lands on the meta device (no data), and the first operation mixing it with the graph's
CPU tensors, or reading its values, raises. The same call with a CUDA graph would have put that tensor on the
CPU next to CUDA tensors. The written models must also be byte-identical to a run without the default
device set (nothing silently changed). The CUDA test runs the same flow on a GPU where there is one.
"""

from __future__ import annotations

import contextlib

import onnx
import pytest
import torch

from _models import torch_threads, write_lowrank_files, write_mlp_files
from llc_onnx import api
from llc_onnx.config import OptimizeConfig, with_values

CONFIGS = {
    "ort-cpu (W8A8, MatMulNBits, auto rounding with GPTQ)": {"quant.bits": (4, 8, "float")},
    "qdq with activations": {"target.name": "qdq", "quant.activations": True, "quant.bits": (8, "float")},
    "cet cost and rounding": {"quant.cost": "cet", "quant.rounding": "cet", "quant.bits": (4, 8, "float")},
    "low-rank then quant": {"method": ("lowrank", "quant"), "lowrank.mode": "compact", "quant.bits": (8, "float")},
}


@contextlib.contextmanager
def default_device(device):
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def _optimize(model, data, values, out):
    cfg = with_values(OptimizeConfig(), {"device.device": "cpu", "target.measure_latency": False, **values})
    with torch_threads(1):
        return api.optimize(model, data, cfg, out=str(out))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_flow_tensor_has_an_explicit_device(name, tmp_path):
    values = CONFIGS[name]
    writer = write_lowrank_files if "low-rank" in name else write_mlp_files
    model, data = writer(tmp_path, n=160)[:2]
    with default_device("meta"):
        strict = _optimize(model, data, values, tmp_path / "strict.onnx")
    plain = _optimize(model, data, values, tmp_path / "plain.onnx")
    assert strict.verified == plain.verified
    assert [st.levels for st in strict.stages] == [st.levels for st in plain.stages]
    if plain.verified:
        a, b = onnx.load(tmp_path / "strict.onnx"), onnx.load(tmp_path / "plain.onnx")
        assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_meta_default_device_catches_an_implicit_tensor():
    """The check itself: a tensor made without device= under the meta default cannot meet a CPU tensor."""
    cpu = torch.ones(3, device="cpu")
    with default_device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        float((cpu * torch.as_tensor([1.0, 2.0, 3.0])).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; the GPU run needs one")
def test_optimize_on_cuda_matches_cpu(tmp_path):
    model, data = write_mlp_files(tmp_path, n=160)
    values = {"quant.bits": (4, 8, "float"), "target.measure_latency": False}
    cpu = api.optimize(model, data, with_values(OptimizeConfig(), {"device.device": "cpu", **values}))
    gpu = api.optimize(model, data, with_values(OptimizeConfig(), {"device.device": "cuda", **values}))
    assert gpu.verified == cpu.verified
    assert abs(gpu.splits["test"].compressed.loss - cpu.splits["test"].compressed.loss) < 0.02
