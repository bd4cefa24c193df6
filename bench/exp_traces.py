"""Per-node Hessian trace estimators side by side on a bench model (the HAWQ-V2 sensitivity tr(H_ii)).

    python -m bench.exp_traces --model effnet --nodes 0,2,5,12,20 --matvecs 16 --steps 6

For each chosen node i (index into the model's compressible nodes), on the first calibration batch of the
allocation baselines' context (``bench.baselines.baseline_context``, as the ``hawq_*`` rows), with the same
number of Hessian-vector products H_ii·v (``--matvecs``) for both:

* plain per-node Hutchinson: t_k = z_kᵀ H_ii z_k, z_k Rademacher; trace = mean, SE = std/√K;
* deflated (``solvers.hessian.deflated_trace``'s estimator, written out here as an independent check):
  ``--steps`` Lanczos steps give the basis Q and tr(QᵀH_iiQ) = Σ α exactly, the remaining products are
  deflated probes y = (I − QQᵀ) z; trace = Σ α + mean(yᵀH_ii y), SE over the probes.

Prints one line per node: n, both traces with their relative SE, the Krylov part, the three largest |Ritz
values| and the seconds each took. The products are second backward passes restricted to w_i on a kept
first-derivative graph (``solvers.hessian._forward_grads``): an early node costs about a whole backward pass.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def main(argv=None) -> None:
    from bench import baselines as B
    from bench.models import MODELS
    from llc_onnx.solvers.hessian import _Lanczos, _batches, _forward_grads, _rademacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="effnet", choices=sorted(MODELS))
    ap.add_argument("--nodes", required=True, help="comma list of node indices (0-based, graph order)")
    ap.add_argument("--matvecs", type=int, default=16, help="Hessian-vector products per node and estimator")
    ap.add_argument("--steps", type=int, default=6, help="Lanczos steps of the deflated estimator")
    args = ap.parse_args(argv)
    m = MODELS[args.model]
    ctx = B.baseline_context(str(m.model_path()), str(m.calib_path()), str(m.held_path()),
                             batch_size=m.batch_size, measure_samples=m.measure_samples, target="qdq")
    names = [n.name for n in ctx.nodes]
    ws, gs, count = _forward_grads(ctx.graph, _batches(ctx.calib, 1)[0], ctx.loss, names)

    def mv(i: int, v: torch.Tensor) -> torch.Tensor:
        (h,) = torch.autograd.grad(gs[i], [ws[i]], grad_outputs=v.reshape(ws[i].shape).to(ws[i].dtype),
                                   retain_graph=True)
        return h.to(torch.float64).reshape(-1) / count

    K, k = args.matvecs, args.steps
    for i in (int(a) for a in args.nodes.split(",")):
        n = ws[i].numel()
        gen = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        plain = []
        for _ in range(K):
            z = _rademacher(gen, (n,), torch.float64, "cpu")
            plain.append(float(z @ mv(i, z)))
        plain = np.array(plain)
        t1 = time.perf_counter()
        run = _Lanczos(n, k, torch.randn(n, generator=gen, dtype=torch.float64))
        while not run.done:
            run.advance(mv(i, run.current()))
        Q, krylov = run.Q[: run.m], sum(run.alphas)
        rest = []
        for _ in range(max(2, K - run.m)):
            z = _rademacher(gen, (n,), torch.float64, "cpu")
            y = z - Q.T @ (Q @ z)
            rest.append(float(y @ mv(i, y)))
        rest = np.array(rest)
        t2 = time.perf_counter()
        tr_p, se_p = plain.mean(), plain.std(ddof=1) / math.sqrt(K)
        tr_d, se_d = krylov + rest.mean(), rest.std(ddof=1) / math.sqrt(len(rest))
        top = sorted(np.abs(run.result().values))[-3:]
        print(f"{i:2d} {names[i][:32]:32s} n={n:8d}  plain {tr_p:10.4g} ±{se_p / abs(tr_p):6.1%}  "
              f"deflated {tr_d:10.4g} ±{se_d / abs(tr_d):6.1%} (Krylov part {krylov:.4g}; top |θ| "
              f"{', '.join(f'{x:.3g}' for x in top)})  {t1 - t0:.1f} s / {t2 - t1:.1f} s", flush=True)


if __name__ == "__main__":
    main()
