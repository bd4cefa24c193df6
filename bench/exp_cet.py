"""CET (second-order, Hessian-axes) rounding and cost vs nearest / LLC rounding, measured out of sample.

    python -m bench.exp_cet [--model examples/fashion_cnn.onnx --data examples/fashion_data.npz]
                            [--bits 4,2] [--k 8] [--ks 4,8,16,32] [--max-batches N] [--json out.json]
    python -m bench.exp_cet --fmnist          # the bench ResNet (python -m bench.prepare_fmnist first)
    python -m bench.exp_cet --bench effnet --curvature fisher --samples 128   # any bench model; one-pass curvature

Data: the labelled data is split half/half (seeded) into a *fit* half — gradients and the per-node curvature
(``solvers.cet.node_curvature``) that choose roundings — and a *measure* half on which every number is
judged: ΔL of the loss with one node quantized (interpreter, ``calib.noise.measure``, ± paired SE), and
the predictions: first order g_m·δ (measure-half gradient), exact second order g_m·δ + ½δᵀH_iiδ (one HVP
pass on the measure half per candidate: today's ``--cost cet``), cheap CET g_m·δ + ½Σλ(v·δ)² + ½ρ‖δ⊥‖²
from the fit-half eigenpairs (no pass). Also: the whole model at each level with every node rounded the
same way, wall times, and CET rounding's measured effect against k.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from llc_onnx.calib.data import Dataset, load_dataset, sample_subset, split_dataset
from llc_onnx.calib.gradients import collect_gradients
from llc_onnx.calib.losses import make_loss
from llc_onnx.calib.noise import constant, measure
from llc_onnx.compressible import find_compressible
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import load_model, prepare_model
from llc_onnx.quant import WeightQuantSpec, quantize_weight
from llc_onnx.quant.cet import cet_round
from llc_onnx.report_files import spearman
from llc_onnx.solvers.cet import cet_predict, fisher_curvature, node_curvature
from llc_onnx.solvers.hessian import quadratic_term

ROUNDINGS = ("nearest", "llc", "cet", "cet+g")


def _spec(bits: int, block: int, rounding: str = "nearest") -> WeightQuantSpec:
    return WeightQuantSpec(bits, block if bits <= 4 else None, "mse", rounding)


def _load(args):
    if args.bench:
        from bench.models import MODELS

        m = MODELS[args.bench]
        model = prepare_model(load_model(str(m.model_path())))
        fit = load_dataset(str(m.calib_path()), model, batch_size=args.batch)
        test = load_dataset(str(m.held_path()), model, batch_size=args.batch)
        fit.source, test.source = f"{args.bench} calibration", f"{args.bench} test split"
        return model, fit, test
    if args.fmnist:
        from bench.datasets import cache_dir
        d = cache_dir() / "fmnist"
        model = prepare_model(load_model(str(d / "fmnist_resnet.onnx")))
        calib = load_dataset(str(d / "calib.npz"), model, batch_size=args.batch)
        test = load_dataset(str(d / "test.npz"), model, batch_size=args.batch)
        # fit: the calibration pool's first half (5,000 images); measure: the official test set
        fit = Dataset(calib.batches[: len(calib.batches) // 2], source="calib[:5000]")
        return model, fit, test
    model = prepare_model(load_model(args.model))
    ds = load_dataset(args.data, model, batch_size=args.batch)
    fit, meas = split_dataset(ds, 0.5, seed=0)
    return model, fit, meas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="examples/fashion_cnn.onnx")
    ap.add_argument("--data", default="examples/fashion_data.npz")
    ap.add_argument("--fmnist", action="store_true", help="the bench Fashion-MNIST ResNet instead")
    ap.add_argument("--bench", default=None, help="a bench model (bench.models: effnet, ...): fit = its calibration "
                    "file, measure = its test split")
    ap.add_argument("--curvature", default="lanczos", choices=("lanczos", "fisher"),
                    help="the CET curvature model (solvers.cet.node_curvature or fisher_curvature)")
    ap.add_argument("--loss", default="ce")
    ap.add_argument("--predict-apart", action="store_true",
                    help="predict with a curvature from the other half of the fit data (rounding: the first half)")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--k-negative", type=int, default=4)
    ap.add_argument("--ks", default="4,8,16,32", help="k values for the trade-off table ('' to skip)")
    ap.add_argument("--max-batches", type=int, default=None, help="curvature on the first N fit batches")
    ap.add_argument("--samples", type=int, default=None,
                    help="curvature on a seeded sub-sample of N fit samples (calib.data.sample_subset, as optimize's "
                         "--cet-samples)")
    ap.add_argument("--iters", type=int, default=None, help="Lanczos steps (default: solvers.cet.default_steps)")
    ap.add_argument("--roundings", default=",".join(ROUNDINGS), help="subset of " + ",".join(ROUNDINGS))
    ap.add_argument("--no-exact", action="store_true", help="skip the exact second order (one HVP pass each)")
    ap.add_argument("--measure-batches", type=int, default=None, help="measure on the first N measure batches")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    model, fit, meas = _load(args)
    if args.measure_batches:
        meas = Dataset(meas.batches[: args.measure_batches], source=f"{meas.source}[:{args.measure_batches} batches]")
    nodes, _ = find_compressible(model)
    graph = TorchGraph(model, dtype=torch.float32)
    loss = make_loss(args.loss, model.graph.output[0].name)
    bits_list = [int(b) for b in args.bits.split(",")]
    roundings = [r for r in args.roundings.split(",") if r]
    if set(roundings) - set(ROUNDINGS):
        raise SystemExit(f"--roundings: choose from {ROUNDINGS}")
    out: dict = {"curvature_model": args.curvature, "fit": fit.source, "measure": meas.source, "n_fit": fit.n_samples, "n_measure": meas.n_samples,
                 "nodes": [n.name for n in nodes], "k": args.k, "k_negative": args.k_negative}

    t0 = time.perf_counter()
    g_fit = collect_gradients(graph, fit, loss, nodes, magnitudes=False)
    g_meas = collect_gradients(graph, meas, loss, nodes, magnitudes=False)
    out["t_gradients"] = time.perf_counter() - t0

    pred_part = None
    if args.predict_apart:  # the prediction's curvature from other fit samples than the rounding's (as optimize)
        half = len(fit.batches) // 2
        fit, pred_part = (Dataset(fit.batches[:half], source=f"{fit.source} (first half)"),
                          Dataset(fit.batches[half:], source=f"{fit.source} (second half)"))
    cfit = fit if args.samples is None else sample_subset(fit, args.samples)
    out["n_curvature"] = cfit.n_samples
    t0 = time.perf_counter()
    if args.curvature == "fisher":
        curv = fisher_curvature(model, graph, cfit, loss, nodes, k=args.k)
    else:
        curv = node_curvature(graph, cfit, loss, nodes, k=args.k, k_negative=args.k_negative,
                              max_batches=args.max_batches, iters=args.iters)
    out["t_curvature"] = time.perf_counter() - t0
    pcurv = curv
    if pred_part is not None:
        psub = pred_part if args.samples is None else sample_subset(pred_part, args.samples, seed=1)
        pcurv = (fisher_curvature(model, graph, psub, loss, nodes, k=args.k) if args.curvature == "fisher" else
                 node_curvature(graph, psub, loss, nodes, k=args.k, k_negative=args.k_negative, iters=args.iters))
    out["curvature"] = {n: {"n": c.n, "eigenvalues": c.eigenvalues.tolist(), "max_residual": float(c.residuals.max()),
                            "trace": c.trace, "trace_se": c.trace_se, "rho": c.remainder, "steps": c.steps}
                        for n, c in curv.items()}

    t0 = time.perf_counter()
    base = measure(graph, meas, loss)
    out["t_base"] = time.perf_counter() - t0
    out["base_loss"] = base.mean

    rows = []
    t_measure = t_exact = t_cheap = t_cet_round = 0.0
    for node in nodes:
        w = graph.params[node.weight].detach().to(torch.float64).numpy()
        gf, gm = g_fit.nodes[node.name].grad_w, g_meas.nodes[node.name].grad_w
        for bits in bits_list:
            weights, info = {}, {}
            for rounding in roundings:
                if rounding.startswith("cet"):
                    t0 = time.perf_counter()
                    r = cet_round(w, _spec(bits, args.block_size), node.out_axis, node.reduce_axis, curv[node.name],
                                  grad=gf if rounding == "cet+g" else None)
                    t_cet_round += time.perf_counter() - t0
                    weights[rounding] = r.weight
                    info[rounding] = {"changed": r.changed, "movable": r.movable,
                                      "proj_before": r.projection_before, "proj_after": r.projection_after,
                                      "neg_before": r.negative_before, "neg_after": r.negative_after}
                else:
                    weights[rounding] = quantize_weight(w, _spec(bits, args.block_size, rounding), node.out_axis,
                                                        node.reduce_axis, grad=gf)
            deltas = {k: v.dequant.astype(np.float64) - w for k, v in weights.items()}
            t0 = time.perf_counter()
            cheap = cet_predict(pcurv[node.name], list(deltas.values()), grad=gm)
            t_cheap += time.perf_counter() - t0
            for i, rounding in enumerate(roundings):
                d = deltas[rounding]
                t0 = time.perf_counter()
                ml, se = measure(graph, meas, loss,
                                 {node.name: constant(torch.as_tensor(weights[rounding].dequant))}).delta(base)
                t_measure += time.perf_counter() - t0
                t0 = time.perf_counter()
                q2 = float("nan") if args.no_exact else quadratic_term(graph, meas, loss, node.name, d)
                t_exact += time.perf_counter() - t0
                first = float((gm * d).sum())
                row = {"node": node.name, "bits": bits, "rounding": rounding, "rel_noise": float(
                    np.linalg.norm(d) / np.linalg.norm(w)), "measured": ml, "se": se, "first": first,
                    "exact2": first + q2, "cet": float(cheap.total[i]), "cet_top": float(cheap.top[i]),
                    "cet_rem": float(cheap.remainder[i]), "proj": float(cheap.projection[i])}
                row.update(info.get(rounding, {}))
                rows.append(row)
                print(f"{node.name:>10} int{bits} {rounding:>7}: measured {ml:+.5f} ± {se:.5f}   first {first:+.5f}"
                      f"  exact2 {first + q2:+.5f}  cet {cheap.total[i]:+.5f}  changed {row.get('changed', '-')}"
                      f"  proj {row['proj']:.3g}", flush=True)
    out["rows"] = rows
    n_cands = len(nodes) * len(bits_list) * len(roundings)
    out["timing"] = {"candidates": n_cands, "measure_all": t_measure, "exact_cet_all": t_exact,
                     "cheap_cet_all": t_cheap, "cet_rounding_all": t_cet_round, "curvature": out["t_curvature"]}

    # whole model: every node at the same level and rounding
    whole = []
    for bits in bits_list:
        for rounding in roundings:
            fns = {}
            for node in nodes:
                w = graph.params[node.weight].detach().to(torch.float64).numpy()
                gf = g_fit.nodes[node.name].grad_w
                if rounding.startswith("cet"):
                    qw = cet_round(w, _spec(bits, args.block_size), node.out_axis, node.reduce_axis, curv[node.name],
                                   grad=gf if rounding == "cet+g" else None).weight
                else:
                    qw = quantize_weight(w, _spec(bits, args.block_size, rounding), node.out_axis, node.reduce_axis,
                                         grad=gf)
                fns[node.name] = constant(torch.as_tensor(qw.dequant))
            ml, se = measure(graph, meas, loss, fns).delta(base)
            whole.append({"bits": bits, "rounding": rounding, "measured": ml, "se": se})
            print(f"whole model int{bits} {rounding:>7}: {ml:+.5f} ± {se:.5f}", flush=True)
    out["whole"] = whole

    # trade-off: k short axes (the eigenpairs cost) vs the measured effect of CET rounding at the first level
    trade = []
    for k in [int(x) for x in args.ks.split(",") if x]:
        t0 = time.perf_counter()
        ck = (fisher_curvature(model, graph, cfit, loss, nodes, k=k) if args.curvature == "fisher" else
              node_curvature(graph, cfit, loss, nodes, k=k, k_negative=args.k_negative, max_batches=args.max_batches))
        tk = time.perf_counter() - t0
        bits = bits_list[0]
        per_node, fns = [], {}
        for node in nodes:
            w = graph.params[node.weight].detach().to(torch.float64).numpy()
            r = cet_round(w, _spec(bits, args.block_size), node.out_axis, node.reduce_axis, ck[node.name])
            ml, se = measure(graph, meas, loss, {node.name: constant(torch.as_tensor(r.weight.dequant))}).delta(base)
            per_node.append({"node": node.name, "measured": ml, "se": se, "changed": r.changed,
                             "proj_before": r.projection_before, "proj_after": r.projection_after})
            fns[node.name] = constant(torch.as_tensor(r.weight.dequant))
        ml, se = measure(graph, meas, loss, fns).delta(base)
        trade.append({"k": k, "seconds": tk, "bits": bits, "whole": ml, "whole_se": se, "nodes": per_node})
        print(f"k={k:>3}: curvature {tk:.1f} s, whole model int{bits} cet {ml:+.5f} ± {se:.5f}; per node "
              + ", ".join(f"{p['measured']:+.4f}" for p in per_node), flush=True)
    out["tradeoff"] = trade
    print(json.dumps(out["timing"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    """The per-node table (measured ΔL on the measure split, nearest vs CET rounding, per bit-width), how many
    nodes CET wins, the whole model, and how well the CET prediction ranks the measurements."""
    rows, lines = out["rows"], []
    bits_list = sorted({r["bits"] for r in rows}, reverse=True)
    by = {(r["node"], r["bits"], r["rounding"]): r for r in rows}
    nodes = list(dict.fromkeys(r["node"] for r in rows))
    head = "| node | " + " | ".join(f"int{b} nearest | int{b} CET | codes moved" for b in bits_list) + " |"
    lines += [head, "|" + "---|" * (1 + 3 * len(bits_list))]
    for n in nodes:
        cells = []
        for b in bits_list:
            a, c = by.get((n, b, "nearest")), by.get((n, b, "cet"))
            if a is None or c is None:
                cells += ["–", "–", "–"]
                continue
            win = c["measured"] < a["measured"]
            cet = f"{c['measured']:+.5f} ± {c['se']:.5f}"
            cells += [f"{a['measured']:+.5f} ± {a['se']:.5f}", f"**{cet}**" if win else cet, str(c.get("changed", "–"))]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    lines.append("")
    for b in bits_list:
        pairs = [(by[(n, b, "nearest")], by[(n, b, "cet")]) for n in nodes
                 if (n, b, "nearest") in by and (n, b, "cet") in by]
        wins = sum(c["measured"] < a["measured"] for a, c in pairs)
        whole = {w["rounding"]: w["measured"] for w in out["whole"] if w["bits"] == b}
        lines.append(f"- int{b}: CET rounding has the lower measured ΔL on **{wins} of {len(pairs)}** nodes; whole "
                     f"model (every node at int{b}): nearest {whole.get('nearest', float('nan')):+.4f}, CET "
                     f"{whole.get('cet', float('nan')):+.4f}.")
    near = [r for r in rows if r["rounding"] == "nearest"]
    lines.append(f"- CET prediction vs measured ΔL, Spearman: {spearman([r['cet'] for r in rows], [r['measured'] for r in rows]):.3f} "
                 f"over all {len(rows)} candidates, {spearman([r['cet'] for r in near], [r['measured'] for r in near]):.3f} "
                 f"over the nearest-rounded ones (first order alone: "
                 f"{spearman([r['first'] for r in rows], [r['measured'] for r in rows]):.3f}).")
    t = out["timing"]
    lines.append(f"- curvature ({out.get('curvature_model', 'lanczos')}, k = {out['k']}, "
                 f"{out.get('n_curvature', out['n_fit'])} samples): {t['curvature']:.1f} s; CET rounding of all "
                 f"candidates {t['cet_rounding_all']:.1f} s; measuring the {t['candidates']} candidates "
                 f"({out['n_measure']} samples each) {t['measure_all']:.1f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
