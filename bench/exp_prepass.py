"""Time the candidate stage's serial pre-pass — which rounding each (node, format) is measured in, i.e. whether
nearest rounding is inside the LLC neighbourhood (``flows.roundings.Rounder.inside``) — on a bench model's MatMul
weights for the formats of the issue-15 rows (``--target ort-cpu --block-size 32,128 --bits 4,8,float``: 4- and
8-bit MatMulNBits at blocks 32 and 128, W8A8 with 7-bit codes), one thread:

    python -m bench.exp_prepass [--model smollm2]

Prints the seconds of the full MSE scale search for every pair ("search", what ``inside`` did before 90def0b) and
of ``Rounder.inside`` now (min-max rounding first), how many pairs are inside, and whether the answers agree.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx import numpy_helper


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.exp_prepass", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bench import models
    from llc_onnx.config import QuantConfig
    from llc_onnx.flows import roundings
    from llc_onnx.flows.roundings import Rounder
    from llc_onnx.targets.base import Format

    m = models.get(a.model)[0]
    m.prepare()
    proto = onnx.load(str(m.model_path()))
    inits = {i.name: i for i in proto.graph.initializer}
    ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in proto.graph.node
          if n.op_type == "MatMul" and n.input[1] in inits]
    fmts = [Format("matmulnbits", bits=b, block_size=bs) for b in (4, 8) for bs in (32, 128)]
    fmts.append(Format("w8a8", bits=8, code_bits=7))
    node = SimpleNamespace(out_axis=1, reduce_axis=0)  # MatMul weight [K, N]
    r = Rounder(SimpleNamespace(config=SimpleNamespace(quant=QuantConfig(auto_roundings=("gptq",)))), None)
    answers = {}
    for mode in ("search", "inside"):
        t0 = time.perf_counter()
        got = [roundings._relative_error(w, r.spec(f), node) <= r.cfg.llc_radius if mode == "search"
               else r.inside(w, node, f) for w in ws for f in fmts]
        answers[mode] = got
        print(f"{mode}: {time.perf_counter() - t0:.1f} s, {sum(got)} of {len(got)} (node, format) pairs inside",
              flush=True)
    print(f"{len(ws)} MatMul weights; the same answers: {answers['search'] == answers['inside']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
