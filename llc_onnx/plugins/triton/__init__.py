"""Triton kernels for the weight-only formats, and everything around them.

* :mod:`.kernels`    ``@triton.jit`` GEMV (split-K) and GEMM kernels, plain and series, on MatMulNBits bytes;
* :mod:`.configs`    launch configurations (no triton import);
* :mod:`.launch`     torch entry point :func:`~.launch.matmul_nbits_triton` (autotuned on CUDA);
* :mod:`.reference`  the torch reference (any device, what runs without Triton);
* :mod:`.ops`        ``torch.ops.llc_onnx.matmul_nbits`` / ``series_matmul`` custom ops (Triton on CUDA);
* :mod:`.dispatch`   the functions the interpreter's ops call;
* :mod:`.aot`        ahead-of-time compile to PTX/cubin for sm_80/sm_90, registers and spills from ptxas;
* :mod:`.selfcheck`  run the kernels on saved cases in a process of their own (interpreter or CUDA).

Only :mod:`.kernels`, :mod:`.launch`, :mod:`.aot` and :mod:`.selfcheck` import ``triton``.
"""
