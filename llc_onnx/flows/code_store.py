"""Every measured candidate's rounded weight, kept beside its cost-cache entry (``--cache DIR``, on by default
there; ``--no-cache-codes`` turns it off).

The cost cache (``flows.cost_cache``) keeps the measurements; the stages after them — the joint measurement, the
validation split's plan builds, and every later run that hits the entry — still need each chosen node's codes and
scales. Rounding them again is not free: GPTQ needs the input Gram matrices (a pass over the fit part) and a
column loop per node, MSE scales a 100-ratio search per level. On SmolLM2 (211 MatMuls, 5 formats) that was most
of a cache hit's 6–8 minutes. So the candidate stage writes what it rounded, and everything after reads it back.

Contract: an entry's codes are those the rounding computes for the entry's key (the key covers the model, the
data and every setting a rounding reads), so reading one is the same as rounding again — same codes, same
scales, and :func:`quant.weights.dequantize` gives the same float32 weight bit for bit. Files are written
atomically (codes first, then the small file that makes the pair visible); a missing or unreadable pair is
rounded again (and written again), never trusted half-read. A write that would leave less free disk than the
cost-cache entry still needs is not made (reported once); the run goes on rounding where it needs codes.

Layout: ``DIR/<key>.codes/<h>.q.npy`` — the codes in the smallest integer type (int8 up to 8 bits, else int16) —
and ``<h>.npz`` — the scales and a JSON record (node, format, rounding, layout,
bytes, the rounding's report ``info``), ``h`` a digest of (node, format, rounding). About one byte per weight per
format measured: 0.7 GB for SmolLM2-135M's five formats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np

from ..atomic import write_atomic
from ..quant.weights import QuantizedWeight, dequantize

log = logging.getLogger(__name__)

__all__ = ["CodeStore"]

#: bumped when the stored record changes. A change to what a rounding computes (``flows.roundings``, ``quant``)
#: must bump ``cost_cache.FORMAT``, which is in the key: kept codes, like kept costs, are trusted for their key.
FORMAT = 1
#: a write leaves at least this much free on the disk besides the cost-cache entry still to come
RESERVE_BYTES = 256 << 20


class CodeStore:
    """The rounded weights of one cost-cache entry (module doc): :meth:`get` and :meth:`put` by (node, format,
    rounding)."""

    def __init__(self, directory: str, reserve: int = 0):
        self.dir = directory
        #: bytes a write must leave free on the disk: the cost-cache entry written after the candidates
        self.reserve = int(reserve)
        self.hits = self.writes = 0
        self.failed = False  # a write failed or would fill the disk (reported once): no more attempts in this run

    @classmethod
    def for_entry(cls, cache_dir: str, key: str, reserve: int = 0) -> "CodeStore":
        return cls(os.path.join(cache_dir, f"{key}.codes"), reserve)

    def _paths(self, node: str, level: str, rounding: str) -> tuple[str, str]:
        h = hashlib.sha256(f"{node}\0{level}\0{rounding}".encode()).hexdigest()[:40]
        return os.path.join(self.dir, f"{h}.q.npy"), os.path.join(self.dir, f"{h}.npz")

    def get(self, node, level: str, rounding: str, dequant: bool = True) -> tuple[QuantizedWeight, dict] | None:
        """(QuantizedWeight, info) of ``node`` (a CompressibleNode) in format ``level`` rounded by ``rounding``, or
        None when the store does not hold it (or holds it damaged: reported). ``dequant=False``: codes and scales
        only (the weight's ``dequant`` is None)."""
        qpath, mpath = self._paths(node.name, level, rounding)
        if not os.path.isfile(mpath):
            return None
        try:
            with np.load(mpath, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                scale = np.asarray(z["scale"], dtype=np.float32)
            if meta.get("format") != FORMAT or [meta["node"], meta["level"], meta["rounding"]] != \
                    [node.name, level, rounding]:
                raise ValueError("a different record")
            q = np.load(qpath, allow_pickle=False)  # not mapped: a plan's nodes would hold a descriptor each
            if list(q.shape) != meta["q_shape"]:
                raise ValueError(f"codes of shape {q.shape}, expected {meta['q_shape']}")
            dq = dequantize(q, scale, meta["block_size"], node.out_axis, node.reduce_axis, node.weight_shape) \
                if dequant else None
        except Exception as exc:  # noqa: BLE001 - any damage means: round again
            log.warning("rounded codes %s: unreadable (%s: %s); rounding again", mpath, type(exc).__name__, exc)
            return None
        self.hits += 1
        return QuantizedWeight(q=q, scale=scale, axis=int(meta["axis"]), block_size=meta["block_size"],
                               bits=int(meta["bits"]), dequant=dq, nbytes=int(meta["nbytes"])), meta["info"]

    def put(self, node, level: str, rounding: str, qw: QuantizedWeight, info: dict) -> None:
        """Keep ``qw`` (and the rounding's ``info``); a failure to write (a full disk) is reported once, not raised:
        the run goes on, keeps nothing more, and rounds again where it needs the codes."""
        if self.failed:
            return
        qpath, mpath = self._paths(node.name, level, rounding)
        q = np.ascontiguousarray(qw.q, dtype=np.int8 if qw.bits <= 8 else np.int16)
        try:
            meta = {"format": FORMAT, "node": node.name, "level": level, "rounding": rounding, "axis": int(qw.axis),
                    "block_size": None if qw.block_size is None else int(qw.block_size), "bits": int(qw.bits),
                    "nbytes": int(qw.nbytes), "q_shape": list(q.shape), "info": _plain(info)}
            record = np.array(json.dumps(meta))
            os.makedirs(self.dir, exist_ok=True)
            free = shutil.disk_usage(self.dir).free
            if free < self.reserve + 2 * q.nbytes + RESERVE_BYTES:
                raise OSError(f"{free / 1e9:.2f} GB free; the cost-cache entry needs {self.reserve / 1e9:.2f} GB")
            write_atomic(qpath, lambda tmp: _save_npy(tmp, q))
            write_atomic(mpath, lambda tmp: _save_npz(tmp, scale=np.asarray(qw.scale, dtype=np.float32),
                                                      meta=record))
        except (OSError, TypeError, ValueError) as exc:
            self.failed = True
            log.warning("rounded codes not kept in %s (%s); this run keeps no more of them and rounds again where "
                        "it needs them; free space there or pass --no-cache-codes", self.dir, exc)
            return
        self.writes += 1


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def _save_npz(path: str, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _plain(info: dict) -> dict:
    """``info`` with numpy scalars as Python numbers (JSON)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in (info or {}).items()}
