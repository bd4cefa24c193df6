"""Run the Triton kernels on saved test cases, in a process of its own (the interpreter mode is per process).

``python -m llc_onnx.plugins.triton.selfcheck CASES.npz OUT.npz [--device cpu|cuda]``

``CASES.npz`` holds, for each case ``i``: ``i.x`` (float32 values already rounded to the activation dtype),
``i.b`` (MatMulNBits bytes), ``i.s`` (scales) and ``i.meta`` (JSON: ``K, N, bits, block_size, terms, dtype,
scale_dtype, configs`` = labels of :data:`~.configs.ALL_CONFIGS`). ``OUT.npz`` gets ``i.<label>`` = the kernel's output as
float32. On CPU run it with ``TRITON_INTERPRET=1`` (the tests do). Triton 3.9's interpreter mishandles bf16 in
two places the kernels use: ``tl.dot`` multiplies the raw uint16 bits of bf16 operands, and an integer ->
bf16 cast reinterprets instead of converting. This harness patches both in the interpreter only (bf16 dot
operands -> fp32, which is what the hardware's bf16 MMA with fp32 accumulation computes; int -> fp32 ->
bf16, exact for the small integer codes); compiled kernels are not affected.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _patch_interpreter_bf16() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as ti

    cls = type(ti.interpreter_builder)
    if getattr(cls, "_llc_bf16_patched", False):
        return
    dot, si_to_fp = cls.create_dot, cls.create_si_to_fp

    def as_f32(h):
        if h.dtype == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return dot(self, as_f32(a), as_f32(b), d, *args, **kwargs)

    def create_si_to_fp(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16:
            return self.cast_impl(si_to_fp(self, src, tl.float32), dst_type)
        return si_to_fp(self, src, dst_type)

    cls.create_dot = create_dot
    cls.create_si_to_fp = create_si_to_fp
    cls._llc_bf16_patched = True


def run(cases_path: str, out_path: str, device: str = "cpu") -> int:
    from .configs import ALL_CONFIGS
    from .launch import interpreting, matmul_nbits_triton

    if interpreting():
        _patch_interpreter_bf16()
    by_label = {c.label: c for c in ALL_CONFIGS}
    cases = np.load(cases_path)
    ids = sorted({k.split(".")[0] for k in cases.files}, key=int)
    out = {}
    for i in ids:
        meta = json.loads(str(cases[f"{i}.meta"]))
        x = torch.from_numpy(cases[f"{i}.x"]).to(DTYPES[meta["dtype"]]).to(device)
        b = torch.from_numpy(cases[f"{i}.b"]).to(device)
        s = torch.from_numpy(cases[f"{i}.s"]).to(DTYPES[meta.get("scale_dtype", "float32")]).to(device)
        for label in meta["configs"]:
            y = matmul_nbits_triton(x, b, s, K=meta["K"], N=meta["N"], bits=meta["bits"],
                                    block_size=meta["block_size"], terms=meta["terms"], config=by_label[label])
            out[f"{i}.{label}"] = y.float().cpu().numpy()
    np.savez(out_path, **out)
    return len(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llc_onnx.plugins.triton.selfcheck")
    ap.add_argument("cases")
    ap.add_argument("out")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    n = run(args.cases, args.out, args.device)
    print(f"{n} kernel runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
