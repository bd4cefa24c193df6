"""Benchmark helpers for llc-onnx (data loaders, model preparation scripts).

Not part of the installed ``llc_onnx`` package; run from the repository root,
e.g. ``python -m bench.prepare_fmnist``.
"""
