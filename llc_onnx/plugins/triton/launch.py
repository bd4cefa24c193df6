"""Launch the Triton kernels from torch: choice of configuration (autotuned on CUDA), grids, split-K reduction.

:func:`matmul_nbits_triton` is the one entry point (plain and series). CUDA tensors run the compiled
kernels; CPU tensors run them in Triton's interpreter when the process has ``TRITON_INTERPRET=1`` (slow:
what the CPU tests use, in a subprocess, see :mod:`.selfcheck`). On CUDA the first call for a problem key
(M bucket, N, K, bits, block size, terms, scales layout, dtype, bias) times every candidate of
:func:`~.configs.candidates` *with its launch overhead* (split-K reduction included) and keeps the fastest
(``LLC_ONNX_AUTOTUNE=0``: take the first candidate).
"""

from __future__ import annotations

import os

import torch
import triton

from ...errors import LLCError
from ..layout import check_format, n_blocks
from . import kernels
from .configs import KernelConfig, candidates, kernel_constexprs

Tensor = torch.Tensor
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_fn(kind: str):
    """The ``@triton.jit`` function of a kernel family."""
    return kernels.wo_gemv_kernel if kind == "gemv" else kernels.wo_gemm_kernel


def grid(config: KernelConfig, M: int, N: int) -> tuple[int, int, int]:
    if config.kind == "gemv":
        return (triton.cdiv(N, config.block_n), config.split_k, M)
    return (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), config.split_k, 1)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter in this process (``TRITON_INTERPRET=1`` when triton was
    imported: the mode is process-wide, Triton's own library functions are built for one mode or the other)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.wo_gemv_kernel, InterpretedFunction)


def _runnable(fn, device: torch.device):
    """The kernel as Triton runs it: compiled on CUDA, interpreted on CPU (``TRITON_INTERPRET=1``)."""
    if device.type == "cuda" and interpreting():
        raise LLCError("Triton kernels: TRITON_INTERPRET=1 is set, so they cannot run on CUDA; unset it")
    if device.type != "cuda" and not interpreting():
        raise LLCError(f"Triton kernels: tensors on {device} run only in Triton's interpreter; set "
                       "TRITON_INTERPRET=1 before triton is imported, or use the torch reference")
    return fn


def weight_words(b: Tensor) -> Tensor:
    """The int32 view ``[N, n_blk·blob/4]`` of MatMulNBits bytes (uint8 ``[N, n_blk, blob]``), no copy."""
    if b.dtype == torch.int32:
        return b.reshape(b.shape[0], -1)
    if b.dtype != torch.uint8:
        raise LLCError(f"B: dtype {b.dtype} must be uint8 (MatMulNBits bytes) or int32 (their word view)")
    flat = b.reshape(b.shape[0], -1).contiguous()
    if flat.shape[1] % 4:
        raise LLCError(f"B: {flat.shape[1]} bytes per row is not a multiple of 4; not MatMulNBits bytes")
    return flat.view(torch.int32)


def _check(x: Tensor, words: Tensor, scales: Tensor, K: int, N: int, bits: int, block_size: int,
           terms: int) -> bool:
    """Validate shapes; returns whether the scales are per channel."""
    check_format(K, N, bits, block_size)
    if x.dtype not in ACT_DTYPES:
        raise LLCError(f"input: dtype {x.dtype} not supported by the Triton kernels; use float16, bfloat16 "
                       "or float32")
    if x.shape[-1] != K:
        raise LLCError(f"input: last dimension {x.shape[-1]} != K={K}")
    if terms > 1 and K % block_size:
        raise LLCError(f"series: K={K} is not a multiple of block_size={block_size}")
    nblk = n_blocks(K, block_size)
    row_words = terms * nblk * block_size * bits // 32
    if tuple(words.shape) != (N, row_words):
        raise LLCError(f"B: {tuple(words.shape)} int32 words, expected ({N}, {row_words}) for K={K}, N={N}, "
                       f"bits={bits}, block_size={block_size}, terms={terms}")
    if scales.numel() == N * terms * nblk:
        return False
    if scales.numel() == N * terms:
        return True
    raise LLCError(f"scales: {scales.numel()} values, expected {N * terms * nblk} (blocked) or {N * terms} "
                   "(per channel)")


def launch(x2: Tensor, words: Tensor, scales: Tensor, *, K: int, N: int, bits: int, block_size: int, terms: int,
           per_channel: bool, config: KernelConfig, bias: Tensor | None = None) -> Tensor:
    """Run ``config`` on a 2-D contiguous ``x2`` ``[M, K]``; returns ``[M, N]`` in x2's dtype."""
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    fn = _runnable(kernel_fn(config.kind), x2.device)
    cx = kernel_constexprs(config, bits=bits, block_size=block_size, terms=terms, per_channel=per_channel)
    out = y if config.split_k == 1 else torch.empty((config.split_k, M, N), dtype=torch.float32,
                                                    device=x2.device)
    fn[grid(config, M, N)](x2, words, scales, M, N, K, out, num_warps=config.num_warps,
                           num_stages=config.num_stages, enable_fp_fusion=True, **cx)
    if config.split_k > 1:
        block = 1024
        red = _runnable(kernels.splitk_reduce_kernel, x2.device)
        b = bias if bias is not None else out
        red[(triton.cdiv(M * N, block),)](out, b, M * N, N, y, SPLIT_K=config.split_k, HAS_BIAS=bias is not None,
                                          BLOCK=block, num_warps=4, enable_fp_fusion=True)
    elif bias is not None:
        y += bias.to(y.dtype)
    return y


_TUNED: dict[tuple, KernelConfig] = {}


def _m_bucket(M: int) -> int:
    return M if M <= 16 else 1 << (M - 1).bit_length()


def _autotune(key: tuple, options: tuple[KernelConfig, ...], run) -> KernelConfig:
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench

    best, best_ms = options[0], float("inf")
    for cfg in options:
        try:
            ms = do_bench(lambda: run(cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config that does not fit (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def matmul_nbits_triton(x: Tensor, b: Tensor, scales: Tensor, *, K: int, N: int, bits: int, block_size: int,
                        terms: int = 1, bias: Tensor | None = None, config: KernelConfig | None = None) -> Tensor:
    """``x · W (+ bias)`` with the Triton kernels; ``x`` ``[..., K]`` (untiled for a series), ``b`` MatMulNBits
    bytes (uint8 ``[N, terms·n_blk, blob]``) or their int32 word view, ``scales`` ``[N·terms·n_blk]`` or
    ``[N·terms]`` (per channel). ``config``: a fixed configuration (None: the autotuned one on CUDA, the
    first candidate elsewhere)."""
    words = weight_words(b)
    per_channel = _check(x, words, scales, K, N, bits, block_size, terms)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    s = scales.reshape(-1)
    s = (s if s.dtype in ACT_DTYPES else s.to(torch.float32)).contiguous()
    M = x2.shape[0]
    kw = dict(K=K, N=N, bits=bits, block_size=block_size, terms=terms, per_channel=per_channel, bias=bias)
    if config is None:
        options = candidates(M)
        if x2.device.type == "cuda" and os.environ.get("LLC_ONNX_AUTOTUNE", "1") != "0" and len(options) > 1:
            key = (_m_bucket(M), N, K, bits, block_size, terms, per_channel, x2.dtype, s.dtype, bias is not None,
                   x2.device.index)
            config = _autotune(key, options, lambda cfg: launch(x2, words, s, config=cfg, **kw))
        else:
            config = options[0]
    return launch(x2, words, s, config=config, **kw).reshape(*lead, N)
