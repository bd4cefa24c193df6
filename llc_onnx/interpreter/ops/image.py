"""Image ops: Resize (and the older Upsample), DepthToSpace, SpaceToDepth.

Resize is separable: each resized axis maps output index ``i`` to a source coordinate ``x(i)`` (the
``coordinate_transformation_mode``), then gathers and weights source rows along that axis:

* ``nearest``: ``X[round(x)]`` with the ``nearest_mode`` rounding, index clamped to ``[0, n-1]``;
* ``linear``: ``x`` clamped to ``[0, n-1]``, ``(1-f)·X[⌊x⌋] + f·X[min(⌊x⌋+1, n-1)]`` (N-linear over all axes);
* ``cubic``: Keys' kernel with ``cubic_coeff_a`` on the 4 neighbours ``⌊x⌋-1 .. ⌊x⌋+2`` (indices clamped,
  or with ``exclude_outside`` their weights zeroed and the rest renormalised).

Coordinates are computed in float32 as ONNX Runtime's CPU kernel does (float64 for the part of
``half_pixel_symmetric`` it computes in double), so nearest-neighbour ties fall the same way. ``tf_crop_and_resize`` takes coordinates from ``roi`` and writes ``extrapolation_value``
outside the input. Not supported: ``antialias=1`` when downsampling (it would need ORT's filter widths).
"""

from __future__ import annotations

import math

import torch

from ..registry import register_ops
from ..tensors import Tensor, as_ints, norm_axis

_F32 = torch.float32


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float] | None,
                   device) -> Tensor:
    """Source coordinate of every output index along one axis (float32), per ONNX's
    coordinate_transformation_mode; ``scale`` is the float the op uses (given, or out/in from sizes)."""
    i = torch.arange(out_len, dtype=_F32, device=device)
    s = torch.tensor(scale, dtype=_F32, device=device)
    half = torch.tensor(0.5, dtype=_F32, device=device)
    if mode == "half_pixel":
        return (i + half) / s - half
    if mode == "half_pixel_symmetric":  # ORT: offset in float32, the rest in float64, rounded to float32
        adjustment = torch.tensor(out_len, dtype=_F32, device=device) / (s * in_len)
        center = torch.tensor(in_len / 2, dtype=_F32, device=device)
        offset = center * (1 - adjustment)
        f64 = torch.float64
        return (offset.to(f64) + (i.to(f64) + 0.5) / s.to(f64) - 0.5).to(_F32)
    if mode == "pytorch_half_pixel":
        return (i + half) / s - half if out_len > 1 else torch.zeros_like(i)
    if mode == "align_corners":
        if out_len == 1:
            return torch.zeros_like(i)
        return i * float(in_len - 1) / float(out_len - 1)
    if mode == "asymmetric":
        return i / s
    if mode == "tf_half_pixel_for_nn":
        return (i + half) / s
    if mode == "tf_crop_and_resize":
        start, end = (torch.tensor(v, dtype=_F32, device=device) for v in roi)
        if out_len > 1:
            return start * (in_len - 1) + (i * (end - start) * (in_len - 1)) / (out_len - 1)
        return torch.full_like(i, float(0.5 * (float(start) + float(end)) * (in_len - 1)))
    raise ValueError(f"coordinate_transformation_mode '{mode}' is unknown")


def _nearest_index(x: Tensor, mode: str, downsample: bool) -> Tensor:
    if mode == "round_prefer_floor":
        return torch.ceil(x - 0.5)
    if mode == "round_prefer_ceil":
        return torch.floor(x + 0.5)
    if mode == "floor":
        return torch.floor(x)
    if mode == "ceil":
        return torch.ceil(x)
    if mode == "simple":  # Upsample (opset 7-9) in ONNX Runtime: truncate when enlarging, ceil when shrinking
        return torch.ceil(x) if downsample else torch.trunc(x)
    raise ValueError(f"nearest_mode '{mode}' is unknown")


