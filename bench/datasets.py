"""Dataset loaders and the benchmark cache directory.

Fashion-MNIST is read from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``, the original idx files); nothing is
downloaded.  ``$LLC_ONNX_FMNIST_DIR`` overrides that directory.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN = 0.2860  # mean of the training pixels, scaled to [0, 1]
FMNIST_STD = 0.3530
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_EXPECTED_N = {"train": 60000, "test": 10000}


def cache_dir() -> Path:
    """``$LLC_ONNX_CACHE`` or ``~/.cache/llc-onnx`` (outside the repository); not created here."""
    env = os.environ.get("LLC_ONNX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llc-onnx"


def fashion_mnist_dir() -> Path:
    env = os.environ.get("LLC_ONNX_FMNIST_DIR")
    return Path(env) if env else FMNIST_DIR


def fashion_mnist_available() -> bool:
    d = fashion_mnist_dir()
    return all((d / f).is_file() for pair in _FILES.values() for f in pair)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzip'ed idx file of unsigned bytes (magic 0x0000 08 <ndim>)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx file ({len(data)} bytes)")
    zero, dtype_code, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or nd != ndim:
        raise ValueError(
            f"{path}: not a uint8 idx file with {ndim} dims "
            f"(magic {zero:#06x}, type {dtype_code:#04x}, ndim {nd})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {body.size}")
    return body.reshape(shape).copy()


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` in {"train", "test"}.

    train: the 60,000 official training images; test: the 10,000 official test images,
    in file order.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir()
    img_name, lab_name = _FILES[split]
    img_path, lab_path = d / img_name, d / lab_name
    missing = [str(p) for p in (img_path, lab_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)} missing); "
            "install it with `apt-get install dataset-fashion-mnist` "
            "or point $LLC_ONNX_FMNIST_DIR at a directory holding the idx .gz files")
    images = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{d}: inconsistent Fashion-MNIST {split} files "
                         f"(images {images.shape}, labels {labels.shape})")
    if images.shape[0] != _EXPECTED_N[split]:
        raise ValueError(f"{img_path}: expected {_EXPECTED_N[split]} images, found {images.shape[0]}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{lab_path}: labels outside 0..9")
    return images, labels


def train_classifier(model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int, max_lr: float,
                     pct_start: float, seed: int, log=print) -> float:
    """Deterministic classifier training shared by the bench and example models: Adam with a one-cycle
    learning rate, cross-entropy, a seeded permutation per epoch (torch.Generator(seed)). Returns seconds."""
    import time

    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=max_lr)
    steps = epochs * ((len(xt) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=pct_start)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        tot, n = 0.0, 0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            n += len(idx)
        log(f"  epoch {ep + 1}/{epochs}: train CE {tot / n:.4f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return time.perf_counter() - t0


def package_versions(packages) -> dict:
    """Installed version of each package name (None where it is not installed): recorded with prepared data."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def sha256_file(path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
