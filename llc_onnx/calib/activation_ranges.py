"""Activation ranges for static (calibrated) activation quantization, and the Q/DQ parameters they give.

The values of chosen tensors (node inputs, node outputs) are observed over the calibration data in the
llc-onnx interpreter (``TorchGraph.run(feeds, outputs=[...])``, one run per batch, no gradient), and each
tensor gets a range ``[lo, hi]`` by one of three methods:

* ``"minmax"``: ``lo = min x``, ``hi = max x`` over all batches (what ORT's ``MinMaxCalibrater`` returns).
* ``"percentile"`` (ORT's ``PercentileCalibrater``, default 99.999 %): a histogram of ``num_bins`` equal
  bins; *symmetric*: of ``|x|`` on ``[min|x|, max|x|]``, ``hi`` = the bin edge where the CDF reaches
  ``p/100``, ``lo = −hi``; *asymmetric*: of ``x`` on ``[−t, t]`` (``t = max|x|``), each side cut at
  ``(100 − p)/200``; the result is clipped to ``[min x, max x]``.
* ``"entropy"`` (KL divergence, the TensorRT calibrator of Migacz, "8-bit inference with TensorRT", GTC
  2017): a histogram ``h`` of ``|x|`` with ``num_bins`` (2048) bins on ``[0, max|x|]``; for every
  candidate ``i = num_quantized_bins … num_bins`` the reference ``P`` is ``h[:i]`` with the outlier mass
  ``Σ h[i:]`` added to its last bin, ``Q`` is ``h[:i]`` merged into ``num_quantized_bins`` (128: the
  positive int8 levels) groups and expanded back uniformly over the bins where ``P ≠ 0``; the threshold
  is the right edge of bin ``i`` minimising ``KL(P‖Q)``. The range is ``[max(min x, −t), min(max x, t)]``
  (so a ReLU output keeps ``lo = 0``). KL is blind to spikes, so two guards: the zero bin (every exact zero:
  half a ReLU output) is given its neighbour's count first, as NVIDIA's calibrator does (pytorch-quantization,
  ``bins[0] = bins[1]``), and only thresholds that clip at most ``MAX_CLIPPED`` of the values are
  candidates (5 %; a constant background — Fashion-MNIST's normalized images sit at −0.81 — is a spike of ``|x|``
  that the criterion otherwise cuts at, clipping every foreground pixel: measured +0.24 on the stem Conv
  alone, +0.69 with every Conv W8A8 before these guards, against +0.0012 with min–max).

The histogram methods need the value range first, so they make two passes over the data (min/max, then
histograms on that fixed range): the result does not depend on the batch order, unlike ORT's calibrators,
which re-bin as batches arrive; with all data in one batch the percentile range equals ORT's exactly
(tests/test_activation_ranges.py).

Q/DQ parameters (:func:`qparams`), as ONNX ``QuantizeLinear`` computes ``q = saturate(round(x/s) + z)``:

* ``"int8"`` symmetric (TensorRT, portable QDQ): ``s = max(|lo|, |hi|)/127``, ``z = 0``;
* ``"uint8"`` asymmetric (ORT CPU): the range is widened to contain 0, ``s = (hi − lo)/255``,
  ``z = round(−lo/s)`` in ``[0, 255]`` (ORT's ``compute_scale_zp``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from llc_onnx.errors import LLCError

__all__ = [
    "METHODS",
    "ActivationRange",
    "ActivationQParams",
    "collect_activation_ranges",
    "entropy_threshold",
    "qparams",
]

METHODS = ("minmax", "percentile", "entropy")
DTYPES = ("uint8", "int8")


@dataclass(frozen=True)
class ActivationRange:
    """Calibrated range of one tensor (float64 values observed in float32)."""

    tensor: str
    lo: float
    hi: float
    method: str
    min: float            # observed minimum (before clipping by the method)
    max: float            # observed maximum
    count: int            # number of values observed


@dataclass(frozen=True)
class ActivationQParams:
    """Per-tensor Q/DQ parameters: ``q = saturate(round_half_even(x/scale) + zero_point)``."""

    scale: float          # float32-representable, > 0
    zero_point: int
    dtype: str            # "uint8" | "int8"

    @property
    def bits(self) -> int:
        return 8

    @property
    def qmin(self) -> int:
        return 0 if self.dtype == "uint8" else -128

    @property
    def qmax(self) -> int:
        return 255 if self.dtype == "uint8" else 127

    @property
    def numpy_dtype(self):
        return np.uint8 if self.dtype == "uint8" else np.int8

    @property
    def symmetric(self) -> bool:
        return self.dtype == "int8" and self.zero_point == 0

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """QuantizeLinear → DequantizeLinear in torch (same float32 arithmetic), straight-through gradient."""
        s = torch.tensor(self.scale, dtype=torch.float32, device=x.device)
        xf = x.float()
        with torch.no_grad():
            q = torch.clamp(torch.round(xf / s) + self.zero_point, self.qmin, self.qmax)
            dq = ((q - self.zero_point) * s).to(x.dtype)
        return x + (dq - x).detach()


def qparams(r: ActivationRange | tuple[float, float], dtype: str = "uint8") -> ActivationQParams:
    """Q/DQ parameters of a range (see module docstring)."""
    if dtype not in DTYPES:
        raise LLCError(f"activation quant: dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    lo, hi = (r.lo, r.hi) if isinstance(r, ActivationRange) else (float(r[0]), float(r[1]))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise LLCError(f"activation quant: range [{lo}, {hi}] is not a finite interval; check the calibration data")
    if dtype == "int8":
        amax = max(abs(lo), abs(hi))
        s = float(np.float32(amax / 127.0))
        if s <= 0.0:
            s = 1.0 if amax == 0.0 else float(np.finfo(np.float32).tiny)
        return ActivationQParams(scale=s, zero_point=0, dtype="int8")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = float(np.float32((hi - lo) / 255.0))
    if s <= 0.0:
        return ActivationQParams(scale=1.0, zero_point=0, dtype="uint8")
    z = int(np.clip(np.round(-lo / s), 0, 255))
    return ActivationQParams(scale=s, zero_point=z, dtype="uint8")


#: the entropy threshold never clips more than this share of the values (module doc)
MAX_CLIPPED = 0.05


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, num_quantized_bins: int = 128,
                      max_clipped: float = MAX_CLIPPED) -> float:
    """KL-optimal threshold of a histogram of ``|x|`` (bins on ``[0, max|x|]``; see module docstring), among
    the thresholds that clip at most ``max_clipped`` of the values."""
    hist = np.array(hist, dtype=np.float64)
    total = max(float(hist.sum()), 1.0)   # before the zero-bin change: the share clipped is of the real values
    if hist.size > 1:
        # the zero bin of |x| holds every exact zero (a ReLU output's half, zero padding): as a spike it
        # dominates KL(P‖Q) — merged with its neighbours into one quantized bin, it is smeared over them — and
        # drives the threshold to the smallest candidate; it is set to its neighbour's count first, as NVIDIA's
        # calibrator does (pytorch-quantization ``_compute_amax_entropy``: ``bins[0] = bins[1]``)
        hist[0] = hist[1]
    n = hist.size
    nq = int(num_quantized_bins)
    if n <= nq or hist.sum() == 0:
        return float(edges[-1])
    best_i, best_kl = n, np.inf
    total_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])   # Σ h[i:]
    for i in range(nq, n + 1):
        if total_tail[i] / total > max_clipped:   # (total_tail[i], i ≥ 1, does not include the zero bin)
            continue
        ref = hist[:i].copy()
        p = ref.copy()
        p[-1] += total_tail[i]
        nz = p != 0
        # merge ref into nq groups of (nearly) equal width, expand back over the non-zero bins of p
        bounds = (np.arange(nq + 1) * i) // nq              # strictly increasing since i >= nq
        sums = np.add.reduceat(ref, bounds[:-1])
        cnts = np.add.reduceat(nz.astype(np.float64), bounds[:-1])
        per = np.divide(sums, cnts, out=np.zeros_like(sums), where=cnts > 0)
        q = np.repeat(per, np.diff(bounds)) * nz
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        pn, qn = p / ps, q / qs
        m = pn > 0
        if np.any(m & (qn == 0)):
            continue                      # P has mass where Q has none: KL is infinite
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl - 1e-12:
            best_kl, best_i = kl, i
    return float(edges[best_i])


class _Stats:
    __slots__ = ("min", "max", "abs_min", "count", "hist", "edges")

    def __init__(self):
        self.min, self.max, self.abs_min, self.count = math.inf, -math.inf, math.inf, 0
        self.hist = None
        self.edges = None


class _Inputs:
    """The feeds of a dataset's batches, each read when reached (streamed data stays on disk); iterable twice."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return (b.inputs for b in self.batches)