def _cubic_weights(f: Tensor, a: float) -> list[Tensor]:
    """Keys' cubic convolution weights of the neighbours at distances 1+f, f, 1-f, 2-f."""
    def near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return [far(f + 1), near(f), near(1 - f), far(2 - f)]


def _resize_axis(x: Tensor, axis: int, out_len: int, scale: float, roi, opts: dict) -> Tensor:
    in_len = x.shape[axis]
    mode, coord = opts["mode"], opts["coord"]
    src = _source_coords(coord, out_len, in_len, scale, roi, x.device)
    outside = None
    if coord == "tf_crop_and_resize":
        outside = (src < 0) | (src > in_len - 1)

    def take(idx: Tensor) -> Tensor:
        return x.index_select(axis, idx.clamp(0, in_len - 1).to(torch.int64))

    shape = [1] * x.dim()
    shape[axis] = out_len
    if mode == "nearest":
        y = take(_nearest_index(src, opts["nearest_mode"], scale < 1))
    elif mode == "linear":
        c = src.clamp(0, in_len - 1)
        lo = torch.floor(c)
        f = (c - lo).to(x.dtype).reshape(shape)
        hi = (lo + 1).clamp(max=in_len - 1)
        y = (1 - f) * take(lo) + f * take(hi)
    elif mode == "cubic":
        lo = torch.floor(src)
        f = (src - lo).to(torch.float64)
        weights = _cubic_weights(f, opts["cubic_a"])
        idx = [lo + k for k in (-1, 0, 1, 2)]
        if opts["exclude_outside"]:
            weights = [w * ((j >= 0) & (j <= in_len - 1)) for w, j in zip(weights, idx)]
            total = sum(weights)
            weights = [w / total for w in weights]
        y = sum(w.to(x.dtype).reshape(shape) * take(j) for w, j in zip(weights, idx))
    else:
        raise ValueError(f"mode '{mode}' is unknown")
    if outside is not None and outside.any():
        y = torch.where(outside.reshape(shape), torch.tensor(opts["extrapolation"], dtype=x.dtype, device=x.device), y)
    return y


def resize(x: Tensor, out_sizes: list[int], scales: list[float], rois: list[tuple[float, float]] | None,
           opts: dict) -> Tensor:
    """``x`` resized to ``out_sizes`` (one per axis; ``scales`` the per-axis float scales used for the
    coordinates; ``rois`` per-axis (start, end) for tf_crop_and_resize). ``opts``: mode, coord, nearest_mode,
    cubic_a, exclude_outside, extrapolation."""
    y = x
    for axis in range(x.dim()):
        roi = rois[axis] if rois is not None else None
        if out_sizes[axis] == x.shape[axis] and scales[axis] == 1.0 and opts["coord"] != "tf_crop_and_resize":
            continue
        y = _resize_axis(y, axis, out_sizes[axis], scales[axis], roi, opts)
    return y


def _opts(ctx, mode: str, coord: str, nearest_mode: str) -> dict:
    return {"mode": mode, "coord": coord, "nearest_mode": nearest_mode, "cubic_a": ctx.a("cubic_coeff_a", -0.75),
            "exclude_outside": bool(ctx.a("exclude_outside", 0)), "extrapolation": ctx.a("extrapolation_value", 0.0)}


@register_ops("Resize", since_version=10)
def _resize10(ctx, xs):
    """Opset 10: (X, scales), asymmetric coordinates, nearest rounding as Upsample."""
    x = xs[0]
    scales = [float(v) for v in xs[1].to(_F32).reshape(-1).tolist()]
    out_sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    return resize(x, out_sizes, scales, None, _opts(ctx, ctx.a("mode", "nearest"), "asymmetric", "simple"))


