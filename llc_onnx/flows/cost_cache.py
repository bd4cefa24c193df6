"""Reuse of a quantization flow's measurements across runs (``llc-onnx optimize --cache DIR``).

The expensive part of ``flows.quantize`` is stages 1–2: one gradient pass, then one loss measurement per
(node, level). Everything after — the knapsack for a budget, back-off, verification — is cheap. So a user who
tries ``--lossless``, then ``--budget 0.25``, then ``--budget 0.15`` on the same model and data should pay for
the measurements once. An entry holds exactly what the later stages read:

* the raw candidates (levels, bytes, predicted and measured ΔL, SE, relative noise) — re-classified with the
  current ``--error-max`` / ``--margin-z`` / ``--outside``, which are therefore not part of the key;
* the activation ranges (with ``--activations``);
* each node's fit-part gradient ∂L/∂W (in the gradient pass's dtype, float32), from which LLC rounding re-quantizes the chosen levels, so a
  cached run writes the same bytes as an uncached one.

The key is a SHA-256 over the prepared model, the fit and measure batches (inputs and labels, in order), the
loss, the interpreter dtype, the settings that change a candidate (bits, block size, scales, rounding, LLC
radius, activations, cost mode) and the llc-onnx version. Any change gives a new entry; nothing is ever
reused across a change. Entries are written atomically (temporary file, then rename); an unreadable entry is
reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..atomic import write_atomic
from ..calib.data import Dataset
from ..calib.gradients import GradientPass, NodeStats
from ..errors import LLCError
from ..memory import Spill, release
from ..solvers.cost_model import Candidate
from .context import FlowContext

FORMAT = 4  # 3: the lm loss sums float64 chunks of logits (calib.losses._nll_sum); 4: so does the fidelity KL


@dataclass
class CachedCosts:
    """What a cache entry holds (see module doc)."""

    candidates: list[Candidate]
    ranges: dict[str, float]
    grads: GradientPass  # fit-part gradients; only ``grad_w`` is set per node
    path: str
    seconds: float  # what measuring them took when the entry was made
    arrays: dict = None  # other arrays stored with the entry (e.g. the CET curvature), by name


def _hash_dataset(h, ds: Dataset) -> None:
    for b in ds.batches:
        for name in sorted(b.inputs):
            arr = np.ascontiguousarray(b.inputs[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
            h.update(arr.tobytes())
        if b.labels is not None:
            arr = np.ascontiguousarray(b.labels)
            h.update(f"labels|{arr.dtype.str}|{arr.shape}".encode())
            h.update(arr.tobytes())
        h.update(b"|batch")


def cache_key(ctx: FlowContext, settings: dict) -> str:
    """SHA-256 (hex) of everything a quantization candidate depends on (see module doc)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "version": __version__, "settings": settings,
                         "loss": [type(ctx.loss).__name__, ctx.loss.name, ctx.loss.output,
                                  getattr(ctx.loss, "ignore_index", None)],
                         "dtype": str(ctx.graph.dtype), "nodes": [n.name for n in ctx.nodes]},
                        sort_keys=True, default=str).encode())
    ctx.update_digest(h)  # (streamed: serializing a large model whole held twice its size; held weights included)
    h.update(b"|fit")
    _hash_dataset(h, ctx.fit_data)
    h.update(b"|measure")
    _hash_dataset(h, ctx.measure_data)
    return h.hexdigest()


def ensure_directory(directory: str) -> None:
    """Create the cache directory (one-line LLCError when that is not possible)."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise LLCError(f"--cache {directory}: cannot create the directory ({exc.strerror}); "
                       "give a writable directory") from None


def _paths(directory: str, key: str) -> tuple[str, str]:
    return os.path.join(directory, f"{key}.json"), os.path.join(directory, f"{key}.npz")


class _SpillFailed(Exception):
    pass


def _in_tmp(fn, *args):
    """``fn(*args)`` (a temporary file's work); an OSError (a full or unwritable ``$TMPDIR``) becomes
    :class:`_SpillFailed`: not the cache entry's fault."""
    try:
        return fn(*args)
    except OSError as exc:
        raise _SpillFailed(f"{type(exc).__name__}: {exc}") from None


def load(directory: str, key: str, node_names: list[str], spill: bool = False) -> CachedCosts | None:
    """The entry for ``key``, or None when there is none. An entry that cannot be read raises LLCError
    naming the file (the caller reports it and recomputes). ``spill`` (a large model): each stored gradient goes
    to a file mapped back read-only as it is read (``memory.Spill``, the same values), as the gradient pass keeps
    them, instead of all of them in memory."""
    jpath, npath = _paths(directory, key)
    if not (os.path.isfile(jpath) and os.path.isfile(npath)):
        return None
    try:
        with open(jpath, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("key") != key:
            raise ValueError("format or key mismatch")
        cands = [Candidate(**c) for c in meta["candidates"]]
        files = _in_tmp(Spill) if spill else None
        with np.load(npath, allow_pickle=False) as z:
            grads = {}
            for i, n in enumerate(meta["nodes"]):
                g = np.asarray(z[f"g{i}"])  # the dtype it was stored in
                grads[n] = _in_tmp(files.put, g) if files is not None else g
                del g
            arrays = {k[2:]: np.asarray(z[k]) for k in z.files if k.startswith("x:")}
        if sorted(grads) != sorted(node_names):
            raise ValueError("nodes differ")
    except _SpillFailed as exc:  # the entry is fine: the temporary directory is not
        raise LLCError(f"cache entry {jpath}: could not copy its gradients to temporary files ({exc}); free space in "
                       "$TMPDIR or point TMPDIR elsewhere") from None
    except Exception as exc:  # noqa: BLE001 - any damage means: do not trust it
        raise LLCError(f"cache entry {jpath}: unreadable ({type(exc).__name__}: {exc}); delete it") from None
    nodes = {n: NodeStats(node=n, grad_w=g, grad_w_abs=None, grad_w_sq=None, grad_x_norm=0.0, x_absmax=0.0,
                          x_rms=0.0, channel_gw=np.zeros(0)) for n, g in grads.items()}
    gp = GradientPass(loss=float(meta["fit_loss"]), n=int(meta["fit_n"]), nodes=nodes, seconds=0.0)
    if files is not None:
        gp.spill = files  # the files live as long as the pass
        release()
    return CachedCosts(cands, {k: float(v) for k, v in meta["ranges"].items()}, gp, jpath,
                       float(meta.get("seconds", 0.0)), arrays)


def save(directory: str, key: str, candidates: list[Candidate], ranges: dict[str, float],
         grads: GradientPass, seconds: float, arrays: dict | None = None) -> str:
    """Write the entry for ``key`` (npz of gradients and ``arrays`` first, then the JSON that makes the entry
    visible)."""
    ensure_directory(directory)
    jpath, npath = _paths(directory, key)
    names = list(grads.nodes)

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{f"g{i}": grads.nodes[n].grad_w for i, n in enumerate(names)},
                     **{f"x:{k}": v for k, v in (arrays or {}).items()})

    meta = {"format": FORMAT, "key": key, "version": __version__, "nodes": names,
            "fit_loss": grads.loss, "fit_n": grads.n, "ranges": ranges, "seconds": seconds,
            "candidates": [c.to_dict() for c in candidates]}

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)

    write_atomic(npath, write_npz)
    write_atomic(jpath, write_json)
    return jpath
