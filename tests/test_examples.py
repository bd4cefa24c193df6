"""The bundled example (examples/fashion_cnn.onnx + fashion_data.npz) and bench.datasets."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench import datasets

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = EXAMPLES / "fashion_cnn.onnx"
DATA = EXAMPLES / "fashion_data.npz"


def _session() -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])


def test_file_sizes():
    assert 10_000 < MODEL.stat().st_size <= 300_000
    assert 100_000 < DATA.stat().st_size < 1_000_000


def test_model_contract():
    m = onnx.load(str(MODEL))
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 10
    assert {o.domain: o.version for o in m.opset_import}[""] == 21
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [1, 28, 28]
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 10
    assert m.graph.node[0].op_type == "Cast"

    sess = _session()
    (si,), (so,) = sess.get_inputs(), sess.get_outputs()
    assert (si.name, si.type) == ("input", "tensor(uint8)")
    assert (so.name, so.type) == ("logits", "tensor(float)")
    # dynamic batch
    for b in (1, 3):
        (y,) = sess.run(None, {"input": np.zeros((b, 1, 28, 28), np.uint8)})
        assert y.shape == (b, 10) and y.dtype == np.float32


def test_bundled_data_and_accuracy():
    with np.load(DATA) as z:
        assert sorted(z.files) == ["input", "labels"]
        x, y = z["input"], z["labels"]
    assert x.dtype == np.uint8 and x.shape == (2000, 1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (2000,)
    assert y.min() >= 0 and y.max() <= 9 and len(np.unique(y)) == 10
    (logits,) = _session().run(["logits"], {"input": x})
    acc = float((logits.argmax(1) == y).mean())
    lg = logits.astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    ce = float((lse - lg[np.arange(len(y)), y]).mean())
    assert acc > 0.80, acc
    assert ce < 0.5, ce


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLC_ONNX_CACHE", str(tmp_path / "c"))
    assert datasets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLC_ONNX_CACHE")
    assert datasets.cache_dir() == Path.home() / ".cache" / "llc-onnx"


def test_missing_fashion_mnist_message(monkeypatch, tmp_path):
    monkeypatch.setenv("LLC_ONNX_FMNIST_DIR", str(tmp_path))
    assert not datasets.fashion_mnist_available()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test")
    with pytest.raises(ValueError, match="split"):
        datasets.load_fashion_mnist("val")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_idx_parser_on_synthetic_files(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, 10000).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs)
    monkeypatch.setenv("LLC_ONNX_FMNIST_DIR", str(tmp_path))
    x, y = datasets.load_fashion_mnist("test")
    assert x.dtype == np.uint8 and np.array_equal(x, imgs)
    assert y.dtype == np.int64 and np.array_equal(y, labs)
    # wrong magic (labels file read as images) -> clear error
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", labs)
    with pytest.raises(ValueError, match="idx"):
        datasets.load_fashion_mnist("test")


@pytest.mark.skipif(not datasets.fashion_mnist_available(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_matches_bundled_data():
    x, y = datasets.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
    with np.load(DATA) as z:
        assert np.array_equal(z["input"][:, 0], x[:2000])
        assert np.array_equal(z["labels"], y[:2000])


def test_fmnist_benchmark_model_exports(tmp_path):
    """bench.prepare_fmnist's model: size, ONNX contract, ORT == torch (no training, no dataset)."""
    import torch

    from bench import prepare_fmnist as pf

    torch.manual_seed(0)
    model = pf.build_model()
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 200_000
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.bias.uniform_(-0.2, 0.2)
    model.eval()
    path = tmp_path / "m.onnx"
    pf.export_onnx(model, path)
    m = onnx.load(str(path))
    assert m.ir_version == 10 and {o.domain: o.version for o in m.opset_import}[""] == 21
    assert [n.op_type for n in m.graph.node[:4]] == ["Constant", "Sub", "Constant", "Div"]
    assert not any(t.name.startswith("onnx::") for t in m.graph.initializer)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input" and sess.get_outputs()[0].name == "logits"
    (got,) = sess.run(["logits"], {"input": x})
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_prepare_fmnist_uses_cache(tmp_path, capsys):
    import json

    from bench import prepare_fmnist as pf

    meta = {"params": 1, "epochs": 3, "threads": 1, "train_seconds": 1.0, "onnx_bytes": 1,
            "ort": {k: {"ce": 0.3, "top1": 0.9, "n": 10000} for k in ("test", "calib")}}
    for f in (pf.MODEL_FILE, pf.CALIB_FILE, pf.TEST_FILE):
        (tmp_path / f).write_bytes(b"")
    (tmp_path / pf.META_FILE).write_text(json.dumps(meta))
    assert pf.prepare(tmp_path) == meta          # no retraining, no dataset needed
    assert "cached" in capsys.readouterr().out
