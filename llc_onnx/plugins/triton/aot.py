"""Ahead-of-time compile of the kernels to PTX/cubin for a GPU architecture, on any machine (no GPU needed).

``triton.compile`` lowers a kernel instantiation (signature + constexprs + warps/stages) for a target
``sm_XX``; Triton ships ``ptxas``, so the cubin is assembled here too. Register and spill counts are only in
Triton's metadata once a driver loads the cubin, so :func:`ptxas_usage` reads them from ``ptxas -v`` on the
same PTX with Triton's own ``ptxas`` (``Used R registers, S bytes spill stores, L bytes spill loads``).
The TensorRT plugins launch the same PTX (:func:`compile_kernel` output); they need ``global_scratch_size``
and ``profile_scratch_size`` of 0 (TensorRT passes null for Triton's hidden scratch pointers), checked here.

Run ``python -m llc_onnx.plugins.triton.aot [--arch 80 90] [--all]`` for a table of every instantiation.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ...errors import LLCError
from .configs import ALL_CONFIGS, GEMM_LARGE_M_CONFIGS, GEMM_SMALL_M_CONFIGS, GEMV_CONFIGS, KernelConfig, \
    kernel_constexprs

TRITON_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                 "float32": "fp32"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block (opt-in)


@dataclass
class CompiledKernel:
    """One compiled instantiation and what ptxas says about it."""

    name: str                 # kernel symbol in the PTX
    kind: str                 # "gemv" | "gemm" | "reduce"
    arch: int                 # 80, 90, ...
    dtype: str                # activation dtype ("fp16", "bf16", "fp32")
    config: KernelConfig | None
    constexprs: dict
    ptx: str
    num_warps: int
    shared: int               # bytes of shared memory per block
    registers: int
    spill_stores: int         # bytes
    spill_loads: int          # bytes
    scratch: int              # global + profile scratch bytes (must be 0 for TensorRT)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", int(arch), 32)


def _ptxas(arch: int) -> str:
    """Path of the ptxas Triton uses for ``arch`` (its bundled one)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(arch)        # triton ≥ 3.7 picks per architecture
        except TypeError:
            tool = get_ptxas()            # triton 3.6
        return tool.path
    except Exception as exc:  # noqa: BLE001
        raise LLCError(f"triton: cannot locate its bundled ptxas ({exc}); reinstall triton") from None


