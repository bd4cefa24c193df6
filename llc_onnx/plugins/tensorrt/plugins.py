"""TensorRT plugin definitions (``tensorrt.plugin``) for the weight-only ops, backed by the Triton kernels.

Plugins ``llc_onnx::matmul_int2``, ``llc_onnx::matmul_int4``, ``llc_onnx::matmul_int8`` (inputs ``x [..., K]``,
``words`` int32 ``[N, n_blk·blob/4]``, ``scales`` fp32 or the activation dtype; attributes ``K, N, block_size``) and
``llc_onnx::series_matmul`` (same inputs, ``x`` untiled; attributes ``K, N, bits, block_size, terms``). The
output is ``x``'s shape with the last dimension ``N`` and ``x``'s dtype (fp16, bf16 or fp32).

Each plugin has only an ``aot_impl``: at engine build time it compiles the kernel instantiation for the build
GPU's architecture (:mod:`llc_onnx.plugins.triton.aot`) and returns its PTX, the launch grid as symbolic
shape expressions and ``(M, N, K)`` as int32 extra arguments (kernel parameters are ``x, w, s, M, N, K, y``:
TensorRT's order of inputs, scalars, outputs). The engine stores the PTX and runs without Python. The
configuration is the GEMV one when ``M`` (product of ``x``'s leading dims) is a build-time constant ≤
``GEMV_MAX_M``, else a GEMM one sized by ``M`` (dynamic ``M``: the large-M tile); split-K is never used
(the plugin has one kernel and TensorRT does not zero outputs), and the pipeline stages are reduced until the
kernel needs at most 48 KB of shared memory (more needs an opt-in attribute the AOT launch does not set).

The architecture is the current CUDA device's (``torch.cuda.get_device_capability()``) unless
``LLC_ONNX_TRT_ARCH`` (e.g. ``90``) is set; ``LLC_ONNX_PTX_VERSION`` (e.g. ``84``) caps the PTX ISA when the
driver is older than Triton's ptxas.

This module imports ``tensorrt`` only inside :func:`register_plugins`. No ``from __future__ import
annotations``: ``tensorrt.plugin`` reads the annotations of the registered functions as objects.
"""

import dataclasses
import os

from ...errors import LLCError
from ..triton.configs import GEMM_LARGE_M_CONFIGS, GEMM_SMALL_M_CONFIGS, GEMV_CONFIGS, GEMV_MAX_M, KernelConfig
from .convert import MATMUL_PLUGINS, PLUGIN_NAMESPACE, SERIES_PLUGIN

_REGISTERED: list = []
SHARED_DEFAULT = 48 * 1024  # dynamic shared memory a kernel gets without cuFuncSetAttribute

TRT_INSTALL = ("install TensorRT ≥ 10.8 with its Python bindings on a machine with an NVIDIA GPU (e.g. "
               "pip install tensorrt-cu12 from NVIDIA's index, see docs.nvidia.com/deeplearning/tensorrt), "
               "plus triton")


