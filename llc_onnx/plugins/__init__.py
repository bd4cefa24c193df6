"""GPU execution of llc-onnx's low-bit formats: Triton kernels, TensorRT plugins, a CUDA runner.

* :mod:`.layout`       ONNX Runtime ``MatMulNBits`` bytes (pack / unpack / dequantize, series stacking), numpy;
* :mod:`.series`       the series pattern ``Concat(x, …, x) -> MatMulNBits`` and its fused node;
* :mod:`.triton`       Triton weight-only GEMV/GEMM and series kernels, ``torch.library`` ops, AOT PTX build;
* :mod:`.tensorrt`     ``tensorrt.plugin`` definitions, ONNX -> plugin nodes, engine build and comparison;
* :mod:`.runner`       run a compressed ONNX on a device through the interpreter with the kernels.

Nothing here imports ``triton`` or ``tensorrt`` at import time; each entry point says what to install.
"""