def sm_name(arch: int) -> str:
    """ptxas ``--gpu-name`` of ``arch`` (``sm_90a`` for Hopper, as Triton compiles it)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` of the PTX's kernel from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={sm_name(arch)}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    if r.returncode:
        raise LLCError(f"ptxas for {sm_name(arch)} failed: {r.stderr.strip().splitlines()[-1:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    stores = re.search(r"(\d+) bytes spill stores", r.stderr)
    loads = re.search(r"(\d+) bytes spill loads", r.stderr)
    if not (regs and stores and loads):
        raise LLCError(f"ptxas -v for {sm_name(arch)}: unexpected output {r.stderr.strip()[:200]!r}")
    return int(regs.group(1)), int(stores.group(1)), int(loads.group(1))


def _compile(fn, signature: dict, constexprs: dict, *, arch: int, num_warps: int, num_stages: int,
             ptx_version: int | None = None, divisible: dict | None = None):
    """``triton.compile`` of ``fn``. ``divisible``: runtime argument -> value known to be a multiple of 16 (int)
    or True (16-byte-aligned pointer); Triton then vectorizes the loads, as its JIT does for such arguments."""
    import triton
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    names = list(fn.arg_names) if hasattr(fn, "arg_names") else list(sig)
    attrs = {}
    for name, value in (divisible or {}).items():
        if value is True or (not isinstance(value, bool) and int(value) % 16 == 0):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}  # FMA, as Triton 3.6
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=_target(arch),
                          options=options)


def matmul_signature(dtype: str, *, split_k: int = 1, scale_dtype: str = "fp32") -> dict:
    """Runtime parameters of the matmul kernels: ``(x, w, s, M, N, K, y)`` (TensorRT's AOT order)."""
    dt = TRITON_DTYPES[dtype]
    return {"x_ptr": f"*{dt}", "w_ptr": "*i32", "s_ptr": f"*{TRITON_DTYPES[scale_dtype]}", "M": "i32", "N": "i32",
            "K": "i32",
            "y_ptr": f"*{dt}" if split_k == 1 else "*fp32"}


def _result(ck, kind, arch, dtype, config, constexprs, seconds) -> CompiledKernel:
    md = ck.metadata
    regs, st, ld = ptxas_usage(ck.asm["ptx"], arch)
    scratch = int(getattr(md, "global_scratch_size", 0) or 0) + int(getattr(md, "profile_scratch_size", 0) or 0)
    return CompiledKernel(name=md.name, kind=kind, arch=arch, dtype=TRITON_DTYPES[dtype], config=config,
                          constexprs=constexprs, ptx=ck.asm["ptx"], num_warps=md.num_warps, shared=md.shared,
                          registers=regs, spill_stores=st, spill_loads=ld, scratch=scratch, seconds=seconds)


def compile_kernel(config: KernelConfig, *, bits: int, block_size: int, terms: int = 1, per_channel: bool = False,
                   dtype: str = "fp16", arch: int = 90, ptx_version: int | None = None, K: int | None = None,
                   N: int | None = None, scale_dtype: str = "fp32") -> CompiledKernel:
    """Compile one matmul instantiation for ``sm_<arch>`` and read its resource usage. The four pointers are
    declared 16-byte aligned (true of torch and TensorRT allocations); ``K`` / ``N``, when given (TensorRT
    knows them at build time), are declared multiples of 16 if they are."""
    cx = kernel_constexprs(config, bits=bits, block_size=block_size, terms=terms, per_channel=per_channel)
    divisible = {"x_ptr": True, "w_ptr": True, "s_ptr": True, "y_ptr": True}
    if K is not None:
        divisible["K"] = K
    if N is not None:
        divisible["N"] = N
    t0 = time.perf_counter()
    from .launch import kernel_fn

    ck = _compile(kernel_fn(config.kind), matmul_signature(dtype, split_k=config.split_k, scale_dtype=scale_dtype),
                  cx, arch=arch,
                  num_warps=config.num_warps, num_stages=config.num_stages, ptx_version=ptx_version,
                  divisible=divisible)
    return _result(ck, config.kind, arch, dtype, config, cx, time.perf_counter() - t0)


def compile_reduce(*, dtype: str = "fp16", split_k: int = 4, has_bias: bool = True, arch: int = 90
                   ) -> CompiledKernel:
    """Compile the split-K reduction kernel."""
    from .kernels import splitk_reduce_kernel

    dt = TRITON_DTYPES[dtype]
    cx = {"SPLIT_K": split_k, "HAS_BIAS": has_bias, "BLOCK": 1024}
    sig = {"ws_ptr": "*fp32", "b_ptr": f"*{dt}", "MN": "i32", "N": "i32", "y_ptr": f"*{dt}"}
    t0 = time.perf_counter()
    ck = _compile(splitk_reduce_kernel, sig, cx, arch=arch, num_warps=4, num_stages=1,
                  divisible={"ws_ptr": True, "b_ptr": True, "y_ptr": True})
    return _result(ck, "reduce", arch, dtype, None, cx, time.perf_counter() - t0)


def representative_set(archs=(80, 90)) -> list[dict]:
    """The instantiations the CI test compiles: every kernel function and every default configuration in its
    heaviest register case (2-bit codes, a 2-term series, bf16), plus 8-bit per channel, for each arch."""
    jobs = []
    for arch in archs:
        for cfg in (GEMV_CONFIGS[0], GEMM_SMALL_M_CONFIGS[0], GEMM_LARGE_M_CONFIGS[0]):
            jobs.append(dict(config=cfg, bits=2, block_size=32, terms=2, per_channel=False, dtype="bf16", arch=arch,
                             K=4096, N=4096))
        jobs.append(dict(config=GEMM_LARGE_M_CONFIGS[0], bits=8, block_size=128, terms=1, per_channel=True,
                         dtype="fp16", arch=arch, K=4096, N=14336))
        jobs.append(dict(reduce=True, dtype="fp16", arch=arch))
    return jobs


def full_set(archs=(80, 90)) -> list[dict]:
    """Every configuration × bits × (plain, series) × dtype × arch."""
    jobs = []
    for arch in archs:
        for cfg in ALL_CONFIGS:
            for bits in (2, 4, 8):
                for terms in (1, 2):
                    for dtype in ("fp16", "bf16"):
                        jobs.append(dict(config=cfg, bits=bits, block_size=32, terms=terms, per_channel=False,
                                         dtype=dtype, arch=arch, K=4096, N=4096))
        jobs.append(dict(reduce=True, dtype="fp16", arch=arch))
    return jobs


def run_job(job: dict) -> CompiledKernel:
    job = dict(job)
    if job.pop("reduce", False):
        return compile_reduce(**job)
    return compile_kernel(job.pop("config"), **job)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llc_onnx.plugins.triton.aot",
                                 description="Compile the Triton kernels to PTX/cubin and report registers/spills.")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--all", action="store_true", help="every configuration × bits × terms × dtype")
    ap.add_argument("--out", help="write each PTX into this directory")
    args = ap.parse_args(argv)
    jobs = full_set(tuple(args.arch)) if args.all else representative_set(tuple(args.arch))
    bad = 0
    print("| kernel | config | bits | terms | dtype | arch | regs | spill st/ld B | shared B | scratch | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for job in jobs:
        ck = run_job(job)
        label = ck.config.label if ck.config else f"split_k={ck.constexprs['SPLIT_K']}"
        print(f"| {ck.kind} | {label} | {ck.constexprs.get('BITS', '')} | {ck.constexprs.get('TERMS', '')} | "
              f"{ck.dtype} | sm_{ck.arch} | {ck.registers} | {ck.spill_stores}/{ck.spill_loads} | {ck.shared} | "
              f"{ck.scratch} | {ck.seconds:.1f} |")
        bad += ck.spills > 0 or ck.scratch > 0 or ck.shared > SHARED_LIMIT.get(ck.arch, 99 * 1024)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{ck.name}_sm{ck.arch}_{len(os.listdir(args.out))}.ptx"), "w") as f:
                f.write(ck.ptx)
    print(f"{len(jobs)} instantiations, {bad} with spills, scratch or too much shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
