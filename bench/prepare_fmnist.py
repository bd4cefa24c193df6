"""Train and export the Fashion-MNIST benchmark model into the llc-onnx cache.

    python -m bench.prepare_fmnist [--epochs 3] [--out DIR] [--threads 1] [--force]

Writes to ``DIR`` (default ``<cache_dir()>/fmnist``, i.e. ``$LLC_ONNX_CACHE/fmnist`` or
``~/.cache/llc-onnx/fmnist``):

* ``fmnist_resnet.onnx`` -- small ResNet-style CNN, opset 21, IR version 10, dynamic batch.
  input  ``input``  float32 [B, 1, 28, 28], pixels scaled to [0, 1] (i.e. uint8 / 255);
  the normalisation ``(x - 0.2860) / 0.3530`` is inside the model (its first Sub + Div).
  output ``logits`` float32 [B, 10].
* ``calib.npz`` -- calibration pool: the LAST 10,000 official training images
  (indices 50,000..59,999), which the model was not trained on.
* ``test.npz``  -- the official 10,000-image test set.
  Both npz files hold ``input`` (float32 [N, 1, 28, 28] in [0, 1]; the key is the ONNX graph
  input name) and ``labels`` (int64 [N]).
* ``meta.json`` -- parameters, training time and the measured onnxruntime numbers.

Training is deterministic: ``torch.manual_seed(0)``, ``torch.use_deterministic_algorithms(True)``,
a fixed data order (seeded generator), one torch thread by default.  The model trains on
the first 50,000 training images only.  If all output files exist the script does nothing
except print the cached numbers; ``--force`` retrains.  Needs the Debian package
``dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np

from bench.datasets import FMNIST_MEAN, FMNIST_STD, cache_dir, load_fashion_mnist, train_classifier

SEED = 0
N_TRAIN = 50_000           # model trains on train[:50000]; calib pool = train[50000:]
BATCH = 128
MAX_LR = 3e-3
OPSET = 21
IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MODEL_FILE, CALIB_FILE, TEST_FILE, META_FILE = "fmnist_resnet.onnx", "calib.npz", "test.npz", "meta.json"


def default_out() -> Path:
    return cache_dir() / "fmnist"


def build_model():
    """ResNet-style CNN, 151,274 parameters.

    stem:    Conv 3x3 1->32 stride 2 (28x28 -> 14x14) + BN + ReLU
    stage 1: residual block 32 -> 32 at 14x14 (Conv-BN-ReLU-Conv-BN + identity, ReLU)
    stage 2: residual block 32 -> 64 stride 2 (14x14 -> 7x7, 1x1 stride-2 Conv+BN shortcut),
             residual block 64 -> 64 at 7x7
    head:    GlobalAveragePool -> Linear 64 -> 10
    The stride-2 stem keeps 3 epochs at about 140 s of CPU time on one core (measured: 247 s
    wall on a loaded shared machine).
    """
    import torch
    from torch import nn

    def conv_bn(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = conv_bn(cin, cout, stride)
            self.conv2 = conv_bn(cout, cout, 1)
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))

    class FmnistResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(FMNIST_MEAN, dtype=torch.float32), persistent=False)
            self.register_buffer("std", torch.tensor(FMNIST_STD, dtype=torch.float32), persistent=False)
            self.stem = conv_bn(1, 32, 2)
            self.stage1 = Block(32, 32, 1)
            self.stage2 = nn.Sequential(Block(32, 64, 2), Block(64, 64, 1))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):                       # x: float32 [B,1,28,28] in [0,1]
            x = (x - self.mean) / self.std
            x = torch.relu(self.stem(x))
            x = self.stage2(self.stage1(x))
            x = torch.mean(x, dim=(2, 3))           # global average pool
            return self.fc(x)

    return FmnistResNet()


def to_input(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0,1] (the model's input format)."""
    return (images_u8.astype(np.float32) / np.float32(255.0))[:, None]


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, log=print) -> float:
    return train_classifier(model, x, y, epochs=epochs, batch=BATCH, max_lr=MAX_LR, pct_start=0.2, seed=SEED,
                            log=log)