def _batches(data):
    if hasattr(data, "batches"):
        return _Inputs(data.batches)
    return [dict(b) for b in data]


def collect_activation_ranges(
    graph,
    data,
    tensors: Iterable[str],
    *,
    method: str = "minmax",
    symmetric: bool = False,
    percentile: float = 99.999,
    num_bins: int = 2048,
    num_quantized_bins: int = 128,
    observed: Iterable[str] = (),
) -> dict[str, ActivationRange]:
    """Range of each tensor in ``tensors`` over ``data`` (a ``calib.data.Dataset`` or an iterable of feed
    dicts), observed in ``graph`` (a ``TorchGraph``). ``symmetric`` only matters for ``"percentile"``
    (symmetric: a histogram of |x|, ORT's default for that method). Tensors in ``observed`` (the targets pass
    the model's graph inputs) keep their observed min–max range under every method: clipping a model input
    drops information before the first layer. Deterministic."""
    if method not in METHODS:
        raise LLCError(f"activation calibration: method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if not 0 < float(percentile) <= 100:
        raise LLCError(f"activation calibration: percentile={percentile} must be in (0, 100]")
    if int(num_bins) < 2 or (method == "entropy" and int(num_bins) <= int(num_quantized_bins)):
        raise LLCError(f"activation calibration: num_bins={num_bins} must exceed num_quantized_bins="
                       f"{num_quantized_bins} (e.g. 2048 and 128)")
    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    batches = _batches(data)
    if not batches:
        raise LLCError("activation calibration: no calibration batches; pass calibration data")
    stats = {t: _Stats() for t in names}

    def values(feeds):
        with torch.no_grad():
            out, _ = graph.run(feeds, outputs=names)
        for t in names:
            v = out[t]
            if v is None or not torch.is_floating_point(v):
                raise LLCError(f"tensor '{t}': not a float tensor; only float activations can be quantized")
            arr = v.detach().to("cpu", torch.float32).numpy().reshape(-1)
            if arr.size and not np.all(np.isfinite(arr)):
                raise LLCError(f"tensor '{t}': NaN or Inf in the calibration run; check the calibration data")
            yield t, arr

    for feeds in batches:
        for t, arr in values(feeds):
            st = stats[t]
            if arr.size:
                st.min = min(st.min, float(arr.min()))
                st.max = max(st.max, float(arr.max()))
                st.abs_min = min(st.abs_min, float(np.abs(arr).min()))
            st.count += arr.size
    for t, st in stats.items():
        if st.count == 0:
            raise LLCError(f"tensor '{t}': empty in every calibration batch; it cannot be calibrated")
    keep = set(observed)
    if method != "minmax" and not set(names) <= keep:
        for feeds in batches:
            for t, arr in values(feeds):
                if t in keep:
                    continue                     # an observed tensor keeps min–max: no histogram
                st = stats[t]
                amax = np.float32(max(abs(st.min), abs(st.max)))
                if method == "percentile" and not symmetric:   # ORT: values on [-max|x|, max|x|]
                    h, edges = np.histogram(arr, int(num_bins), range=(-amax, amax))
                elif method == "percentile":                    # ORT: |x| on [min|x|, max|x|]
                    h, edges = np.histogram(np.abs(arr), int(num_bins), range=(np.float32(st.abs_min), amax))
                else:
                    h, edges = np.histogram(np.abs(arr), int(num_bins), range=(np.float32(0.0), amax))
                st.hist = h if st.hist is None else st.hist + h
                st.edges = edges.astype(np.float32)

    out: dict[str, ActivationRange] = {}
    for t, st in stats.items():
        lo, hi = st.min, st.max
        if t in keep:
            pass
        elif method == "percentile":
            p = float(percentile) / 100.0
            cdf = np.cumsum(st.hist / st.hist.sum())
            if symmetric:
                t_hi = float(st.edges[min(np.searchsorted(cdf, p), num_bins)])
                lo, hi = max(-t_hi, st.min), min(t_hi, st.max)
            else:
                cut = (1.0 - p) / 2.0
                lo = max(float(st.edges[min(np.searchsorted(cdf, cut), num_bins)]), st.min)
                hi = min(float(st.edges[min(np.searchsorted(cdf, 1.0 - cut), num_bins)]), st.max)
        elif method == "entropy":
            thr = entropy_threshold(st.hist, st.edges, num_quantized_bins)
            lo, hi = max(st.min, -thr), min(st.max, thr)
        out[t] = ActivationRange(tensor=t, lo=float(lo), hi=float(hi), method=method, min=st.min, max=st.max,
                                 count=st.count)
    return out
