"""Launch configurations of the Triton kernels (no triton import: TensorRT plugins and the AOT build use them).

A configuration fixes the tile (``block_m``/``block_n``/``block_k``; ``block_k`` counts inputs, not words),
the split-K factor, warps and pipeline stages. The sets are small and were chosen so that every
configuration compiles without register spills for sm_80 and sm_90 in its heaviest case (2-bit codes,
series, bf16; see ``python -m llc_onnx.plugins.triton.aot --all``).
"""

from __future__ import annotations

from dataclasses import dataclass

GEMV_MAX_M = 4  # rows up to which the GEMV candidates are tried


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. ``block_k`` counts inputs (codes), not words."""

    kind: str                 # "gemv" | "gemm"
    block_n: int
    block_k: int
    split_k: int = 1
    block_m: int = 1          # gemm only
    group_m: int = 8          # gemm only
    num_warps: int = 4
    num_stages: int = 2

    @property
    def label(self) -> str:
        if self.kind == "gemv":
            return f"gemv n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps}"
        return (f"gemm m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} "
                f"w{self.num_warps} st{self.num_stages}")


GEMV_CONFIGS = (
    KernelConfig("gemv", block_n=16, block_k=128, split_k=1, num_warps=4),
    KernelConfig("gemv", block_n=8, block_k=512, split_k=2, num_warps=4),
    KernelConfig("gemv", block_n=32, block_k=128, split_k=4, num_warps=4),
    KernelConfig("gemv", block_n=16, block_k=256, split_k=8, num_warps=4),
    KernelConfig("gemv", block_n=64, block_k=128, split_k=1, num_warps=8),
    KernelConfig("gemv", block_n=32, block_k=512, split_k=4, num_warps=8),
)
GEMM_SMALL_M_CONFIGS = (  # M ≤ 64: bandwidth-bound, split-K for parallelism
    KernelConfig("gemm", block_m=16, block_n=64, block_k=64, split_k=4, num_warps=4, num_stages=4),
    KernelConfig("gemm", block_m=16, block_n=128, block_k=64, split_k=2, num_warps=4, num_stages=3),
    KernelConfig("gemm", block_m=32, block_n=64, block_k=64, split_k=1, num_warps=4, num_stages=4),
    KernelConfig("gemm", block_m=64, block_n=64, block_k=64, split_k=2, num_warps=4, num_stages=3),
)
GEMM_LARGE_M_CONFIGS = (  # M > 64: compute-bound tiles
    KernelConfig("gemm", block_m=64, block_n=128, block_k=32, split_k=1, num_warps=4, num_stages=4),
    KernelConfig("gemm", block_m=128, block_n=128, block_k=32, split_k=1, num_warps=8, num_stages=3),
    KernelConfig("gemm", block_m=128, block_n=64, block_k=32, split_k=1, num_warps=4, num_stages=4),
    KernelConfig("gemm", block_m=64, block_n=256, block_k=32, split_k=1, num_warps=8, num_stages=3),
)
ALL_CONFIGS = GEMV_CONFIGS + GEMM_SMALL_M_CONFIGS + GEMM_LARGE_M_CONFIGS


def candidates(M: int) -> tuple[KernelConfig, ...]:
    """Configurations tried for ``M`` rows (the first one is the default when not autotuning)."""
    if M <= GEMV_MAX_M:
        return GEMV_CONFIGS + (GEMM_SMALL_M_CONFIGS if M > 1 else ())
    if M <= 64:
        return GEMM_SMALL_M_CONFIGS
    return GEMM_LARGE_M_CONFIGS


def kernel_constexprs(config: KernelConfig, *, bits: int, block_size: int, terms: int, per_channel: bool) -> dict:
    """The constexpr arguments of ``config``'s kernel (shared with the AOT compile)."""
    c = {"BITS": bits, "BS": block_size, "TERMS": terms, "PER_CHANNEL": per_channel,
         "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "SPLIT_K": config.split_k}
    if config.kind == "gemm":
        c.update(BLOCK_M=config.block_m, GROUP_M=config.group_m)
    return c