def export_onnx(model, path: Path) -> None:
    import onnx
    import torch

    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # legacy exporter warns that opset 21 is "unsupported"
        torch.onnx.export(
            model, (torch.zeros(2, 1, 28, 28),), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load(str(tmp))
    _rename_folded_initializers(m)
    m.ir_version = IR_VERSION
    m.producer_name, m.producer_version = "llc-onnx bench/prepare_fmnist.py", ""
    m.doc_string = ("Fashion-MNIST ResNet-style CNN. input: float32 [B,1,28,28] pixels/255 in [0,1] "
                    "(normalisation inside); output logits: float32 [B,10].")
    onnx.checker.check_model(m, full_check=True)
    defined = {t.name for t in m.graph.initializer} | {i.name for i in m.graph.input} | {""}
    defined |= {o for n in m.graph.node for o in n.output}
    undefined = sorted({i for n in m.graph.node for i in n.input} - defined)
    if undefined:  # seen with the legacy exporter's initializer dedup on untrained (all-zero bias) models
        raise RuntimeError(f"exported graph references undefined tensors {undefined}")
    tmp.write_bytes(m.SerializeToString())
    os.replace(tmp, path)


def _rename_folded_initializers(m) -> None:
    """BN folding leaves initializers named 'onnx::Conv_85'; name them after their node
    ('stage1.conv1.0.weight'), so reports are readable."""
    inits = {t.name: t for t in m.graph.initializer}
    renames = {}
    for node in m.graph.node:
        base = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        for inp, kind in zip(node.input[1:], ("weight", "bias")):
            if inp.startswith("onnx::") and inp in inits and inp not in renames:
                renames[inp] = f"{base}.{kind}"
    for t in m.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def ort_eval(model_path: Path, x: np.ndarray, y: np.ndarray, threads: int = 1) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run([OUTPUT_NAME], {name: x[i:i + 1000]})[0]
                             for i in range(0, len(x), 1000)]).astype(np.float64)
    mx = logits.max(1, keepdims=True)
    lse = (np.log(np.exp(logits - mx).sum(1, keepdims=True)) + mx)[:, 0]
    ce = float((lse - logits[np.arange(len(y)), y]).mean())
    return {"ce": ce, "top1": float((logits.argmax(1) == y).mean()), "n": int(len(y))}


def _report(meta: dict, out: Path) -> None:
    print(f"model: {out / MODEL_FILE} ({meta['onnx_bytes']} bytes, {meta['params']} parameters)")
    print(f"train time: {meta['train_seconds']:.1f} s ({meta['epochs']} epochs, {meta['threads']} thread(s))")
    for k in ("test", "calib"):
        r = meta["ort"][k]
        print(f"ORT {k:5s} ({r['n']} images): CE {r['ce']:.4f}  accuracy {r['top1']:.4f}")


def prepare(out: Path, epochs: int = 3, threads: int = 1, force: bool = False) -> dict:
    files = [out / f for f in (MODEL_FILE, CALIB_FILE, TEST_FILE, META_FILE)]
    if not force and all(f.is_file() for f in files):
        meta = json.loads((out / META_FILE).read_text())
        print(f"{out}: cached (use --force to retrain)")
        _report(meta, out)
        return meta

    import onnx
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    xtr_u8, ytr = load_fashion_mnist("train")
    xte_u8, yte = load_fashion_mnist("test")
    xtr = to_input(xtr_u8)
    x_fit, y_fit = xtr[:N_TRAIN], ytr[:N_TRAIN]
    x_cal, y_cal = xtr[N_TRAIN:], ytr[N_TRAIN:]
    x_te = to_input(xte_u8)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training FmnistResNet ({n_params} parameters) on {N_TRAIN} images, {epochs} epochs, "
          f"{threads} thread(s)")
    t_train = train(model, x_fit, y_fit, epochs)

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    export_onnx(model, model_path)
    input_name = onnx.load(str(model_path), load_external_data=False).graph.input[0].name
    save_npz(out / CALIB_FILE, **{input_name: x_cal, "labels": y_cal.astype(np.int64)})
    save_npz(out / TEST_FILE, **{input_name: x_te, "labels": yte.astype(np.int64)})

    # sanity: ORT agrees with torch on a few test images
    with torch.no_grad():
        ref = model(torch.from_numpy(x_te[:256])).numpy()
    import onnxruntime as ort
    got = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_NAME], {input_name: x_te[:256]})[0]
    max_diff = float(np.abs(ref - got).max())

    meta = {
        "params": int(n_params), "epochs": epochs, "threads": threads, "seed": SEED,
        "train_seconds": round(t_train, 1), "train_images": f"train[:{N_TRAIN}]",
        "calib_images": f"train[{N_TRAIN}:]", "test_images": "t10k (all 10000)",
        "input": input_name, "output": OUTPUT_NAME, "opset": OPSET,
        "onnx_bytes": model_path.stat().st_size, "torch_ort_max_abs_diff": max_diff,
        "ort": {"test": ort_eval(model_path, x_te, yte), "calib": ort_eval(model_path, x_cal, y_cal)},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)
    print(f"torch vs ORT max |diff| on 256 test logits: {max_diff:.2e}")
    _report(meta, out)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare_fmnist",
                                 description="Train/export the Fashion-MNIST benchmark model into the cache.")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <cache>/fmnist)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1; results are reproducible for a fixed thread count)")
    ap.add_argument("--force", action="store_true", help="retrain even if the cached files exist")
    args = ap.parse_args(argv)
    prepare(args.out or default_out(), epochs=args.epochs, threads=args.threads, force=args.force)


if __name__ == "__main__":
    main()
