"""Exact memory around every call of plan validation, on a synthetic model: where validation's peak comes from.

    python -m bench.exp_memory_calls --dir /tmp/memprobe/m --size-gb 0.3 [--bits 4,8,float]
    python -m bench.exp_memory_calls --model smollm2 [--set quant.bits=4,float ...] [--cache DIR]
    python -m bench.exp_memory_calls --session model.onnx [--config session.disable_prepacking=1]

Builds (once) ``bench.large_model.build(dir, size_gb, width=2048, samples=64)`` — MatMul(2048×2048) + Relu
layers and a head, data with labels — then runs ``llc_onnx.optimize`` (batch 16, the given levels) and prints the
RSS and the kernel's high-water mark (VmHWM, reset after each line: the peak of the interval that ends there) at
every stage boundary and around every build, ``SessionInput`` and evaluation inside ``verify.select_plan``, and
around ``drop_model`` / ``release_interpreter`` / ``restore_weights`` / ``api.release``. The figures in
bench/RESULTS.md ("Plan codes") are its output on the 0.3 GB model before and after that change.
``--model NAME`` runs the same probe on a prepared bench model (``bench.models``: its files, batch size and
measure samples, as ``bench.exp_memory``; ``--set`` adds settings, ``--cache`` reuses measured costs;
``--candidates`` marks every measured candidate too; ``--gradients`` marks the forward, loss and backward of each
batch of the gradient pass and stops after that pass).
``--session FILE`` instead measures what one ONNX Runtime CPU session of a written model costs (one thread;
``--config key=value`` adds session config entries).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from bench.exp_memory import high_water, reset_high_water, rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.exp_memory_calls", description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="where the synthetic model and data are (built once)")
    ap.add_argument("--session", help="only measure one ONNX Runtime session of this model file")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--size-gb", type=float, default=0.3)
    ap.add_argument("--bits", default="4,8,float")
    ap.add_argument("--model", help="a bench model (bench.models) instead of the synthetic one")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--cache", help="cost cache directory (optimize --cache)")
    ap.add_argument("--candidates", action="store_true", help="also mark every measured candidate")
    ap.add_argument("--gradients", action="store_true",
                    help="also mark the forward, the loss and the backward of every batch of the gradient pass, and "
                         "stop after it")
    a = ap.parse_args(argv)
    if a.session:
        return session_cost(a.session, a.config)
    if not a.dir and not a.model:
        ap.error("--dir, --model or --session is required")

    from bench import large_model
    from llc_onnx import api, ort_eval, progress, verify
    from llc_onnx.config import OptimizeConfig, with_values
    from llc_onnx.flows import context

    held = None
    bits = tuple(b if b == "float" else int(b) for b in a.bits.split(","))
    values = {"criterion.allow_loss_increase": True, "data.batch_size": 16, "quant.bits": bits}
    if a.model:
        from bench import models
        from bench.exp_memory import _values

        m = models.get(a.model)[0]
        calib, held = m.files(False)
        model, data = str(m.model_path()), str(calib)
        values = {"criterion.allow_loss_increase": True, "data.batch_size": m.batch_size}
        if m.measure_samples:
            values["data.measure_samples"] = m.measure_samples
        values.update(_values(a.set))
    else:
        os.makedirs(a.dir, exist_ok=True)
        model, data = os.path.join(a.dir, "model.onnx"), os.path.join(a.dir, "data.npz")
        if not os.path.exists(model):
            large_model.build(a.dir, a.size_gb, width=2048, samples=64)
    if a.cache:
        values["cache_dir"] = a.cache
    t0 = time.time()

    def mark(what: str) -> None:
        print(f"{time.time() - t0:7.1f}s {what:<40} rss {rss() / 1e9:.3f} hwm {high_water() / 1e9:.3f}", flush=True)
        reset_high_water()

    def around(fn, label):
        def wrapped(*args, **kwargs):
            mark(f"  before {label}")
            out = fn(*args, **kwargs)
            mark(f"  after {label}")
            return out
        return wrapped

    orig_stage = progress.StageTimer.stage
    in_gradients = [False]

    @contextlib.contextmanager
    def stage(self, name):
        mark(f"-> {name}")
        in_gradients[0] = name == "gradients"
        with orig_stage(self, name):
            yield
        in_gradients[0] = False
        mark(f"<- {name}")
        if a.gradients and name == "gradients":
            print("stopped after the gradient pass (--gradients)", flush=True)
            os._exit(0)  # (its spill directories are removed by the next run: llc_onnx.tempdirs)

    if a.gradients:
        import torch

        from llc_onnx.calib import gradients, losses
        from llc_onnx.interpreter import TorchGraph

        def marked(fn, label):
            def wrapped(*args, **kwargs):
                if in_gradients[0]:
                    mark(f"  before {label}")
                out = fn(*args, **kwargs)
                if in_gradients[0]:
                    mark(f"  after {label}")
                return out
            return wrapped

        TorchGraph.run = marked(TorchGraph.run, "forward")
        for cls in (losses.TaskLoss, *losses.TaskLoss.__subclasses__(), *losses._ClassLoss.__subclasses__()):
            if "terms" in vars(cls):
                cls.terms = marked(cls.terms, "loss terms")
        gradients.torch.autograd.backward = marked(torch.autograd.backward, "backward")

    progress.StageTimer.stage = stage
    orig_select = verify.select_plan

    def select_plan(build, ladders, plans, evaluate, *args, **kwargs):
        out = orig_select(around(build, "build"), ladders, plans, around(evaluate, "evaluate"), *args, **kwargs)
        mark("  select_plan returns")
        return out

    verify.select_plan = select_plan

    class Input(ort_eval.SessionInput):
        def __init__(self, m):
            mark("  before SessionInput")
            super().__init__(m)
            mark("  after SessionInput")

    verify.SessionInput = ort_eval.SessionInput = Input
    ort_eval.make_session = around(ort_eval.make_session, "make_session")
    if a.candidates:  # one line per measured candidate: its node, level and the exact peak while it was measured
        from llc_onnx.flows import quantize

        orig_measure = quantize.measure_candidate

        def measure_candidate(ctx, formats, rounder, grads_m, node, fmt, rounding):
            out = orig_measure(ctx, formats, rounder, grads_m, node, fmt, rounding)
            mark(f"  candidate {node.name} {fmt.name} {rounding}")
            return out

        quantize.measure_candidate = measure_candidate
    for name in ("drop_model", "release_interpreter", "restore_weights"):
        setattr(context.FlowContext, name, around(getattr(context.FlowContext, name), name))
    api.release = around(api.release, "release")
    cfg = with_values(OptimizeConfig(), values)
    reset_high_water()
    res = api.optimize(model, data, cfg, held=held)
    mark("end")
    print("verified:", res.verified)
    return 0


def session_cost(path: str, entries: list[str]) -> int:
    """RSS and high-water increase of making one CPU session of ``path`` (one intra-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for kv in entries:
        key, _, value = kv.partition("=")
        opts.add_session_config_entry(key, value)
    reset_high_water()
    before = rss()
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    print(f"{path}: session +{(rss() - before) / 1e9:.3f} GB RSS, high-water +{(high_water() - before) / 1e9:.3f} GB"
          f" ({os.path.getsize(path) / 1e9:.3f} GB file{', ' + ', '.join(entries) if entries else ''})")
    del session
    return 0


if __name__ == "__main__":
    sys.exit(main())