def import_tensorrt():
    """``(tensorrt, tensorrt.plugin)`` or an LLCError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise LLCError(f"TensorRT: the Python package 'tensorrt' cannot be imported ({exc}); {TRT_INSTALL}") from None
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise LLCError(f"TensorRT {getattr(trt, '__version__', '?')}: no tensorrt.plugin module (quickly "
                       f"deployable plugins); {TRT_INSTALL}") from None
    if not hasattr(trtp, "aot_impl"):
        raise LLCError(f"TensorRT {getattr(trt, '__version__', '?')}: tensorrt.plugin has no aot_impl "
                       f"(ahead-of-time plugins); {TRT_INSTALL}")
    return trt, trtp


def choose_config(m_const: int | None) -> KernelConfig:
    """The kernel configuration a plugin uses for a build-time row count (None: dynamic); never split-K."""
    if m_const is not None and m_const <= GEMV_MAX_M:
        return next(c for c in GEMV_CONFIGS if c.split_k == 1)
    if m_const is not None and m_const <= 64:
        return next(c for c in GEMM_SMALL_M_CONFIGS if c.split_k == 1)
    return GEMM_LARGE_M_CONFIGS[0]


def build_arch() -> int:
    """Compute capability the plugins compile for (``LLC_ONNX_TRT_ARCH`` or the current CUDA device)."""
    env = os.environ.get("LLC_ONNX_TRT_ARCH")
    if env:
        return int(env)
    import torch

    if not torch.cuda.is_available():
        raise LLCError("TensorRT plugins: no CUDA device to compile for; set LLC_ONNX_TRT_ARCH (e.g. 90)")
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _dtype_name(trt, dtype) -> str:
    names = {trt.float16: "fp16", trt.float32: "fp32"}
    if hasattr(trt, "bfloat16"):
        names[trt.bfloat16] = "bf16"
    if dtype not in names:
        raise LLCError(f"TensorRT plugins: activation dtype {dtype} not supported; use fp16, bf16 or fp32")
    return names[dtype]


def _constant(expr) -> int | None:
    try:
        return int(expr.constant_value()) if expr.is_constant else None
    except Exception:  # noqa: BLE001 - fake or symbolic expressions have no constant
        return None


def aot_launch(trt, trtp, x, s, *, K: int, N: int, bits: int, block_size: int, terms: int):
    """``(kernel name, PTX, launch parameters, extra int32 arguments)`` for one plugin instance."""
    from ..triton import aot

    rows = x.shape_expr[0]
    for i in range(1, x.ndim - 1):
        rows = rows * x.shape_expr[i]
    config = choose_config(_constant(rows))
    n_scales = _constant(s.shape_expr.numel())
    per_channel = n_scales == N * terms and n_scales != N * terms * -(-K // block_size)
    ptx_version = os.environ.get("LLC_ONNX_PTX_VERSION")
    for stages in (config.num_stages, 2, 1):  # fewer pipeline stages until the tile fits in 48 KB
        config = dataclasses.replace(config, num_stages=stages)
        ck = aot.compile_kernel(config, bits=bits, block_size=block_size, terms=terms, per_channel=per_channel,
                                dtype=_dtype_name(trt, x.dtype), scale_dtype=_dtype_name(trt, s.dtype),
                                arch=build_arch(), K=K, N=N, ptx_version=int(ptx_version) if ptx_version else None)
        if ck.shared <= SHARED_DEFAULT:
            break
    else:
        raise LLCError(f"TensorRT plugin {ck.name}: {ck.shared} bytes of shared memory, more than the "
                       f"{SHARED_DEFAULT} a launch gets without an opt-in")
    if ck.scratch:
        raise LLCError(f"TensorRT plugin {ck.name}: the kernel needs {ck.scratch} bytes of Triton scratch memory, "
                       "which TensorRT's AOT launch does not provide")
    launch = trtp.KernelLaunchParams()
    n_tiles = -(-N // config.block_n)
    if config.kind == "gemv":
        launch.grid_x = n_tiles
        launch.grid_y = 1
        launch.grid_z = rows
    else:
        launch.grid_x = trtp.cdiv(rows, config.block_m) * n_tiles
        launch.grid_y = 1
        launch.grid_z = 1
    launch.block_x = ck.num_warps * 32
    launch.shared_mem = ck.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(rows), trtp.SymInt32(N), trtp.SymInt32(K)])
    return ck.name, ck.ptx, launch, extra


def _register_matmul(trt, trtp, op: str, bits: int) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{op}"

    def desc(x: trtp.TensorDesc, w: trtp.TensorDesc, s: trtp.TensorDesc, K: int, N: int, block_size: int
             ) -> trtp.TensorDesc:
        y = x.like()
        y.shape_expr[x.ndim - 1] = N
        return y

    def aot_impl(x, w, s, K: int, N: int, block_size: int, outputs, tactic):
        return aot_launch(trt, trtp, x, s, K=K, N=N, bits=bits, block_size=block_size, terms=1)

    trtp.register(plugin_id)(desc)
    trtp.aot_impl(plugin_id)(aot_impl)


def _register_series(trt, trtp) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{SERIES_PLUGIN}"

    def desc(x: trtp.TensorDesc, w: trtp.TensorDesc, s: trtp.TensorDesc, K: int, N: int, bits: int,
             block_size: int, terms: int) -> trtp.TensorDesc:
        y = x.like()
        y.shape_expr[x.ndim - 1] = N
        return y

    def aot_impl(x, w, s, K: int, N: int, bits: int, block_size: int, terms: int, outputs, tactic):
        return aot_launch(trt, trtp, x, s, K=K, N=N, bits=bits, block_size=block_size, terms=terms)

    trtp.register(plugin_id)(desc)
    trtp.aot_impl(plugin_id)(aot_impl)


def register_plugins() -> list[str]:
    """Register every plugin with TensorRT once per process; returns their ids. LLCError (what to install)
    when ``tensorrt`` / ``tensorrt.plugin.aot_impl`` is missing."""
    if _REGISTERED:
        return list(_REGISTERED)
    trt, trtp = import_tensorrt()
    for bits, op in MATMUL_PLUGINS.items():
        _register_matmul(trt, trtp, op, bits)
        _REGISTERED.append(f"{PLUGIN_NAMESPACE}::{op}")
    _register_series(trt, trtp)
    _REGISTERED.append(f"{PLUGIN_NAMESPACE}::{SERIES_PLUGIN}")
    return list(_REGISTERED)
