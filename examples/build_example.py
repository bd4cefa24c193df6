"""Rebuild the bundled example: examples/fashion_cnn.onnx + examples/fashion_data.npz.

    python examples/build_example.py [--epochs 4] [--out examples]

Needs the Debian package ``dataset-fashion-mnist``.  Training is deterministic
(fixed seed, fixed data order, one torch thread, deterministic algorithms), so on
the same torch/onnx versions the two files are regenerated bit-for-bit.

Model contract (documented in examples/README.md):
  input  "input"  uint8   [B, 1, 28, 28]  raw pixels 0..255 (Cast + Div(255) are the first ops)
  output "logits" float32 [B, 10]         Fashion-MNIST class scores (apply softmax/CE yourself)
Data file: ``input`` uint8 [2000, 1, 28, 28] = the first 2,000 images of the official
test set, ``labels`` int64 [2000].  The model is trained on the first 50,000 training
images only, so both the bundled data and the rest of the test set are held out.
"""
from __future__ import annotations

import argparse
import io
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.datasets import load_fashion_mnist, train_classifier  # noqa: E402

SEED = 0
N_TRAIN = 50_000
N_DATA = 2_000
BATCH = 128
LR = 2e-3
OPSET = 21
IR_VERSION = 10


class FashionCNN(nn.Module):
    """conv 1->8 3x3, conv 8->16 3x3 s2, maxpool 2, Gemm 784->64, Gemm 64->10 (52,138 params)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0          # uint8 pixels -> [0, 1]
        x = torch.relu(self.conv1(x))            # [B, 8, 28, 28]
        x = torch.relu(self.conv2(x))            # [B, 16, 14, 14]
        x = self.pool(x)                         # [B, 16, 7, 7]
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


def write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, npy.getvalue(), compresslevel=9)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> float:
    return train_classifier(model, x, y, epochs=epochs, batch=BATCH, max_lr=LR, pct_start=0.15, seed=SEED)


def export(model: nn.Module, path: Path) -> None:
    import onnx

    tmp = path.with_suffix(".tmp.onnx")
    dummy = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    with warnings.catch_warnings():
        # legacy exporter: "opset 21 not supported" is only a warning; the ops used here are
        # unchanged since opset <= 20 and the checker below validates the result.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load(str(tmp))
    tmp.unlink()
    m.ir_version = IR_VERSION
    m.producer_name, m.producer_version = "llc-onnx examples/build_example.py", ""
    m.doc_string = ("Fashion-MNIST CNN. input: uint8 [B,1,28,28] raw pixels; "
                    "output logits: float32 [B,10].")
    onnx.checker.check_model(m, full_check=True)
    path.write_bytes(m.SerializeToString())


def ort_eval(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 500]})[0]
                             for i in range(0, len(x), 500)]).astype(np.float64)
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    ce = float(-logp[np.arange(len(y)), y].mean())
    acc = float((logits.argmax(1) == y).mean())
    return ce, acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "examples")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, ytr = xtr[:N_TRAIN, None], ytr[:N_TRAIN]
    xd, yd = xte[:N_DATA, None].copy(), yte[:N_DATA].copy()

    model = FashionCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FashionCNN: {n_params} parameters")
    t = train(model, xtr, ytr, args.epochs)
    print(f"train time: {t:.1f} s ({args.epochs} epochs on {N_TRAIN} images, 1 thread)")

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "fashion_cnn.onnx"
    npz_path = args.out / "fashion_data.npz"
    export(model, onnx_path)
    write_npz_deterministic(npz_path, {"input": xd, "labels": yd.astype(np.int64)})

    ce, acc = ort_eval(onnx_path, xd, yd)
    ce_all, acc_all = ort_eval(onnx_path, xte[:, None], yte)
    print(f"{onnx_path.name}: {onnx_path.stat().st_size} bytes; {npz_path.name}: {npz_path.stat().st_size} bytes")
    print(f"ORT on bundled {N_DATA} test images: CE {ce:.4f}, accuracy {acc:.4f}")
    print(f"ORT on full 10k test set:          CE {ce_all:.4f}, accuracy {acc_all:.4f}")


if __name__ == "__main__":
    main()