@register_ops("Resize", since_version=11)
def _resize(ctx, xs):
    """Opset 11 on: (X, roi, scales, sizes) with the transformation/rounding attributes (18: axes,
    keep_aspect_ratio_policy, antialias; 19: half_pixel_symmetric)."""
    x = xs[0]
    r = x.dim()
    roi_t = xs[1] if len(xs) > 1 else None
    scales_t = xs[2] if len(xs) > 2 else None
    sizes_t = xs[3] if len(xs) > 3 else None
    coord = ctx.a("coordinate_transformation_mode", "half_pixel")
    nearest_mode = ctx.a("nearest_mode", "round_prefer_floor")
    mode = ctx.a("mode", "nearest")
    axes = [norm_axis(a, r) for a in ctx.a("axes", list(range(r)))]
    in_sizes = list(x.shape)
    scales = [1.0] * r
    out_sizes = list(in_sizes)
    rois = None
    if roi_t is not None and roi_t.numel() and coord == "tf_crop_and_resize":
        vals = [float(v) for v in roi_t.reshape(-1).tolist()]
        k = len(vals) // 2
        rois = [(0.0, 1.0)] * r
        for j, a in enumerate(axes if k == len(axes) else range(r)):
            rois[a] = (vals[j], vals[j + k])
    if sizes_t is not None and sizes_t.numel():
        sizes = as_ints(sizes_t)
        policy = ctx.a("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, s in zip(axes, sizes):
                out_sizes[a] = s
                scales[a] = float(torch.tensor(s, dtype=_F32) / in_sizes[a])
        else:
            pick = min if policy == "not_larger" else max
            sc = pick(float(torch.tensor(s, dtype=_F32) / in_sizes[a]) for a, s in zip(axes, sizes))
            for a in axes:
                scales[a] = sc
                out_sizes[a] = int(math.floor(sc * in_sizes[a] + 0.5))
    elif scales_t is not None and scales_t.numel():
        vals = [float(v) for v in scales_t.to(_F32).reshape(-1).tolist()]
        for a, s in zip(axes if len(vals) == len(axes) else range(r), vals):
            scales[a] = s
            extent = (rois[a][1] - rois[a][0]) if rois is not None else 1.0
            out_sizes[a] = int(math.floor(in_sizes[a] * extent * s))
    else:
        raise ctx.fail("neither scales nor sizes is given")
    if ctx.a("antialias", 0) and mode != "nearest" and any(s < 1 for s in scales):
        raise ctx.fail("antialias=1 when downsampling is not supported; re-export without antialias")
    if coord == "tf_crop_and_resize" and rois is None:
        rois = [(0.0, 1.0)] * r
    return resize(x, out_sizes, scales, rois, _opts(ctx, mode, coord, nearest_mode))


@register_ops("Upsample", since_version=7)
def _upsample(ctx, xs):
    """Opsets 7-9 (removed at 10): ``scales`` attribute (7) or input (9); asymmetric coordinates."""
    x = xs[0]
    scales = list(ctx.a("scales")) if ctx.a("scales") is not None else [float(v) for v in xs[1].reshape(-1).tolist()]
    out_sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    mode = ctx.a("mode", "nearest")
    mode = "linear" if mode in ("linear", "bilinear") else mode
    return resize(x, out_sizes, scales, None, _opts(ctx, mode, "asymmetric", "simple"))


@register_ops("DepthToSpace")
def _depth_to_space(ctx, xs):
    """[N, C, H, W] -> [N, C/b², H·b, W·b]; DCR (default): depth is (b, b, C/b²), CRD: (C/b², b, b)."""
    x = xs[0]
    b = int(ctx.a("blocksize"))
    n, c, h, w = x.shape
    if ctx.a("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register_ops("SpaceToDepth")
def _space_to_depth(ctx, xs):
    """[N, C, H, W] -> [N, C·b², H/b, W/b], depth ordered (b, b, C) (the inverse of DepthToSpace DCR)."""
    x = xs[0]
    b = int(ctx.a("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)

